r"""`--source hf`: a Hugging Face `datasets` dataset saved on disk, or read from local files by a builder.

    python -m shards build --source hf --hf-dataset my_dataset_dir \
        --hf-image-column image --hf-text-column captions --hf-split val=validation --out data/mine --name mine
    python -m shards build --source hf --hf-builder parquet \
        --hf-data-files 'train=data/train-*.parquet' --hf-data-files 'test=data/test-*.parquet' \
        --hf-image-column image --hf-text-column caption --out data/mine --name mine

--hf-dataset is a folder written by `save_to_disk` (a DatasetDict, or one Dataset taken as train);
--hf-builder names a packaged builder (parquet, json, csv, arrow, imagefolder) over local --hf-data-files.
Nothing is downloaded. The image column may be an `Image` feature (its original bytes are used, not the
decoded picture), raw bytes, or a path (relative to --images). The text column holds a caption or a list of
captions. --hf-split SPLIT=HFSPLIT maps shard splits to the dataset's (default: train, val from validation
or val, test). The image id is --hf-id-column, or `{split}-{row:08d}`.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterator

from shards.sources.base import (
    BadSample,
    InputError,
    Item,
    Problems,
    Source,
    assignments,
    read_image_file,
    safe_id,
    split_assignment,
)

DEFAULT_SPLITS = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--hf-dataset", help="folder written by Dataset(Dict).save_to_disk")
    group.add_argument("--hf-builder", help="packaged builder for local files: parquet, json, csv, arrow, imagefolder")
    group.add_argument("--hf-data-files", type=split_assignment, action="append", metavar="HFSPLIT=GLOB",
                       help="local files of one split for --hf-builder (repeatable)")
    group.add_argument("--hf-cache-dir", help="datasets cache folder for --hf-builder (default: the HF cache)")
    group.add_argument("--hf-image-column", default="image", help="column with the picture")
    group.add_argument("--hf-text-column", default="caption", help="column with a caption or a list of captions")
    group.add_argument("--hf-id-column", help="column of image ids (default: SPLIT-ROW)")
    group.add_argument("--hf-split", type=split_assignment, action="append", metavar="SPLIT=HFSPLIT",
                       help="shard split and the dataset split it reads (repeatable)")


def _load(args: argparse.Namespace):
    import datasets

    if bool(args.hf_dataset) == bool(args.hf_builder):
        raise InputError("--source hf needs exactly one of --hf-dataset (save_to_disk folder) or --hf-builder")
    if args.hf_dataset:
        try:
            loaded = datasets.load_from_disk(args.hf_dataset)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"--hf-dataset {args.hf_dataset}: not a saved dataset: {e}") from None
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    files = assignments(args.hf_data_files, "--hf-data-files")
    if not files:
        raise InputError("--hf-builder needs --hf-data-files HFSPLIT=GLOB")
    try:
        return datasets.load_dataset(args.hf_builder, data_files=files, cache_dir=args.hf_cache_dir)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--hf-builder {args.hf_builder} --hf-data-files {files}: {e}") from None


def _split_map(args: argparse.Namespace, available: list[str]) -> dict[str, str]:
    explicit = assignments(args.hf_split, "--hf-split")
    if explicit:
        unknown = {ours: theirs for ours, theirs in explicit.items() if theirs not in available}
        if unknown:
            raise InputError(f"--hf-split {unknown}: the dataset has splits {available}")
        return explicit
    return {ours: next(t for t in theirs if t in available)
            for ours, theirs in DEFAULT_SPLITS.items() if any(t in available for t in theirs)}


def _picture_bytes(value, root: Path | None) -> bytes:
    if isinstance(value, dict):  # an undecoded Image feature: original bytes, or the file they came from
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value)
        return read_image_file(path if path.is_absolute() or root is None else root / path)
    raise BadSample("missing_image", f"no picture in the image column ({type(value).__name__})")


def items(args: argparse.Namespace, problems: Problems) -> Iterator[Item]:
    # local data only: never reach for the hub (read when datasets is first imported)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets  # slow to import; only this source needs it

    data = _load(args)
    root = Path(args.images) if args.images else None
    for split, hf_split in _split_map(args, list(data)).items():
        table = data[hf_split]
        columns = [args.hf_image_column, args.hf_text_column] + ([args.hf_id_column] if args.hf_id_column else [])
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise InputError(f"dataset split {hf_split!r} has no column {missing} (columns: {table.column_names})")
        if isinstance(table.features[args.hf_image_column], datasets.Image):
            # undecoded: the stored bytes as they are, never a re-encoded PIL picture
            table = table.cast_column(args.hf_image_column, datasets.Image(decode=False))
        texts = list(table[args.hf_text_column])
        ids = list(table[args.hf_id_column]) if args.hf_id_column else None
        for row, text in enumerate(texts):
            where = f"dataset split {hf_split!r} row {row}"
            captions = text if isinstance(text, list) else [text]
            yield Item(
                image_id=safe_id(str(ids[row])) if ids else f"{split}-{row:08d}",
                split=split,
                captions=[c if isinstance(c, str) else "" for c in captions],
                where=where + (f" (id {ids[row]})" if ids else ""),
                load=lambda table=table, row=row: _picture_bytes(table[row][args.hf_image_column], root),
            )


SOURCE = Source(add_arguments, items, shared_options=("images",))

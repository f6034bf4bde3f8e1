r"""`--source karpathy`: Karpathy-split JSON (dataset_flickr30k.json, dataset_coco.json, dataset_flickr8k.json).

    python -m shards build --source karpathy --karpathy-json dataset_flickr30k.json \
        --images flickr30k-images --out data/f30k --name f30k
    python -m shards build --source karpathy --karpathy-json dataset_coco.json --images coco \
        --restval-to-train --out data/coco --name coco     # COCO: images under filepath/filename

Each entry of "images" is one picture: `filename` (under `filepath` for COCO) in the --images folder, its
`split` (train, val, test, restval) and `sentences[].raw`. The image id is the file name without its
extension (COCO_val2014_000000391895, 1000092795).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from shards.sources.base import (
    InputError,
    Item,
    Problems,
    Source,
    read_image_file,
    read_json_file,
    require,
    safe_id,
)

KARPATHY_SPLITS = ("train", "val", "test", "restval")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--karpathy-json", help="dataset_*.json of the Karpathy split")
    group.add_argument("--restval-to-train", action="store_true",
                       help="put 'restval' images in train (as VSE++ does for COCO) instead of a 'restval' split")


def _load_index(path: Path) -> list:
    data = read_json_file(path, "--karpathy-json")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise InputError(f"{path}: no 'images' list (is it a Karpathy-split dataset_*.json?)")
    return images


def items(args: argparse.Namespace, problems: Problems) -> Iterator[Item]:
    index = Path(require(args.karpathy_json, "--karpathy-json", "karpathy"))
    root = Path(require(args.images, "--images", "karpathy"))
    for k, entry in enumerate(_load_index(index)):
        where = f"{index}: images[{k}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise InputError(f"{where}: entry has no 'filename'")
        where += f" ({entry['filename']})"
        split = entry.get("split")
        if split not in KARPATHY_SPLITS:
            problems.bad("unknown_split", where, f"split {split!r} is not one of {', '.join(KARPATHY_SPLITS)}")
            continue
        if split == "restval" and args.restval_to_train:
            split = "train"
        sentences = entry.get("sentences") or []  # none at all: reported as an image without captions
        if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences):
            raise InputError(f"{where}: 'sentences' is not a list of objects")
        path = root / entry.get("filepath", "") / entry["filename"]
        yield Item(
            image_id=safe_id(Path(entry["filename"]).stem),
            split=split,
            captions=[s.get("raw") if isinstance(s.get("raw"), str) else "" for s in sentences],
            where=where,
            caption_wheres=[f"{where} sentences[{j}]" for j in range(len(sentences))],
            load=lambda path=path: read_image_file(path),
        )


SOURCE = Source(add_arguments, items, shared_options=("images",))

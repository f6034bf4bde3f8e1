r"""`--source csv`: a CSV or TSV file of (image path, caption) rows; several rows per image are grouped.

    python -m shards build --source csv --table captions.tsv --images pictures \
        --image-column image --caption-column caption --split-column split --out data/mine --name mine
    python -m shards build --source csv --table captions.csv --images pictures \
        --split-file train=train_images.txt --split-file test=test_images.txt --out data/mine --name mine

The delimiter follows the extension (.tsv tab, otherwise comma) unless --delimiter is given. Image paths are
relative to --images. A split comes from --split-column (values must be one of --splits), or from
--split-files listing image paths one a line, or everything is train. The image id is --id-column, or the
image path without its extension with '/' and '.' turned into '_'. Text that is not UTF-8 is reported by line.
"""
from __future__ import annotations

import argparse
import csv
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from shards.sources.base import (
    InputError,
    Item,
    Problems,
    Source,
    assignments,
    read_image_file,
    require,
    safe_id,
    split_assignment,
    split_names,
)

TRAIN = "train"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--table", help="the CSV/TSV file")
    group.add_argument("--delimiter", help="field delimiter (default: tab for .tsv, comma otherwise)")
    group.add_argument("--image-column", default="image", help="column of image paths (relative to --images)")
    group.add_argument("--caption-column", default="caption", help="column of captions")
    group.add_argument("--id-column", help="column of image ids (default: derived from the image path)")
    group.add_argument("--split-column", help="column of split names")
    group.add_argument("--split-file", type=split_assignment, action="append", metavar="SPLIT=PATH",
                       help="a file listing the image paths of one split, one a line (repeatable)")
    group.add_argument("--splits", type=split_names, default=["train", "val", "test"],
                       help="split names the split column may use")


@dataclass
class _Image:
    path: str
    image_id: str
    split: str | None
    first_line: int
    captions: list[str] = field(default_factory=list)
    wheres: list[str] = field(default_factory=list)


def _split_files(args: argparse.Namespace) -> dict[str, str]:
    """image path -> split from --split-file lists."""
    out: dict[str, str] = {}
    for split, list_path in assignments(args.split_file, "--split-file").items():
        try:
            lines = Path(list_path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--split-file {split}={list_path}: cannot read it: {e}") from None
        for n, line in enumerate(lines, 1):
            if line.strip() in out and out[line.strip()] != split:
                raise InputError(f"{list_path}:{n}: {line.strip()} is already listed for split {out[line.strip()]!r}")
            if line.strip():
                out[line.strip()] = split
    return out


def _row_split(args: argparse.Namespace, listed: dict[str, str], row: dict, path: str) -> tuple[str, str | None]:
    """(the split of a table row's picture, None), or ("", why it has none): from --split-column, the
    --split-file lists, or train."""
    if args.split_column:
        split = (row[args.split_column] or "").strip()
        if split not in args.splits:
            return "", f"split {split!r} is not one of {', '.join(args.splits)}"
        return split, None
    if listed:
        split = listed.get(path)
        return ("", f"image {path} is in no --split-file") if split is None else (split, None)
    return TRAIN, None


def items(args: argparse.Namespace, problems: Problems) -> Iterator[Item]:
    table = Path(require(args.table, "--table", "csv"))
    root = Path(require(args.images, "--images", "csv"))
    if args.split_column and args.split_file:
        raise InputError("give --split-column or --split-file, not both")
    delimiter = args.delimiter or ("\t" if table.suffix.lower() == ".tsv" else ",")
    listed = _split_files(args)
    images: dict[str, _Image] = {}
    # row problems wait for the items before them: every row is read before the first image is complete,
    # and --on-error stop must still name the first bad line of the file
    deferred: deque[tuple[int, str, str, str]] = deque()
    try:
        # surrogateescape keeps undecodable bytes visible as lone surrogates, so one bad caption is reported
        # with its line instead of the whole file failing to decode
        with open(table, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            needed = [c for c in (args.image_column, args.caption_column, args.id_column, args.split_column) if c]
            missing = [c for c in needed if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{table}: no column {missing} (columns: {reader.fieldnames}); "
                                 "name them with --image-column/--caption-column/--id-column/--split-column")
            for row in reader:
                line = reader.line_num
                where = f"{table}:{line}"
                path = (row[args.image_column] or "").strip()
                if not path:
                    deferred.append((line, "missing_image", where, f"no image path in column {args.image_column!r}"))
                    continue
                split, problem = _row_split(args, listed, row, path)
                if problem:
                    deferred.append((line, "unknown_split", where, problem))
                    continue
                image_id = safe_id(row[args.id_column] if args.id_column else str(Path(path).with_suffix("")))
                image = images.setdefault(path, _Image(path, image_id, split, line))
                if image.split != split:
                    deferred.append((line, "unknown_split", where, f"image {path} is in split {split!r} here "
                                     f"but in {image.split!r} at line {image.first_line}"))
                    continue
                image.captions.append(row[args.caption_column] or "")
                image.wheres.append(where)
    except FileNotFoundError:
        raise InputError(f"--table {table} does not exist") from None
    except csv.Error as e:
        raise InputError(f"{table}: malformed CSV: {e}") from None
    for image in images.values():
        while deferred and deferred[0][0] < image.first_line:
            problems.bad(*deferred.popleft()[1:])
        picture = root / image.path
        yield Item(image_id=image.image_id, split=image.split, captions=image.captions,
                   where=f"{table}:{image.first_line} ({image.path})", caption_wheres=image.wheres,
                   load=lambda picture=picture: read_image_file(picture))
    for _, kind, where, message in deferred:
        problems.bad(kind, where, message)


SOURCE = Source(add_arguments, items, shared_options=("images",))

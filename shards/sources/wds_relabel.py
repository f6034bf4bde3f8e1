r"""`--source wds_relabel`: label existing WebDataset tars (img2dataset output) without re-encoding pictures.

    python -m shards build --source wds_relabel --tars 'train=cc3m/{00000..00331}.tar' \
        --tars 'val=cc3m-val/*.tar' --out data/cc3m --name cc3m --shard-size 10000

Each input sample is one picture (`jpg`/`jpeg`/`png`/`webp`) and its caption: a `txt` member, or else the
--caption-key field of its `json` (img2dataset writes both). Picture bytes are copied as they are; the
output keeps the input's shard boundaries (one output tar per input tar, split further only past
--shard-size). The image id is the input sample's key. Members are read by offset, so nothing is held in
memory between the checking and the writing pass.
"""
from __future__ import annotations

import argparse
import glob
import json
import tarfile
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand

from shards.sources.base import BadSample, InputError, Item, Problems, Source, assignments, safe_id, split_assignment

PICTURE_MEMBERS = ("jpg", "jpeg", "png", "webp")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--tars", type=split_assignment, action="append", metavar="SPLIT=PATTERN",
                       help="input tars of one split: a glob and/or {000..123} brace pattern (repeatable)")
    group.add_argument("--caption-key", default="caption", help="caption field of a sample's json when it has no txt")


def _tar_paths(split: str, pattern: str) -> list[Path]:
    paths = sorted({Path(p) for expanded in braceexpand(pattern) for p in (glob.glob(expanded) or [expanded])})
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"--tars {split}={pattern}: {missing[0]} does not exist")
    return paths


def _read_range(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise BadSample("corrupt_image", f"{path} is shorter than its tar header says")
    return data


def _members(path: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) per sample, in tar order; a key is the member name up to its first dot."""
    key, group = None, {}
    try:
        # uncompressed only: members are read back by their byte offset in the file
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                name = f"{folder}/{stem}" if folder else stem
                if name != key and key is not None:
                    yield key, group
                    group = {}
                key = name
                group[ext.lower()] = member
    except tarfile.TarError as e:
        raise InputError(f"{path}: not a readable uncompressed tar: {e}") from None
    if key is not None:
        yield key, group


def _caption(path: Path, key: str, members: dict[str, tarfile.TarInfo], caption_key: str) -> str:
    if "txt" in members:
        m = members["txt"]
        return _read_range(path, m.offset_data, m.size).decode("utf-8", errors="surrogateescape")
    if "json" in members:
        m = members["json"]
        try:
            meta = json.loads(_read_range(path, m.offset_data, m.size))
        except ValueError:
            return ""
        caption = meta.get(caption_key) if isinstance(meta, dict) else None
        return caption if isinstance(caption, str) else ""
    return ""


def items(args: argparse.Namespace, problems: Problems) -> Iterator[Item]:
    patterns = assignments(args.tars, "--tars")
    if not patterns:
        raise InputError("--source wds_relabel needs --tars SPLIT=PATTERN (at least train=...)")
    for split, pattern in patterns.items():
        for path in _tar_paths(split, pattern):
            for key, members in _members(path):
                where = f"{path}: sample {key}"
                picture = next((members[e] for e in PICTURE_MEMBERS if e in members), None)
                if picture is None:
                    problems.bad("missing_image", where, f"no {'/'.join(PICTURE_MEMBERS)} member "
                                 f"(has {', '.join(sorted(members))})")
                    continue
                yield Item(
                    image_id=safe_id(key),
                    split=split,
                    captions=[_caption(path, key, members, args.caption_key)],
                    where=where,
                    load=lambda path=path, m=picture: _read_range(path, m.offset_data, m.size),
                    group=str(path),
                )


SOURCE = Source(add_arguments, items)

r"""`--source scan_precomp`: SCAN's precomputed bottom-up-attention features (the `*_precomp` layout).

    python -m shards build --source scan_precomp --precomp data/f30k_precomp --out data/f30k-butd --name f30k
    python -m shards build --source scan_precomp --precomp data/coco_precomp \
        --precomp-split train=train --precomp-split val=dev --precomp-split test=testall --out data/coco-butd

A split is `{name}_ims.npy` [N, regions, dim] float32 and `{name}_caps.txt` with 5 captions per image in
order (5N lines; SCAN's files with one feature row per caption, N = lines, are read as every 5th row).
`{name}_ids.txt` (one id per image or per caption) gives image ids when present, else `{split}-{k:06d}`.
Each sample stores its regions as a float16 npy (np.save bytes, never pickled). Features are memory-mapped,
so a 30 GB train file is read one image at a time.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Iterator

import numpy as np

from shards.sources.base import (
    BadSample,
    InputError,
    Item,
    Problems,
    Source,
    assignments,
    require,
    safe_id,
    split_assignment,
)

CAPTIONS_PER_IMAGE = 5
# SCAN's file names -> shard split names, used when --precomp-split is not given (those whose files exist)
DEFAULT_SPLITS = {"train": "train", "val": "dev", "test": "test", "testall": "testall"}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--precomp", help="the *_precomp folder")
    group.add_argument("--precomp-split", type=split_assignment, action="append", metavar="SPLIT=NAME",
                       help="shard split and the file prefix it reads, e.g. val=dev (repeatable; default: "
                            "train=train val=dev test=test testall=testall, those present)")


def _caption_lines(path: Path) -> list[bytes]:
    try:
        return path.read_bytes().splitlines()
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None


def _features(ims: np.ndarray, row: int) -> bytes:
    regions = np.asarray(ims[row], dtype=np.float32)
    if not np.isfinite(regions).all():
        raise BadSample("bad_features", f"row {row} has inf/nan")
    if np.abs(regions).max(initial=0.0) > np.finfo(np.float16).max:
        raise BadSample("bad_features", f"row {row} overflows float16 (|x| > 65504)")
    half = regions.astype(np.float16)
    out = io.BytesIO()
    np.save(out, half, allow_pickle=False)
    return out.getvalue()


def _split_items(root: Path, split: str, name: str, problems: Problems) -> Iterator[Item]:
    ims_path, caps_path, ids_path = (root / f"{name}_{what}" for what in ("ims.npy", "caps.txt", "ids.txt"))
    try:
        ims = np.load(ims_path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{ims_path} does not exist") from None
    except ValueError as e:
        raise InputError(f"{ims_path}: not an npy array: {e}") from None
    if ims.ndim != 3:
        raise InputError(f"{ims_path}: expected [images, regions, dim], got shape {list(ims.shape)}")
    lines = _caption_lines(caps_path)
    if len(lines) % CAPTIONS_PER_IMAGE:
        raise InputError(f"{caps_path}: {len(lines)} lines is not a multiple of {CAPTIONS_PER_IMAGE}")
    n_images = len(lines) // CAPTIONS_PER_IMAGE
    if len(ims) == n_images:
        rows_per_image = 1
    elif len(ims) == len(lines):
        rows_per_image = CAPTIONS_PER_IMAGE
    else:
        raise InputError(f"{ims_path} has {len(ims)} rows but {caps_path} has {len(lines)} captions "
                         f"(expected {CAPTIONS_PER_IMAGE} per image)")
    ids: list[str] | None = None
    if ids_path.is_file():
        id_lines = [line.strip() for line in ids_path.read_text(encoding="utf-8").splitlines()]
        if len(id_lines) not in (n_images, len(lines)):
            raise InputError(f"{ids_path}: {len(id_lines)} lines, expected {n_images} (per image) "
                             f"or {len(lines)} (per caption)")
        ids = id_lines[::len(id_lines) // n_images]
    for k in range(n_images):
        first = k * CAPTIONS_PER_IMAGE
        captions, wheres = [], []
        for n in range(first, first + CAPTIONS_PER_IMAGE):
            # undecodable bytes stay visible as lone surrogates; the builder reports them by line
            captions.append(lines[n].decode("utf-8", errors="surrogateescape"))
            wheres.append(f"{caps_path}:{n + 1}")
        row = k * rows_per_image
        yield Item(
            image_id=safe_id(ids[k]) if ids else f"{split}-{k:06d}",
            split=split,
            captions=captions,
            caption_wheres=wheres,
            where=f"{ims_path}[{row}] ({caps_path}:{first + 1})",
            load=lambda row=row: _features(ims, row),
            features=True,
        )


def items(args: argparse.Namespace, problems: Problems) -> Iterator[Item]:
    root = Path(require(args.precomp, "--precomp", "scan_precomp"))
    if not root.is_dir():
        raise InputError(f"--precomp {root} is not a folder")
    splits = assignments(args.precomp_split, "--precomp-split") or {
        split: name for split, name in DEFAULT_SPLITS.items() if (root / f"{name}_caps.txt").is_file()}
    if not splits:
        raise InputError(f"--precomp {root} holds no {{train,dev,test,testall}}_caps.txt")
    for split, name in splits.items():
        yield from _split_items(root, split, name, problems)


SOURCE = Source(add_arguments, items)

"""The checking pass of a build: every item of a source, before any label or shard is made.

An item is kept when its id is new (ids are unique across all splits: one picture in two splits would leak
test images into training), it has at least one usable caption (empty and non-UTF-8 ones are reported and
dropped), and its picture decodes (or its features are a finite float16 array). Everything else goes to
`Problems`, which skips and counts it or stops the build.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Iterator

import numpy as np
from tqdm import tqdm

from shards.sources.base import BadSample, InputError, Item, Problems
from shards.sources.pictures import checked_picture

PICTURE_CHUNK = 256  # pictures decoded in parallel before their results are taken in order
SPLIT_ORDER = ("train", "val", "test")  # these first, in this order; other splits after them as first seen


def _show_bytes(caption: str) -> str:
    """A caption with its undecodable bytes shown as \\xNN (they arrive as surrogateescape surrogates)."""
    try:
        return caption.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape, not from bytes
        return caption.encode("utf-8", "backslashreplace").decode("utf-8")


def _clean_captions(item: Item, problems: Problems) -> list[str]:
    """The item's usable captions, stripped; empty and non-UTF-8 ones are reported and left out."""
    kept = []
    for k, caption in enumerate(item.captions):
        where = item.caption_wheres[k] if item.caption_wheres else f"{item.where} caption {k}"
        if not isinstance(caption, str) or not caption.strip():
            problems.bad("empty_caption", where, f"image {item.image_id!r}: empty caption")
            continue
        try:
            caption.encode("utf-8")  # sources decode with surrogateescape: undecodable bytes fail here
        except UnicodeEncodeError:
            problems.bad("non_utf8_caption", where, f"image {item.image_id!r}: caption is not valid UTF-8: "
                         f"{_show_bytes(caption)!r}")
            continue
        kept.append(caption.strip())
    return kept


def _check_features(data: bytes) -> None:
    """Region features must be an np.save float16 [regions, dim] array of finite values (never pickled)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadSample("bad_features", f"not an npy array: {e}") from None
    if array.dtype != np.float16 or array.ndim != 2 or not array.size:
        raise BadSample("bad_features", f"features must be float16 [regions, dim], got {array.dtype} "
                        f"{list(array.shape)}")
    if not np.isfinite(array).all():
        raise BadSample("bad_features", "features hold inf or nan")


def _load_failure(item: Item) -> BadSample | None:
    """Why the item's picture or features cannot be used, or None (runs in a checking thread)."""
    try:
        data = item.load()
        if item.features:
            _check_features(data)
        else:
            checked_picture(data)
    except BadSample as e:
        return e
    return None


def _chunks(items: Iterator[Item], size: int) -> Iterator[tuple[list[Item], InputError | None]]:
    """Items in lists of `size`; an InputError the source raises comes with the items before it, so those are
    checked (and their own problems reported) first: --on-error stop always names the first bad input."""
    chunk: list[Item] = []
    while True:
        try:
            item = next(items)
        except StopIteration:
            yield chunk, None
            return
        except InputError as e:
            yield chunk, e
            return
        chunk.append(item)
        if len(chunk) == size:
            yield chunk, None
            chunk = []


def checked_items(items: Iterator[Item], problems: Problems, pool: ThreadPoolExecutor,
                  bar: tqdm) -> dict[str, list[Item]]:
    """Every usable item by split (train, val, test first), each reported problem skipped or stopping.

    Pictures are decoded by the pool's threads (PIL releases the GIL while decoding); results are taken
    in source order, so the output and the reports do not depend on the number of threads.
    """
    by_split: dict[str, list[Item]] = {}
    seen: dict[str, str] = {}
    for chunk, source_error in _chunks(iter(items), PICTURE_CHUNK):
        for item, failure in zip(chunk, pool.map(_load_failure, chunk)):
            bar.update(1)
            if not item.image_id:
                problems.bad("missing_image", item.where, "no image id or path")
                continue
            if item.image_id in seen:
                problems.bad("duplicate_id", item.where,
                             f"image id {item.image_id} was already used by {seen[item.image_id]}")
                continue
            seen[item.image_id] = item.where
            captions = _clean_captions(item, problems)
            if not captions:
                problems.bad("no_captions", item.where, f"image {item.image_id!r} has no usable caption")
                continue
            if failure is not None:
                problems.bad(failure.kind, item.where, f"image {item.image_id!r}: {failure}")
                continue
            by_split.setdefault(item.split, []).append(replace(item, captions=captions))
        if source_error is not None:
            raise source_error
    order = [s for s in SPLIT_ORDER if s in by_split] + [s for s in by_split if s not in SPLIT_ORDER]
    return {split: by_split[split] for split in order}

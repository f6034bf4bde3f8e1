"""What every shard source shares: the item it yields, the bad-input report, option parsing helpers.

A source turns some corpus layout into `Item`s: an image id, its split, its captions, where it came from
(file and line or index, for messages) and a `load()` that returns the picture or feature bytes. The
builder calls `load()` twice (once to check the picture before the vocabularies are built, once to write),
so a source never has to hold a corpus's pixels in memory.

Per-sample problems go to `Problems.bad(kind, where, message)`: with `--on-error skip` they are counted per
kind (with the first examples) for the manifest, with `--on-error stop` the first one ends the build.
Problems with a whole input (a missing index file, a missing column) are `InputError`s: they always stop.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from usercli import UserError

ON_ERROR = ("skip", "stop")
EXAMPLES_KEPT = 5
# the kinds of per-sample bad input the manifest counts
BAD_KINDS = ("missing_image", "corrupt_image", "empty_caption", "non_utf8_caption", "no_captions",
             "duplicate_id", "unknown_split", "bad_features")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")
_ID_UNSAFE = re.compile(r"[./\\\s]+")


class InputError(UserError, ValueError):
    """Bad input that ends the build: the message names the file and the line, key or sample."""


class BadSample(Exception):  # noqa: N818 - a sample the builder skips, not an error of the program
    """Raised by `Item.load()` (or a picture check) for one unusable sample; the builder reports it."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def read_image_file(path: Path) -> bytes:
    """A picture file's bytes; a missing or unreadable file is a `missing_image` sample."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadSample("missing_image", f"image file {path} does not exist") from None
    except OSError as e:
        raise BadSample("missing_image", f"cannot read image file {path}: {e}") from None


@dataclass(slots=True)  # a corpus has ~100k of them alive between the two passes
class Item:
    """One image of a source. `caption_wheres`, when given, locates each caption (csv rows, txt lines)."""

    image_id: str
    split: str
    captions: list[str]
    where: str
    load: Callable[[], bytes]  # picture file bytes, or np.save bytes of float16 region features
    caption_wheres: list[str] | None = None
    group: str | None = None  # the input shard it came from; a change of group starts a new output shard
    features: bool = False  # load() gives region features (npy), not a picture
    objects: list[dict] | None = None  # ground truth of the picture's objects (RawSample.objects), if known


class Problems:
    """Counts skipped bad input per kind (`skip`) or raises InputError at the first (`stop`)."""

    def __init__(self, on_error: str = "skip"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def bad(self, kind: str, where: str, message: str) -> None:
        if kind not in BAD_KINDS:
            raise ValueError(f"unknown bad-input kind {kind!r}")
        text = f"{where}: {message}"
        if self.on_error == "stop":
            raise InputError(f"{kind}: {text} (--on-error skip would skip it and count it in the manifest)")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples.setdefault(kind, [])) < EXAMPLES_KEPT:
            self.examples[kind].append(text)

    def manifest(self) -> dict:
        """{kind: {"count": n, "examples": [first messages]}} in a fixed kind order."""
        return {k: {"count": self.counts[k], "examples": self.examples[k]} for k in BAD_KINDS if k in self.counts}


@dataclass(frozen=True)
class Source:
    """A `--source` kind: its own options (one argparse group) and its items in build order.

    `shared_options` names options of the build command's shared group (such as `images`) this source reads,
    so the manifest records exactly the options that shaped the set.
    """

    add_arguments: Callable[[argparse._ArgumentGroup], None]
    items: Callable[[argparse.Namespace, Problems], Iterator[Item]]
    shared_options: tuple[str, ...] = field(default=())


def safe_id(text: str) -> str:
    """An image id WebDataset can key on: no dots, slashes or spaces (they split or nest tar member names)."""
    return _ID_UNSAFE.sub("_", text.strip()).strip("_")


def split_assignment(text: str) -> tuple[str, str]:
    """argparse type for `SPLIT=VALUE` options."""
    split, sep, value = text.partition("=")
    split = split.strip()
    if not sep or not value.strip() or not _SPLIT_NAME.fullmatch(split):
        raise argparse.ArgumentTypeError(
            f"expected SPLIT=VALUE with SPLIT matching {_SPLIT_NAME.pattern}, got {text!r}")
    return split, value.strip()


def assignments(pairs: list[tuple[str, str]] | None, option: str) -> dict[str, str]:
    """Repeated SPLIT=VALUE options as a dict, refusing a split named twice."""
    out: dict[str, str] = {}
    for split, value in pairs or []:
        if split in out:
            raise InputError(f"{option}: split {split!r} given twice")
        out[split] = value
    return out


def split_names(text: str) -> list[str]:
    """argparse type for comma-separated split names."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if not _SPLIT_NAME.fullmatch(s)]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"split names must match {_SPLIT_NAME.pattern}, got {text!r}")
    return names


def require(path_text: str | None, option: str, source: str) -> str:
    if not path_text:
        raise InputError(f"--source {source} needs {option}")
    return path_text


def read_json_file(path: Path, option: str):
    """A UTF-8 JSON input file given by `option`; a missing or unreadable one is an InputError naming it."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise InputError(f"{option} {path} does not exist") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not a UTF-8 JSON file: {e}") from None

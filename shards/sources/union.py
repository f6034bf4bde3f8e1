"""`--source union`: several sources built as one shard set, with one concept and word vocabulary.

    python -m shards build --source union --union-parts builtin,emoji --out data/union --name union \
        --pos NOUN,ADJ --min-concept-count 3 --shard-size 400

The pretraining corpus of configs/pretrain_union.yaml. Each part is an ordinary source read with the same
options (`--emoji-limit`, `--train-images`, `--openmoji-dir`, ... each apply to their own part); its items keep
their splits, their ids get the part's name in front (`emoji_1f600`), and each part's pictures go to shards of
their own. The vocabularies are built from the union's train split, so a corpus held out of pretraining is
built afterwards with `--vocab-from data/union` and a model pretrained here starts on it with `model.init_from`
(docs/pretraining.md).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Iterator, Mapping

from shards.sources.base import InputError, Item, Problems, Source

NAME = "union"


def part_names(text: str) -> list[str]:
    """argparse type for --union-parts: comma-separated source names, each once (checked against the sources
    when the build starts, where the registry is complete)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated source names, each once, got {text!r}")
    return names


def union_source(sources: Mapping[str, Source]) -> Source:
    """The union of the parts named by --union-parts, read from `sources` (the build's registry)."""

    def add_arguments(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--union-parts", type=part_names, default=None, metavar="SOURCE,SOURCE",
                           help="the sources to build as one set (e.g. builtin,emoji,openmoji); each reads its own "
                                "options as when built alone")

    def items(args: argparse.Namespace, problems: Problems) -> Iterator[Item]:
        kind: tuple[str, bool] | None = None  # (part, features) of the first item: a set holds one kind
        for part in checked_parts(args, sources):
            for item in sources[part].items(args, problems):
                kind = kind or (part, item.features)
                if item.features != kind[1]:
                    raise InputError(f"--union-parts: {kind[0]} gives {_kind(kind[1])} and {part} "
                                     f"{_kind(item.features)}; a shard set holds one kind: build them as two sets")
                yield dataclasses.replace(
                    item, image_id=f"{part}_{item.image_id}", where=f"{part}: {item.where}",
                    group=part if item.group is None else f"{part}/{item.group}")

    return Source(add_arguments, items)


def checked_parts(args: argparse.Namespace, sources: Mapping[str, Source]) -> list[str]:
    """--union-parts, refused in one line when missing, naming an unknown source or the union itself."""
    parts, allowed = getattr(args, "union_parts", None), parts_allowed(sources)
    if not parts:
        raise InputError(f"--source {NAME} needs --union-parts SOURCE,SOURCE (from: {', '.join(allowed)})")
    unknown = [p for p in parts if p not in allowed]
    if unknown:
        raise InputError(f"--union-parts: {', '.join(unknown)} cannot be a part (parts: {', '.join(allowed)})")
    return parts


def _kind(features: bool) -> str:
    return "region features" if features else "pictures"


def parts_allowed(sources: Mapping[str, Source]) -> list[str]:
    return sorted(name for name in sources if name != NAME)

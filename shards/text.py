"""Words and the word vocabulary, shared by the shard builder and the trainer (a leaf: standard library only).

The shard builder writes `vocab.json` with `Vocab.to_json`; the trainer reads it with `Vocab.from_json` and
encodes captions with the very same `tokenize`, so both sides always agree on word ids.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

PAD = "<pad>"
UNK = "<unk>"
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and numbers; punctuation dropped."""
    return _WORD.findall(text.lower())


class Vocab:
    """Word <-> id table. Id 0 is padding, id 1 is the unknown word."""

    def __init__(self, words: list[str]):
        if words[:2] != [PAD, UNK]:
            raise ValueError(f"vocabulary must start with {PAD!r}, {UNK!r}; got {words[:2]}")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary has duplicate words")

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        ids = [self.index.get(w, 1) for w in tokenize(text)]
        if max_len is not None:
            ids = ids[:max_len]
        return ids or [1]  # an empty caption still has one (unknown) token, so lengths are never 0

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_size: int | None = None) -> "Vocab":
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            kept = kept[: max_size - 2]
        return cls([PAD, UNK] + kept)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"pad": 0, "unk": 1, "words": self.words}, indent=0))

    @classmethod
    def from_json(cls, path: str | Path) -> "Vocab":
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["words"])
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read word vocabulary {path}: {e}") from e

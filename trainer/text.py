"""Text utilities shared by the shard builder and the trainer: tokenisation, the word vocabulary, caption tokenizers.

The shard builder writes `vocab.json` with `Vocab.to_json`; the trainer reads it with `Vocab.from_json`
and encodes captions with the very same `tokenize`, so both sides always agree on word ids.

A `CaptionTokenizer` turns a caption into the token ids of one text encoder: `WordTokenizer` (the shard set's
word vocabulary, for the GRU) or `trainer.hf_text.TransformerTokenizer` (a transformer folder's own).
Training data, evaluation and retrieval queries all take theirs from `trainer.text_encoders.caption_tokenizer`.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Protocol

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


class CaptionTokenizer(Protocol):
    """Caption -> token ids of one text encoder, at most max_len of them and never none."""

    pad_id: int  # the id that right-pads a batch of captions
    max_len: int

    def encode(self, text: str) -> list[int]: ...


class WordTokenizer:
    """The shard set's word vocabulary (`tokenize` + `Vocab`), for the GRU text encoder."""

    def __init__(self, vocab: Vocab, max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        self.vocab = vocab
        self.max_len = max_len
        self.pad_id = vocab.index[PAD]

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(text, self.max_len)

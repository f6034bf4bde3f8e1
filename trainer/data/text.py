"""Caption tokenizers of the trainer's text encoders; words and the word vocabulary come from `shards.text`
(re-exported here), the leaf the shard builder uses too, so both sides always agree on word ids.

A `CaptionTokenizer` turns a caption into the token ids of one text encoder: `WordTokenizer` (the shard set's
word vocabulary, for the GRU) or `trainer.models.hf_text.TransformerTokenizer` (a transformer folder's own).
Training data, evaluation and retrieval queries all take theirs from `trainer.models.text_encoders.caption_tokenizer`.
"""
from __future__ import annotations

from typing import Protocol

from shards.text import PAD, UNK, Vocab, tokenize  # noqa: F401 (re-exported)


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

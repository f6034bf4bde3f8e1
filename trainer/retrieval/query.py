"""Retrieval queries: checked before the model sees them, then encoded as evaluation encodes captions/pictures.

A text query is refused when it has no words, or (word-vocabulary encoders) when none of its words is in the
model's vocabulary: the model would rank pictures for the unknown-word token alone, an arbitrary answer. A query
longer than the tokenizer's max_words is encoded cut, and the cut is reported. A picture query is refused, naming
the file, when it is missing, a folder, not a picture, or larger than data.max_image_pixels.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError

from trainer.data.collate import pad_tokens
from trainer.data.decode import RegionSpec, decode_image
from trainer.data.text import WordTokenizer, tokenize

ECHO_CHARS = 80  # a query echoed longer than this is shortened (the whole text is still what was encoded)


class QueryError(ValueError):
    """A query the model cannot answer meaningfully; the message says why."""


def shorten(text: str, limit: int = ECHO_CHARS) -> str:
    """The query as echoed: its first `limit` characters, and how long it was when cut."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_text(tokenizer, text: str) -> tuple[list[int], list[str]]:
    """Token ids for `text` and notes for the person asking (cut, unknown words); QueryError if unanswerable."""
    if not text.strip():
        raise QueryError("the query is empty: give a caption such as 'a red star on a blue square'")
    notes = []
    if isinstance(tokenizer, WordTokenizer):
        words = tokenize(text)
        if not words:
            raise QueryError(f"the query {shorten(text)!r} has no words (letters or digits)")
        unknown = sorted({w for w in words if w not in tokenizer.vocab.index})
        if len(unknown) == len(set(words)):
            raise QueryError(f"none of the words of {shorten(text)!r} is in the model's vocabulary "
                             f"({len(tokenizer.vocab)} words); use words its training captions use")
        if unknown:
            shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            notes.append(f"unknown words read as <unk>: {shown}")
        if len(words) > tokenizer.max_len:
            notes.append(f"cut to its first {tokenizer.max_len} of {len(words)} words (data.max_words)")
    else:  # a transformer's own tokenizer: sub-words, nothing unknown; only the length can be cut
        full = len(tokenizer.tokenizer(text)["input_ids"])
        if full > tokenizer.max_len:
            notes.append(f"cut to its first {tokenizer.max_len} of {full} tokens (data.max_words)")
    return tokenizer.encode(text), notes


def read_picture_file(path: str | Path) -> bytes:
    """The bytes of a picture file given on the command line, or QueryError naming it."""
    path = Path(path)
    if path.is_dir():
        raise QueryError(f"--image {path} is a folder, not a picture file")
    if not path.is_file():
        raise QueryError(f"--image {path} does not exist")
    try:
        return path.read_bytes()
    except OSError as e:
        raise QueryError(f"--image {path} cannot be read: {e.strerror}") from e


def decode_query_picture(data: bytes, name: str, image_size: int, max_pixels: int | None) -> torch.Tensor:
    """A picture query as the image encoder reads it, or QueryError naming `name`."""
    try:
        return decode_image(data, image_size, max_pixels, key=name)
    except UnidentifiedImageError:
        raise QueryError(f"{name} is not a picture (no format Pillow reads: PNG, JPEG, WebP, ...)") from None
    except Exception as e:  # PIL raises many types for a broken picture; the message is what matters
        reason = str(e).split(": ", 1)[-1] if str(e).startswith(name) else str(e)
        raise QueryError(f"{name} is not a picture this model can read ({reason[:200]})") from e


class QueryEncoder:
    """Encodes checked queries with one loaded run (trainer.evaluate.LoadedRun): load once, ask many times.
    One query at a time (a lock), so the search page's threads can share it."""

    def __init__(self, run, tokenizer):
        self.run, self.tokenizer = run, tokenizer
        self.model = run.model
        self.model.eval()
        self.device = next(iter(self.model.parameters())).device
        self.reads_regions = RegionSpec.from_config(run.cfg) is not None
        self._lock = threading.Lock()

    @torch.no_grad()
    def text(self, text: str) -> tuple[np.ndarray, list[str]]:
        ids, notes = check_text(self.tokenizer, text)
        tokens, lengths = pad_tokens([ids], self.tokenizer.pad_id)
        with self._lock:
            g, l = self.model.encode_text(tokens.to(self.device), lengths)
            return self.model.retrieval_vector(g, l)[0].float().cpu().numpy(), notes

    @torch.no_grad()
    def picture(self, data: bytes, name: str) -> np.ndarray:
        if self.reads_regions:
            raise QueryError(f"{name}: this run reads region features, not pictures (model.image_encoder=regions); "
                             f"query it with text, or with a run that has a picture encoder")
        cfg = self.run.cfg
        image = decode_query_picture(data, name, cfg.data.image_size, cfg.data.max_image_pixels)
        with self._lock:
            g, l = self.model.encode_image(image[None].to(self.device))
            return self.model.retrieval_vector(g, l)[0].float().cpu().numpy()

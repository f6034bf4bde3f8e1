"""Streaming WebDataset shards into training batches, and reading evaluation splits in order.

The trainer reads shard sets only through their documented format (DESIGN.md section 3): `manifest.json`,
`concepts.json`, `vocab.json` and tars of `{image_id}.{png,jpg,webp,npy}` + `{image_id}.json`.

Training stream, per worker of each rank:
  shard urls (resampled with replacement, or one deterministic pass split by rank then worker)
  -> tar members grouped into raw samples (bytes only)
  -> shuffle buffer of raw bytes (cheap to hold; decoding comes after the shuffle)
  -> decode: json, one random caption, tokens, picture -> tensors; a bad sample is counted and skipped
  -> full batches only (the loss needs a fixed n per rank to all-gather).
Every batch carries how many samples its worker read and how many it skipped since its last batch, so the
main process can count corrupt samples across worker processes and stop when they pass a bound.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.text import CaptionTokenizer, Vocab, WordTokenizer

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25
Image.MAX_IMAGE_PIXELS = 64_000_000  # a decompression bomb is refused, not decoded


def image_id_hash(image_id: str) -> int:
    """A stable 63-bit integer for a string image id, so ids can travel in tensors and be all-gathered."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


@dataclass
class ShardSet:
    """A shard-set folder: its manifest, concept vocabulary and word vocabulary."""

    root: Path
    manifest: dict
    concepts: list[str]
    vocab: Vocab

    @classmethod
    def open(cls, root: str | Path) -> "ShardSet":
        root = Path(root)
        manifest_path = root / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read shard-set manifest {manifest_path}: {e}") from e
        if manifest.get("format") != "hier-shards" or "splits" not in manifest:
            raise ValueError(f"{manifest_path} is not a hier-shards manifest (format/splits missing)")
        concepts_path = root / "concepts.json"
        try:
            entries = json.loads(concepts_path.read_text())["concepts"]
            concepts = [e["lemma"] for e in sorted(entries, key=lambda e: e["id"])]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read concept vocabulary {concepts_path}: {e}") from e
        return cls(root, manifest, concepts, Vocab.from_json(root / "vocab.json"))

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    def split_info(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise ValueError(f"split {split!r} not in {self.root / 'manifest.json'}")
        return self.manifest["splits"][split]

    def urls(self, split: str) -> list[str]:
        urls = [str(self.root / name) for name in self.split_info(split)["shards"]]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"shard files listed in {self.root / 'manifest.json'} are missing: {missing[:3]}")
        return urls


class BadSample(ValueError):
    """A sample that cannot be used; the message names it and says why."""


def decode_image(data: bytes, image_size: int) -> torch.Tensor:
    """Picture bytes -> normalised float tensor [3, S, S] (plain torch/PIL: torchvision is unavailable)."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    return pixels.sub_(PIXEL_MEAN).div_(PIXEL_STD)


def parse_meta(raw: bytes, key: str, num_concepts: int) -> dict:
    """The sample's json, checked: captions, concept ids in range."""
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise BadSample(f"{key}: malformed json: {e}") from e
    captions = meta.get("captions")
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise BadSample(f"{key}: json has no usable 'captions' list")
    caption_concepts = meta.get("caption_concepts")
    if not isinstance(caption_concepts, list) or len(caption_concepts) != len(captions):
        raise BadSample(f"{key}: 'caption_concepts' does not match 'captions'")
    image_concepts = meta.get("image_concepts")
    if not isinstance(image_concepts, list):
        raise BadSample(f"{key}: json has no 'image_concepts' list")
    for ids in [image_concepts, *caption_concepts]:
        if not all(isinstance(i, int) and 0 <= i < num_concepts for i in ids):
            raise BadSample(f"{key}: concept id out of range [0, {num_concepts}): {ids}")
    meta.setdefault("image_id", key)
    return meta


def _picture_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise BadSample(f"{sample.get('__key__')}: no picture member ({'/'.join(IMAGE_EXTS)})")


def multi_hot(id_lists: list[list[int]], num_concepts: int) -> torch.Tensor:
    out = torch.zeros(len(id_lists), num_concepts)
    for row, ids in enumerate(id_lists):
        if ids:
            out[row, ids] = 1.0
    return out


def pad_tokens(token_lists: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T] and lengths [B]."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    tokens = torch.full((len(token_lists), int(lengths.max())), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens, lengths


class _BadSampleCounter:
    """Counts skipped samples in a worker process and logs them at a limited rate."""

    def __init__(self) -> None:
        self.read = 0
        self.bad = 0

    def __call__(self, exn: Exception) -> bool:
        self.bad += 1
        if self.bad <= 10 or self.bad % 100 == 0:
            log.warning("skipping bad sample (%d so far in this worker): %s", self.bad, exn)
        return True  # webdataset: continue with the next sample


class TrainStream(IterableDataset):
    """Full batches of (picture, one random caption, labels) from the training shards of one rank."""

    def __init__(self, shardset: ShardSet, split: str, *, batch_size: int, image_size: int, max_words: int,
                 shuffle_buffer: int, resampled: bool, batches_per_worker: int, seed: int, rank: int,
                 world_size: int, tokenizer: CaptionTokenizer | None = None):
        """tokenizer: the text encoder's (trainer.text_encoders.caption_tokenizer); None = the shard set's words,
        cut at max_words."""
        self.urls = shardset.urls(split)
        self.tokenizer = tokenizer or WordTokenizer(shardset.vocab, max_words)
        self.num_concepts = shardset.num_concepts
        self.batch_size = batch_size
        self.image_size = image_size
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.batches_per_worker = batches_per_worker
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_urls(self, rng: random.Random, worker: int, num_workers: int) -> Iterator[dict]:
        if self.resampled:
            while True:
                yield {"url": rng.choice(self.urls)}
        # One pass: every rank shuffles the shard list identically, then takes its own disjoint share.
        order = list(self.urls)
        random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        for url in order[self.rank :: self.world_size][worker::num_workers]:
            yield {"url": url}

    def _decode(self, sample: dict, rng: random.Random) -> dict:
        key = sample.get("__key__", "?")
        if "json" not in sample:
            raise BadSample(f"{key} in {sample.get('__url__')}: no json member")
        meta = parse_meta(sample["json"], key, self.num_concepts)
        try:
            image = decode_image(_picture_bytes(sample), self.image_size)
        except BadSample:
            raise
        except Exception as e:  # PIL raises many types for broken pictures
            raise BadSample(f"{key} in {sample.get('__url__')}: undecodable picture: {e}") from e
        pick = rng.randrange(len(meta["captions"]))
        return {
            "image": image,
            "tokens": self.tokenizer.encode(meta["captions"][pick]),
            "image_id": image_id_hash(meta["image_id"]),
            "image_concepts": meta["image_concepts"],
            "caption_concepts": meta["caption_concepts"][pick],
        }

    def _collate(self, items: list[dict], counter: _BadSampleCounter, since: list[int]) -> dict:
        tokens, lengths = pad_tokens([it["tokens"] for it in items], self.tokenizer.pad_id)
        batch = {
            "images": torch.stack([it["image"] for it in items]),
            "tokens": tokens,
            "lengths": lengths,
            "image_ids": torch.tensor([it["image_id"] for it in items], dtype=torch.long),
            "image_concepts": multi_hot([it["image_concepts"] for it in items], self.num_concepts),
            "caption_concepts": multi_hot([it["caption_concepts"] for it in items], self.num_concepts),
            "n_read": torch.tensor(counter.read - since[0]),
            "n_bad": torch.tensor(counter.bad - since[1]),
        }
        since[:] = [counter.read, counter.bad]
        return batch

    def _shuffled(self, raw: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        """A shuffle buffer of raw (undecoded) samples."""
        buffer: list[dict] = []
        for sample in raw:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            slot = rng.randrange(len(buffer))
            buffer[slot], sample = sample, buffer[slot]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict]:
        """Batches, and at the end possibly one counts-only item ({"n_read", "n_bad"}, no "images")."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        counter = _BadSampleCounter()
        raw = wds.tarfile_to_samples(handler=counter)(self._shard_urls(rng, worker, num_workers))
        items: list[dict] = []
        since = [0, 0]
        produced = 0

        def take(sample: dict) -> Iterator[dict]:
            nonlocal produced
            counter.read += 1
            try:
                items.append(self._decode(sample, rng))
            except BadSample as e:
                counter(e)
                return
            if len(items) == self.batch_size:
                produced += 1
                yield self._collate(items, counter, since)
                items.clear()

        for sample in self._shuffled(raw, rng):
            if produced >= self.batches_per_worker:
                break
            yield from take(sample)
        # Bad samples met after the last full batch still have to reach the main process's count.
        if counter.read > since[0] or counter.bad > since[1]:
            yield {"n_read": torch.tensor(counter.read - since[0]), "n_bad": torch.tensor(counter.bad - since[1])}
        # A partial last batch is dropped: every step must see exactly batch_size rows per rank.


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the training threads


def train_batches(stream: TrainStream, num_workers: int, start_epoch: int = 0) -> Iterator[tuple[int, dict]]:
    """Endless (data_epoch, batch) pairs; a new virtual epoch re-seeds every worker."""
    epoch = start_epoch
    while True:
        stream.set_epoch(epoch)
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers, worker_init_fn=_worker_init,
                            prefetch_factor=4 if num_workers else None, pin_memory=torch.cuda.is_available())
        got_any = False
        pending = torch.zeros(2, dtype=torch.long)  # counts-only items are added to the next real batch
        for batch in loader:
            if "images" not in batch:
                pending += torch.stack([batch["n_read"], batch["n_bad"]])
                continue
            got_any = True
            batch["n_read"], batch["n_bad"] = batch["n_read"] + pending[0], batch["n_bad"] + pending[1]
            pending.zero_()
            yield epoch, batch
        if not got_any:
            raise RuntimeError(f"training stream produced no full batch in epoch {epoch}: too few samples "
                               f"for batch size {stream.batch_size}, or every sample was bad")
        epoch += 1


def batches_per_worker(samples_per_epoch: int, batch_size: int, num_workers: int) -> int:
    return max(1, math.ceil(samples_per_epoch / batch_size / max(1, num_workers)))


def check_shards_for_workers(num_shards: int, world_size: int, num_workers: int, split: str) -> None:
    """Without resampling every worker of every rank needs its own shard, or some read nothing."""
    needed = world_size * max(1, num_workers)
    if num_shards < needed:
        raise ValueError(f"split {split!r} has {num_shards} shards but {world_size} ranks x {max(1, num_workers)} "
                         f"workers need at least {needed}; rebuild with a smaller --shard-size, lower "
                         f"data.num_workers, or use data.resampled=true")


def iter_eval_samples(shardset: ShardSet, split: str, image_size: int, max_words: int,
                      rank: int = 0, world_size: int = 1, tokenizer: CaptionTokenizer | None = None) -> Iterator[dict]:
    """Every sample of a split's shards [rank::world_size], in order, with all captions tokenised by `tokenizer`
    (None = the shard set's words, cut at max_words)."""
    num_concepts = shardset.num_concepts
    tokenizer = tokenizer or WordTokenizer(shardset.vocab, max_words)
    for url in shardset.urls(split)[rank::world_size]:
        for sample in wds.tarfile_to_samples()([{"url": url}]):
            key = sample.get("__key__", "?")
            if "json" not in sample:
                raise BadSample(f"{key} in {url}: no json member")
            meta = parse_meta(sample["json"], key, num_concepts)
            yield {
                "image_id": meta["image_id"],
                "image": decode_image(_picture_bytes(sample), image_size),
                "captions": meta["captions"],
                "tokens": [tokenizer.encode(c) for c in meta["captions"]],
            }

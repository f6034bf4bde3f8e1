"""One rank's training stream: full batches of (picture or region features, one random caption, labels) decoded
from a raw-sample stream per worker (trainer.data.shardstream), an IterableDataset that trainer.data.loader's
TrainLoader reads for the whole run.

Per worker of each rank:
  shard urls (resampled with replacement, or one deterministic pass after another, split by rank then worker)
  -> tar members grouped into raw samples (bytes only)
  -> shuffle buffer of raw bytes (cheap to hold; decoding comes after the shuffle), filled once
  (those three in trainer.data.shardstream, which can save and restore their position)
  -> decode: json, one random caption, tokens, picture (trainer.data.pixels) or region features -> tensors; a bad
     sample is counted and skipped
  -> full batches only (the loss needs a fixed n per rank to all-gather).
With region features (`npy`, float16 [regions, dim]) a batch's "images" are the features right-padded to its
largest region count, [B, R, D], and "image_lengths" [B] holds each picture's count.
Every batch carries how many samples its worker read and how many it skipped since its last batch, per kind
of fault (BAD_KINDS), so the main process can count corrupt samples across worker processes and ranks, show
them in TensorBoard and stop when they pass a bound; a worker whose own samples pass that bound (BadSampleLimits)
ends its stream with a {"data_error"} record instead of reading bad samples forever. Nothing read from a shard
is unpickled: members stay bytes until json.loads or PIL decode them.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from shards.remote import RemoteReads
from trainer.data.collate import pad_tokens, stack_image_inputs
from trainer.data.decode import RegionSpec, decode_image_input
from trainer.data.pictures import RandomCrop
from trainer.data.samples import (
    BAD_KINDS,
    NO_BAD_SAMPLE_BOUND,
    BadSample,
    BadSampleCounter,
    BadSampleLimits,
    TooManyBadSamples,
    multi_hot,
    parse_meta,
)
from trainer.data.shardset import ShardSet, image_id_hash
from trainer.data.shardstream import Identity, RawStream, StreamState
from trainer.data.text import CaptionTokenizer, WordTokenizer


@dataclass(frozen=True)
class StreamSettings:
    """How a training stream batches, shuffles and decodes (trainer.training.factory.build_train_stream fills it
    from the data section and run.seed).

    epoch_samples: the epoch size, a global number of samples (all ranks together; 0 = the train split's
    pictures); it only labels batches with an epoch, nothing is rebuilt at its end. max_words: where the shard
    set's word tokenizer cuts a caption (a given tokenizer cuts on its own). crop: random resized crop of
    training pictures (None: short side resized, centre cropped). batches_per_worker: when the stream is
    iterated directly (tests, benchmarks), each worker stops after this many batches (None: no cap)."""

    batch_size: int
    image_size: int
    max_words: int
    shuffle_buffer: int
    resampled: bool
    seed: int
    epoch_samples: int = 0
    max_image_pixels: int = 64_000_000
    crop: RandomCrop | None = None
    batches_per_worker: int | None = None
    reads: RemoteReads = field(default_factory=RemoteReads)  # how shards at a URL are read (data.shard_*)


class TrainStream(IterableDataset):
    """Full batches from the training shards of one rank, each worker's stream able to save and restore its
    position. Iterated directly (tests, benchmarks) a worker stops after settings.batches_per_worker batches, and
    in one-pass mode (resampled=False) after one pass over its share of the shards; a last counts-only item
    ({"n_read", "n_bad", "bad_counts"}) then carries the bad samples met after the last full batch. The run's
    loader (trainer.data.loader.TrainLoader) reads every worker endlessly instead (worker_batches)."""

    def __init__(self, shardset: ShardSet, split: str, settings: StreamSettings, *, rank: int, world_size: int,
                 tokenizer: CaptionTokenizer | None = None, regions: RegionSpec | None = None,
                 mix: list[tuple[ShardSet, float]] = ()):
        """tokenizer: the text encoder's (trainer.models.text_encoders.caption_tokenizer); None = the shard set's
        words, cut at settings.max_words. regions: read npy region features instead of pictures. mix: more shard
        sets with their weights, `shardset` first (mix_sets); each batch then counts its samples per set
        ("set_counts")."""
        if mix and mix[0][0] is not shardset:
            raise ValueError("mix: the first entry must be the stream's own shard set")
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.regions = regions
        self.urls = shardset.urls(split)
        self.set_urls = [s.urls(split) for s, _ in mix] if mix else [self.urls]
        self.set_weights = [w for _, w in mix] if mix else [1.0]
        self.set_of_url = {url: i for i, urls in enumerate(self.set_urls) for url in urls}
        self.tokenizer = tokenizer or WordTokenizer(shardset.vocab, settings.max_words)
        self.num_concepts = shardset.num_concepts
        images = sum(s.split_info(split)["images"] for s, _ in mix) if mix else shardset.split_info(split)["images"]
        self.epoch_samples = settings.epoch_samples or images
        self.epoch = 0  # the epoch a directly iterated stream starts at (seeds its workers; the pass in one-pass mode)

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def epoch_batches(self) -> int:
        """Batches per rank in an epoch of epoch_samples global samples."""
        return max(1, math.ceil(self.epoch_samples / (self.settings.batch_size * self.world_size)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _decode(self, sample: dict, rng: random.Random, counter: BadSampleCounter) -> dict:
        counter.read += 1
        try:
            return self._decode_checked(sample, rng)
        except BadSample as e:
            e.url = sample.get("__url__")  # the counter names the shard
            raise

    def _decode_checked(self, sample: dict, rng: random.Random) -> dict:
        s = self.settings
        key = sample.get("__key__", "?")
        if "json" not in sample:
            raise BadSample(f"{key} in {sample.get('__url__')}: no json member", "missing_json")
        meta = parse_meta(sample["json"], key, self.num_concepts)
        image = decode_image_input(sample, s.image_size, self.regions, s.max_image_pixels, s.crop, rng)
        pick = rng.randrange(len(meta["captions"]))
        source = self.set_of_url.get(sample.get("__url__"), 0)
        # Two corpora may both have a "000001.jpg": with a mix, ids are made distinct per set, or the loss would
        # take different pictures for one and never use them as each other's negatives.
        image_id = meta["image_id"] if len(self.set_urls) == 1 else f"{source}:{meta['image_id']}"
        return {
            "image": image,
            "tokens": self.tokenizer.encode(meta["captions"][pick]),
            "image_id": image_id_hash(image_id),
            "image_concepts": meta["image_concepts"],
            "caption_concepts": meta["caption_concepts"][pick],
            "set": source,
        }

    def _collate(self, items: list[dict], counter: BadSampleCounter, since: list) -> dict:
        tokens, lengths = pad_tokens([it["tokens"] for it in items], self.tokenizer.pad_id)
        return {
            **stack_image_inputs([it["image"] for it in items], self.regions),
            "tokens": tokens,
            "lengths": lengths,
            "image_ids": torch.tensor([it["image_id"] for it in items], dtype=torch.long),
            "image_concepts": multi_hot([it["image_concepts"] for it in items], self.num_concepts),
            "caption_concepts": multi_hot([it["caption_concepts"] for it in items], self.num_concepts),
            "set_counts": torch.bincount(torch.tensor([it["set"] for it in items]), minlength=len(self.set_urls)),
            **counter.counts_since(since),
        }

    def raw_stream(self, worker: int, num_workers: int, counter: BadSampleCounter, endless: bool,
                   start_epoch: int) -> RawStream:
        """The raw-sample stream of one worker of this rank (any identity: the benchmark simulates many)."""
        s = self.settings
        passes = None if endless or s.resampled else 1
        return RawStream(self.set_urls, self.set_weights, s.resampled, s.shuffle_buffer,
                         Identity(self.rank, self.world_size, worker, num_workers, s.seed), handler=counter,
                         on_shard=counter.new_shard, passes=passes, start_pass=start_epoch, reads=s.reads)

    def worker_batches(self, worker: int, num_workers: int, state: StreamState | None = None, *,
                       endless: bool = False, start_epoch: int | None = None,
                       limits: BadSampleLimits = NO_BAD_SAMPLE_BOUND) -> Iterator[dict]:
        """The batches of one worker: each carries "worker" (its role), "stream_state" (where its stream stands
        after it) and "raw_read" (raw samples taken from shards since the worker's last batch, a filling shuffle
        buffer's included: what read amplification is measured by); the first one after a restore also
        "restore_bytes" and "restore_seconds". endless: passes after passes and no batches_per_worker cap (the
        run's loader). start_epoch: the pass a fresh stream starts at (None: the stream's epoch). limits: when too
        many bad samples end the stream (judged here, where they are read, so that a stream that yields no good
        sample cannot spin forever): its last item is then {"data_error": the one-line message}."""
        counter = BadSampleCounter(limits, who=f"worker {worker} of rank {self.rank}")
        try:
            yield from self._batches(worker, num_workers, state, counter, endless, start_epoch)
        except TooManyBadSamples as e:  # crosses the worker process boundary as a record, not a wrapped traceback
            yield {"data_error": str(e), "worker": torch.tensor(worker)}

    def _batches(self, worker: int, num_workers: int, state: StreamState | None, counter: BadSampleCounter,
                 endless: bool, start_epoch: int | None) -> Iterator[dict]:
        start_epoch = self.epoch if start_epoch is None else start_epoch
        raw = self.raw_stream(worker, num_workers, counter, endless, start_epoch)
        produced, cost = 0, None
        if state is not None:
            cost = raw.restore(state)  # read when the first batch goes: a pipe: shard's skip is counted by then
            produced = state.batches
        # webdataset's map with a handler: a bad sample is counted and skipped. Batching is by hand: wds.batched
        # hands a batch on only after pulling the next sample, one sample past the position a checkpoint must hold.
        decoded = wds.map(lambda sample: self._decode(sample, raw.rng, counter), handler=counter)(raw.samples())
        items: list[dict] = []
        since: list = [0, [0] * len(BAD_KINDS)]
        cap = None if endless else self.settings.batches_per_worker
        raw_since = 0
        for item in decoded:
            items.append(item)
            if len(items) < self.settings.batch_size:
                continue
            produced += 1
            raw_read, raw_since = raw.read - raw_since, raw.read
            restored = {} if cost is None else {"restore_bytes": torch.tensor(cost.bytes),
                                                "restore_seconds": torch.tensor(cost.seconds)}
            yield {**self._collate(items, counter, since), **restored, "raw_read": torch.tensor(raw_read),
                   "worker": torch.tensor(worker), "stream_state": raw.state(produced)}
            items.clear()
            cost = None
            if cap is not None and produced - (state.batches if state else 0) >= cap:
                return
        # Bad samples met after the last full batch still have to reach the main process's count.
        if counter.read > since[0] or counter.bad > sum(since[1]):
            yield counter.counts_since(since)
        # A partial last batch is dropped: every step must see exactly batch_size rows per rank.

    def __iter__(self) -> Iterator[dict]:
        """Each DataLoader worker (or this process alone) runs its own worker's stream from the start."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for item in self.worker_batches(worker, num_workers):
            if "data_error" in item:
                raise TooManyBadSamples(item["data_error"])
            yield item

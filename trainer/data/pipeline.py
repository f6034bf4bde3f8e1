"""Streaming WebDataset shards into training batches, and reading evaluation splits in order.

The trainer reads shard sets only through their documented format (DESIGN.md section 3, defined once in
`shards.format`): `manifest.json`, `concepts.json`, `vocab.json` and tars of `{image_id}.{jpg,jpeg,png,webp,npy}`
+ `{image_id}.json`.

Training stream, per worker of each rank, one endless stream for the whole run (train_batches):
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
them in TensorBoard and stop when they pass a bound. Nothing read from a shard is unpickled: members stay
bytes until json.loads or PIL decode them.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import random
import signal
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.format import CONCEPTS, MANIFEST, PICTURE_EXTS, VOCAB, is_manifest
from trainer.data.pictures import RandomCrop, picture_tensor
from trainer.data.shardstream import Identity, RawStream, StreamState
from trainer.data.text import CaptionTokenizer, Vocab, WordTokenizer

log = logging.getLogger(__name__)

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
        manifest_path = root / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read shard-set manifest {manifest_path}: {e}") from e
        if not is_manifest(manifest):
            raise ValueError(f"{manifest_path} is not a hier-shards manifest (format/splits missing)")
        concepts_path = root / CONCEPTS
        try:
            entries = json.loads(concepts_path.read_text())["concepts"]
            concepts = [e["lemma"] for e in sorted(entries, key=lambda e: e["id"])]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read concept vocabulary {concepts_path}: {e}") from e
        return cls(root, manifest, concepts, Vocab.from_json(root / VOCAB))

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


# What can be wrong with a training sample; each kind is counted on its own (TensorBoard data/bad/<kind>).
BAD_KINDS = ("truncated_tar", "missing_json", "malformed_json", "empty_captions", "concept_out_of_range",
             "missing_image", "undecodable_image", "image_too_large", "other")


class BadSample(ValueError):
    """A sample that cannot be used; the message names it and says why, `kind` is one of BAD_KINDS."""

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind


def bad_kind(exn: Exception) -> str:
    """The BAD_KINDS entry of an exception met while reading a shard: anything not raised as a BadSample
    comes from webdataset's tar reading (a cut-off or unreadable tar)."""
    if isinstance(exn, BadSample):
        return exn.kind
    return "truncated_tar"  # webdataset's tar reader: tarfile.ReadError, EOFError, OSError on a cut-off file


def _open_picture(data: bytes, key: str) -> Image.Image:
    """PIL opens lazily: size and mode are known from the header, before any pixel is decoded."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadSample(f"{key}: picture too large: {e}", "image_too_large") from e


def _refuse_oversized(img: Image.Image, max_pixels: int, key: str) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise BadSample(f"{key}: picture of {width}x{height} pixels exceeds data.max_image_pixels={max_pixels}",
                        "image_too_large")


def check_picture_size(data: bytes, max_pixels: int, key: str) -> None:
    """Refuse a picture larger than max_pixels from its header alone, without decoding it."""
    try:
        with _open_picture(data, key) as img:
            _refuse_oversized(img, max_pixels, key)
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for broken pictures
        raise BadSample(f"{key}: undecodable picture: {e}", "undecodable_image") from e


@dataclass(frozen=True)
class RegionSpec:
    """What region features must look like for the model: [1..max_regions, dim]."""

    dim: int
    max_regions: int

    @classmethod
    def from_config(cls, cfg) -> "RegionSpec | None":
        """The spec of a `regions` model (trainer.config.Config), None for models that read pictures."""
        m = cfg.model
        return cls(m.region_dim, m.max_regions) if m.image_encoder == "regions" else None


def decode_features(data: bytes, key: str, spec: RegionSpec) -> torch.Tensor:
    """`npy` bytes (np.save of float16 [regions, dim]; no pickles) -> float16 tensor [regions, dim], checked."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises several types for a malformed file
        raise BadSample(f"{key}: unreadable npy region features: {e}", "undecodable_image") from e
    if array.ndim != 2 or array.shape[0] < 1 or not np.issubdtype(array.dtype, np.floating):
        raise BadSample(f"{key}: region features must be a float [regions, dim] array, got {array.dtype} "
                        f"{list(array.shape)}", "undecodable_image")
    regions, dim = array.shape
    if dim != spec.dim:
        raise BadSample(f"{key}: region features have dim {dim}, the model expects model.region_dim={spec.dim}",
                        "undecodable_image")
    if regions > spec.max_regions:
        raise BadSample(f"{key}: {regions} regions, more than model.max_regions={spec.max_regions}",
                        "undecodable_image")
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
        array = array.astype(np.float16)
    if not np.isfinite(array).all():
        raise BadSample(f"{key}: region features hold inf or NaN (in float16)", "undecodable_image")
    return torch.from_numpy(array)


def decode_image_input(sample: dict, image_size: int, regions: RegionSpec | None,
                       max_pixels: int | None = None, crop: RandomCrop | None = None,
                       rng: random.Random | None = None) -> torch.Tensor:
    """The sample's picture [3, S, S], or with `regions` its features [R, D]: what the image encoder reads.
    max_pixels, crop, rng: see decode_image."""
    key = f"{sample.get('__key__', '?')} in {sample.get('__url__', '?')}"
    if regions is not None:
        if "npy" not in sample:
            raise BadSample(f"{key}: no npy region features (model.image_encoder=regions reads feature shards, "
                            f"e.g. from `python -m trainer.extract_features`)", "missing_image")
        return decode_features(sample["npy"], key, regions)
    try:
        return decode_image(_picture_bytes(sample), image_size, max_pixels, key, crop, rng)
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for broken pictures
        raise BadSample(f"{key}: undecodable picture: {e}", "undecodable_image") from e


def pad_regions(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[R_i, D] tensors -> right-padded [B, max R_i, D] (zeros) and counts [B]."""
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    out = features[0].new_zeros(len(features), int(lengths.max()), features[0].shape[1])
    for row, f in enumerate(features):
        out[row, : f.shape[0]] = f
    return out, lengths


def stack_image_inputs(inputs: list[torch.Tensor], regions: RegionSpec | None) -> dict[str, torch.Tensor]:
    """A batch's image inputs: {"images"} for pictures, {"images", "image_lengths"} for region features."""
    if regions is None:
        return {"images": torch.stack(inputs)}
    features, lengths = pad_regions(inputs)
    return {"images": features, "image_lengths": lengths}


def check_image_input(shardset: ShardSet, split: str, regions: RegionSpec | None) -> None:
    """Reads the split's first sample and refuses, before training starts, a shard set whose samples do not hold
    what the model reads (pictures vs npy region features; the feature size)."""
    first = next(iter(wds.tarfile_to_samples()([{"url": shardset.urls(split)[0]}])), None)
    if first is None:
        raise ValueError(f"split {split!r} of {shardset.root}: its first shard holds no sample")
    has_features = "npy" in first
    where = f"{shardset.root} (split {split!r}, sample {first.get('__key__')})"
    if regions is None and has_features and not any(ext in first for ext in PICTURE_EXTS):
        raise ValueError(f"{where} holds npy region features, not pictures: use model.image_encoder=regions")
    if regions is not None:
        if not has_features:
            raise ValueError(f"{where} holds pictures, not npy region features: model.image_encoder=regions needs "
                             f"a feature shard set (python -m trainer.extract_features)")
        decode_features(first["npy"], where, regions)  # BadSample (a ValueError) names a wrong size


def decode_image(data: bytes, image_size: int, max_pixels: int | None = None, key: str = "picture",
                 crop: RandomCrop | None = None, rng: random.Random | None = None) -> torch.Tensor:
    """Picture bytes -> normalised float tensor [3, S, S] as trainer.data.pixels.picture_tensor makes it (transparency
    on white, aspect kept, JPEG draft; crop: random resized crop drawn with rng). With max_pixels a larger
    picture (a decompression bomb) is refused from its header, before decoding."""
    with _open_picture(data, key) as img:
        if max_pixels is not None:
            _refuse_oversized(img, max_pixels, key)
        return picture_tensor(img, image_size, crop, rng)


def parse_meta(raw: bytes, key: str, num_concepts: int) -> dict:
    """The sample's json, checked: captions, concept ids in range."""
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise BadSample(f"{key}: malformed json: {e}", "malformed_json") from e
    if not isinstance(meta, dict):
        raise BadSample(f"{key}: json is not an object", "malformed_json")
    captions = meta.get("captions")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise BadSample(f"{key}: json has no 'captions' list of strings", "malformed_json")
    if not captions or not all(c.strip() for c in captions):
        raise BadSample(f"{key}: empty caption list or an empty caption", "empty_captions")
    caption_concepts = meta.get("caption_concepts")
    if not isinstance(caption_concepts, list) or len(caption_concepts) != len(captions):
        raise BadSample(f"{key}: 'caption_concepts' does not match 'captions'", "malformed_json")
    image_concepts = meta.get("image_concepts")
    if not isinstance(image_concepts, list):
        raise BadSample(f"{key}: json has no 'image_concepts' list", "malformed_json")
    for ids in [image_concepts, *caption_concepts]:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadSample(f"{key}: concept ids are not a list of integers: {ids!r}", "malformed_json")
        if not all(0 <= i < num_concepts for i in ids):
            raise BadSample(f"{key}: concept id out of range [0, {num_concepts}): {ids}", "concept_out_of_range")
    meta.setdefault("image_id", key)
    return meta


def _picture_bytes(sample: dict) -> bytes:
    for ext in PICTURE_EXTS:
        if ext in sample:
            return sample[ext]
    raise BadSample(f"{sample.get('__key__')}: no picture member ({'/'.join(PICTURE_EXTS)})", "missing_image")


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
    """Counts skipped samples per kind in a worker process and logs them at a limited rate (the first 10,
    then every 100th), so a shard set full of broken samples cannot flood the log. A webdataset-style handler:
    called with the exception, it returns True (go on with the next sample or shard)."""

    def __init__(self) -> None:
        self.read = 0
        self.by_kind = [0] * len(BAD_KINDS)
        self.current_url_broken = False  # reset at each shard the stream opens (new_shard)

    def new_shard(self) -> None:
        self.current_url_broken = False

    @property
    def bad(self) -> int:
        return sum(self.by_kind)

    def __call__(self, exn: Exception, url: str | None = None) -> bool:
        kind = bad_kind(exn)
        url = url or getattr(exn, "url", None)
        if kind == "truncated_tar":
            if self.current_url_broken:
                return True  # one cut-off tar is reported once
            self.current_url_broken = True
            self.read += 1  # the sample the tar was cut inside was read and lost
        self.by_kind[BAD_KINDS.index(kind)] += 1
        bad = self.bad
        if bad <= 10 or bad % 100 == 0:
            where = f" (in {url})" if url and url not in str(exn) else ""
            log.warning("skipping bad sample (%s, %d so far in this worker): %s%s", kind, bad, exn, where)
        return True

    def counts_since(self, since: list) -> dict:
        """n_read, n_bad and bad_counts (per BAD_KINDS) since `since`, which is then moved to now."""
        by_kind = torch.tensor(self.by_kind, dtype=torch.long) - torch.tensor(since[1], dtype=torch.long)
        out = {"n_read": torch.tensor(self.read - since[0]), "n_bad": by_kind.sum(), "bad_counts": by_kind}
        since[:] = [self.read, list(self.by_kind)]
        return out


class TrainStream(IterableDataset):
    """Full batches of (picture or region features, one random caption, labels) from the training shards of one
    rank, each worker an endless stream (trainer.data.shardstream) that train_batches reads for the whole run.

    Iterated directly (tests, benchmarks) a worker stops after batches_per_worker batches (None: no cap), and in
    one-pass mode (resampled=False) after one pass over its share of the shards; a last counts-only item
    ({"n_read", "n_bad", "bad_counts"}) then carries the bad samples met after the last full batch.
    epoch_samples: the epoch size, a global number of samples (all ranks together; 0 = the train split's
    pictures); it only labels batches with an epoch (epoch_batches per rank), nothing is rebuilt at its end."""

    def __init__(self, shardset: ShardSet, split: str, *, batch_size: int, image_size: int, max_words: int,
                 shuffle_buffer: int, resampled: bool, seed: int, rank: int, world_size: int,
                 batches_per_worker: int | None = None, epoch_samples: int = 0,
                 tokenizer: CaptionTokenizer | None = None, max_image_pixels: int = 64_000_000,
                 regions: RegionSpec | None = None, mix: list[tuple[ShardSet, float]] = (),
                 crop: RandomCrop | None = None):
        """tokenizer: the text encoder's (trainer.models.text_encoders.caption_tokenizer); None = the shard set's words,
        cut at max_words. regions: read npy region features instead of pictures. mix: more shard sets with
        their weights, `shardset` first (mix_sets); each batch then counts its samples per set ("set_counts").
        crop: random resized crop of training pictures (None: short side resized, centre cropped)."""
        self.urls = shardset.urls(split)
        if mix and mix[0][0] is not shardset:
            raise ValueError("mix: the first entry must be the stream's own shard set")
        self.set_urls = [s.urls(split) for s, _ in mix] if mix else [self.urls]
        self.set_weights = [w for _, w in mix] if mix else [1.0]
        self.set_of_url = {url: i for i, urls in enumerate(self.set_urls) for url in urls}
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
        self.max_image_pixels = max_image_pixels
        self.regions = regions
        self.crop = crop
        images = sum(s.split_info(split)["images"] for s, _ in mix) if mix else shardset.split_info(split)["images"]
        self.epoch_samples = epoch_samples or images
        self.epoch = 0  # the epoch a fresh stream starts at (seeds its workers; the first pass in one-pass mode)
        self.endless = False  # set by train_batches: no cap, passes after passes
        self.resume_states: list = []  # per worker role: a StreamState to continue from, or None
        self.rotation = 0  # loader worker i plays role (i + rotation) % workers

    @property
    def epoch_batches(self) -> int:
        """Batches per rank in an epoch of epoch_samples global samples."""
        return max(1, math.ceil(self.epoch_samples / (self.batch_size * self.world_size)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _decode(self, sample: dict, rng: random.Random, counter: _BadSampleCounter) -> dict:
        counter.read += 1
        try:
            return self._decode_checked(sample, rng)
        except BadSample as e:
            e.url = sample.get("__url__")  # the counter names the shard
            raise

    def _decode_checked(self, sample: dict, rng: random.Random) -> dict:
        key = sample.get("__key__", "?")
        if "json" not in sample:
            raise BadSample(f"{key} in {sample.get('__url__')}: no json member", "missing_json")
        meta = parse_meta(sample["json"], key, self.num_concepts)
        image = decode_image_input(sample, self.image_size, self.regions, self.max_image_pixels, self.crop, rng)
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

    def _collate(self, items: list[dict], counter: _BadSampleCounter, since: list) -> dict:
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

    def raw_stream(self, worker: int, num_workers: int, counter: _BadSampleCounter) -> RawStream:
        """The raw-sample stream of one worker of this rank (any identity: the benchmark simulates many)."""
        passes = None if self.endless or self.resampled else 1
        return RawStream(self.set_urls, self.set_weights, self.resampled, self.shuffle_buffer,
                         Identity(self.rank, self.world_size, worker, num_workers, self.seed), handler=counter,
                         on_shard=counter.new_shard, passes=passes, start_pass=self.epoch)

    def worker_batches(self, worker: int, num_workers: int, state: StreamState | None = None) -> Iterator[dict]:
        """The batches of one worker: each carries "worker" (its role), "stream_state" (where its stream stands
        after it) and "raw_read" (raw samples taken from shards since the worker's last batch, a filling shuffle
        buffer's included: what read amplification is measured by); the first one after a restore also
        "restore_bytes" and "restore_seconds"."""
        counter = _BadSampleCounter()
        raw = self.raw_stream(worker, num_workers, counter)
        produced, restored = 0, {}
        if state is not None:
            cost = raw.restore(state)
            produced = state.batches
            restored = {"restore_bytes": torch.tensor(cost.bytes), "restore_seconds": torch.tensor(cost.seconds)}
        # webdataset's map with a handler: a bad sample is counted and skipped. Batching is by hand: wds.batched
        # hands a batch on only after pulling the next sample, one sample past the position a checkpoint must hold.
        decoded = wds.map(lambda sample: self._decode(sample, raw.rng, counter), handler=counter)(raw.samples())
        items: list[dict] = []
        since: list = [0, [0] * len(BAD_KINDS)]
        cap = None if self.endless else self.batches_per_worker
        raw_since = 0
        for item in decoded:
            items.append(item)
            if len(items) < self.batch_size:
                continue
            produced += 1
            raw_read, raw_since = raw.read - raw_since, raw.read
            yield {**self._collate(items, counter, since), **restored, "raw_read": torch.tensor(raw_read),
                   "worker": torch.tensor(worker), "stream_state": raw.state(produced)}
            items.clear()
            restored = {}
            if cap is not None and produced - (state.batches if state else 0) >= cap:
                return
        # Bad samples met after the last full batch still have to reach the main process's count.
        if counter.read > since[0] or counter.bad > sum(since[1]):
            yield counter.counts_since(since)
        # A partial last batch is dropped: every step must see exactly batch_size rows per rank.

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        role = (worker + self.rotation) % num_workers
        state = self.resume_states[role] if self.resume_states else None
        yield from self.worker_batches(role, num_workers, state)


def _worker_init(worker_id: int, starts=None) -> None:
    if starts is not None:  # counted across processes: a loader rebuilt per epoch would show here
        with starts.get_lock():
            starts.value += 1
    torch.set_num_threads(1)  # decoding workers must not fight the training threads
    # A preemption signal sent to the whole process group (SLURM, a terminal) is for the training process, which
    # checkpoints at the next step; a loader worker killed by it would crash that process first.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _stop_workers(batches) -> None:
    shutdown = getattr(batches, "_shutdown_workers", None)  # a DataLoader iterator with worker processes
    if shutdown is not None:
        shutdown()


class train_batches:  # noqa: N801 (a function to its callers: train_batches(stream, workers) -> iterator)
    """Endless (data_epoch, batch) pairs from ONE DataLoader whose workers live for the whole run.

    Each worker's stream never ends: an epoch is only a label, epoch = batches so far // stream.epoch_batches,
    so nothing is rebuilt and no shuffle buffer is refilled at an epoch's end (webdataset's with_epoch, as
    OpenCLIP uses it, starts every worker's pipeline, buffer included, anew each epoch). The DataLoader takes
    batches from its workers in turn, so batch j of the run came from worker role j % workers; `state_dict()`
    holds every role's stream position after its last batch handed out here (batches prefetched but not handed
    out are made again after a resume).

    start_epoch: where a fresh stream starts (its seeds). resume: a state_dict() of the same world size and worker
    count, to continue exactly; its cost (bytes re-read, seconds) is logged and kept in `resume_cost`."""

    def __init__(self, stream: TrainStream, num_workers: int, start_epoch: int = 0, resume: dict | None = None):
        workers = max(1, num_workers)
        if resume is not None and resume["num_workers"] != workers:
            raise ValueError(f"the saved data position is of {resume['num_workers']} workers per rank, this run has "
                             f"{workers} (data.num_workers)")
        self.epoch_batches = stream.epoch_batches
        self.consumed = resume["batches"] if resume else start_epoch * self.epoch_batches
        self.states = [StreamState.from_dict(s) if s else None for s in resume["workers"]] if resume else \
            [None] * workers
        self.num_workers = workers
        run_stream = copy.copy(stream)
        run_stream.endless, run_stream.rotation = True, self.consumed % workers
        run_stream.resume_states = list(self.states)
        run_stream.set_epoch(resume["start_epoch"] if resume else start_epoch)
        self.start_epoch = run_stream.epoch
        self.starts = multiprocessing.Value("i", 0)
        self.started = time.perf_counter()
        self.first_batch_seconds: float | None = None
        self._to_restore = {i for i, s in enumerate(self.states) if s is not None}
        self.resume_cost = {"bytes": 0, "seconds": 0.0, "workers": len(self._to_restore)} if resume else None
        self.loader = DataLoader(run_stream, batch_size=None, num_workers=num_workers,
                                 worker_init_fn=functools.partial(_worker_init, starts=self.starts),
                                 persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
                                 pin_memory=torch.cuda.is_available())
        self._batches = iter(self.loader)
        # Workers ignore SIGTERM (see _worker_init), so multiprocessing's exit hook, which terminates and joins
        # them, would wait forever: they are asked to stop first, at close() or when this object goes (also at exit).
        self._finalizer = weakref.finalize(self, _stop_workers, self._batches)

    def close(self) -> None:
        self._finalizer()

    @property
    def worker_starts(self) -> int:
        return self.starts.value

    def __iter__(self) -> "train_batches":
        return self

    def __next__(self) -> tuple[int, dict]:
        batch = next(self._batches)
        if "images" not in batch:
            raise RuntimeError("a training stream ended: its workers' streams must be endless")
        role = int(batch.pop("worker"))
        self.states[role] = batch.pop("stream_state")
        if "restore_bytes" in batch:
            self._restored(role, int(batch.pop("restore_bytes")), float(batch.pop("restore_seconds")))
        if self.first_batch_seconds is None:
            self.first_batch_seconds = time.perf_counter() - self.started
        epoch = self.consumed // self.epoch_batches
        self.consumed += 1
        return epoch, batch

    def _restored(self, role: int, nbytes: int, seconds: float) -> None:
        self.resume_cost["bytes"] += nbytes
        self.resume_cost["seconds"] = max(self.resume_cost["seconds"], seconds)  # workers restore side by side
        self._to_restore.discard(role)
        if not self._to_restore:
            self.resume_cost["first_batch_seconds"] = time.perf_counter() - self.started
            log.info("data stream back in position: %.1f MB re-read by %d workers in %.2f s (first batch after "
                     "%.2f s)", self.resume_cost["bytes"] / 1e6, self.resume_cost["workers"],
                     self.resume_cost["seconds"], self.resume_cost["first_batch_seconds"])

    def state_dict(self) -> dict:
        """Plain values (torch.save / weights_only load): batches handed out, worker count, the epoch fresh
        streams started at, each worker role's stream position (None: that role has not moved yet)."""
        return {"batches": self.consumed, "num_workers": self.num_workers, "start_epoch": self.start_epoch,
                "workers": [s.to_dict() if s is not None else None for s in self.states]}


def mix_sets(shardset: ShardSet, extra_roots: list[str], weights: list[float], split: str) -> list[tuple[ShardSet, float]]:
    """[(shard set, share of the training samples)] for data.mix_shards, `shardset` first; [] without a mix.
    The sets must share one concept and word vocabulary: labels and token ids mean the same in every batch."""
    if not extra_roots:
        return []
    sets = [shardset] + [ShardSet.open(root) for root in extra_roots]
    for extra in sets[1:]:
        for what, file, same in (("concept", "concepts.json", extra.concepts == shardset.concepts),
                                 ("word", "vocab.json", extra.vocab.words == shardset.vocab.words)):
            if not same:
                raise ValueError(f"{extra.root / file}: its {what} vocabulary differs from {shardset.root / file}; "
                                 f"build the set with `python -m shards build ... --vocab-from {shardset.root}`")
    weights = weights or [s.split_info(split)["images"] for s in sets]
    total = float(sum(weights))
    return [(s, w / total) for s, w in zip(sets, weights)]


def check_shards_for_workers(num_shards: int, world_size: int, num_workers: int, split: str) -> None:
    """Without resampling every worker of every rank needs its own shard, or some read nothing."""
    needed = world_size * max(1, num_workers)
    if num_shards < needed:
        raise ValueError(f"split {split!r} has {num_shards} shards but {world_size} ranks x {max(1, num_workers)} "
                         f"workers need at least {needed}; rebuild with a smaller --shard-size, lower "
                         f"data.num_workers, or use data.resampled=true")


def iter_eval_samples(shardset: ShardSet, split: str, image_size: int, max_words: int,
                      rank: int = 0, world_size: int = 1, tokenizer: CaptionTokenizer | None = None,
                      regions: RegionSpec | None = None) -> Iterator[dict]:
    """Every sample of a split's shards [rank::world_size], in order, with all captions tokenised by `tokenizer`
    (None = the shard set's words, cut at max_words); "image" is the picture, or with `regions` the region
    features [R, D]."""
    num_concepts = shardset.num_concepts
    tokenizer = tokenizer or WordTokenizer(shardset.vocab, max_words)
    for url in shardset.urls(split)[rank::world_size]:
        for sample in wds.tarfile_to_samples()([{"url": url}]):
            key = sample.get("__key__", "?")
            if "json" not in sample:
                raise BadSample(f"{key} in {url}: no json member", "missing_json")
            meta = parse_meta(sample["json"], key, num_concepts)
            yield {
                "image_id": meta["image_id"],
                "image": decode_image_input(sample, image_size, regions),
                "captions": meta["captions"],
                "tokens": [tokenizer.encode(c) for c in meta["captions"]],
            }

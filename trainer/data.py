"""Streaming WebDataset shards into training batches, and reading evaluation splits in order.

The trainer reads shard sets only through their documented format (DESIGN.md section 3, defined once in
`shards.format`): `manifest.json`, `concepts.json`, `vocab.json` and tars of `{image_id}.{jpg,jpeg,png,webp,npy}`
+ `{image_id}.json`.

Training stream, per worker of each rank:
  shard urls (resampled with replacement, or one deterministic pass split by rank then worker)
  -> tar members grouped into raw samples (bytes only)
  -> shuffle buffer of raw bytes (cheap to hold; decoding comes after the shuffle)
  -> decode: json, one random caption, tokens, picture (or region features) -> tensors; a bad sample is counted
     and skipped
  -> full batches only (the loss needs a fixed n per rank to all-gather).
With region features (`npy`, float16 [regions, dim]) a batch's "images" are the features right-padded to its
largest region count, [B, R, D], and "image_lengths" [B] holds each picture's count.
Every batch carries how many samples its worker read and how many it skipped since its last batch, per kind
of fault (BAD_KINDS), so the main process can count corrupt samples across worker processes and ranks, show
them in TensorBoard and stop when they pass a bound. Nothing read from a shard is unpickled: members stay
bytes until json.loads or PIL decode them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.format import CONCEPTS, MANIFEST, PICTURE_EXTS, VOCAB, is_manifest
from trainer.pixels import PIXEL_MEAN, PIXEL_STD
from trainer.text import CaptionTokenizer, Vocab, WordTokenizer

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
                       max_pixels: int | None = None) -> torch.Tensor:
    """The sample's picture [3, S, S], or with `regions` its features [R, D]: what the image encoder reads.
    max_pixels: see decode_image."""
    key = f"{sample.get('__key__', '?')} in {sample.get('__url__', '?')}"
    if regions is not None:
        if "npy" not in sample:
            raise BadSample(f"{key}: no npy region features (model.image_encoder=regions reads feature shards, "
                            f"e.g. from `python -m trainer.extract_features`)", "missing_image")
        return decode_features(sample["npy"], key, regions)
    try:
        return decode_image(_picture_bytes(sample), image_size, max_pixels, key)
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


def decode_image(data: bytes, image_size: int, max_pixels: int | None = None, key: str = "picture") -> torch.Tensor:
    """Picture bytes -> normalised float tensor [3, S, S] (plain torch/PIL: torchvision is unavailable). With
    max_pixels a larger picture (a decompression bomb) is refused from its header, before decoding."""
    with _open_picture(data, key) as img:
        if max_pixels is not None:
            _refuse_oversized(img, max_pixels, key)
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
    then every 100th), so a shard set full of broken samples cannot flood the log."""

    def __init__(self) -> None:
        self.read = 0
        self.by_kind = [0] * len(BAD_KINDS)
        self.current_url_broken = False  # reset by TrainStream's url generator at each shard it opens

    @property
    def bad(self) -> int:
        return sum(self.by_kind)

    def __call__(self, exn: Exception, url: str | None = None) -> bool:
        kind = bad_kind(exn)
        if kind == "truncated_tar":
            if self.current_url_broken:
                return True  # webdataset reports one cut-off tar twice (the member, then the next header)
            self.current_url_broken = True
            self.read += 1  # the sample the tar was cut inside was read and lost
        self.by_kind[BAD_KINDS.index(kind)] += 1
        bad = self.bad
        if bad <= 10 or bad % 100 == 0:
            where = f" (in {url})" if url and url not in str(exn) else ""
            log.warning("skipping bad sample (%s, %d so far in this worker): %s%s", kind, bad, exn, where)
        return True  # webdataset: continue with the next shard

    def counts_since(self, since: list) -> dict:
        """n_read, n_bad and bad_counts (per BAD_KINDS) since `since`, which is then moved to now."""
        by_kind = torch.tensor(self.by_kind, dtype=torch.long) - torch.tensor(since[1], dtype=torch.long)
        out = {"n_read": torch.tensor(self.read - since[0]), "n_bad": by_kind.sum(), "bad_counts": by_kind}
        since[:] = [self.read, list(self.by_kind)]
        return out


class TrainStream(IterableDataset):
    """Full batches of (picture or region features, one random caption, labels) from the training shards of one
    rank. `regions`: read npy region features of that shape instead of pictures."""

    def __init__(self, shardset: ShardSet, split: str, *, batch_size: int, image_size: int, max_words: int,
                 shuffle_buffer: int, resampled: bool, batches_per_worker: int, seed: int, rank: int,
                 world_size: int, tokenizer: CaptionTokenizer | None = None, max_image_pixels: int = 64_000_000,
                 regions: RegionSpec | None = None, mix: list[tuple[ShardSet, float]] = ()):
        """tokenizer: the text encoder's (trainer.text_encoders.caption_tokenizer); None = the shard set's words,
        cut at max_words. regions: read npy region features instead of pictures. mix: more shard sets with
        their weights, `shardset` first (mix_sets); each batch then counts its samples per set ("set_counts")."""
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
            raise BadSample(f"{key} in {sample.get('__url__')}: no json member", "missing_json")
        meta = parse_meta(sample["json"], key, self.num_concepts)
        image = decode_image_input(sample, self.image_size, self.regions, self.max_image_pixels)
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
        batch = {
            **stack_image_inputs([it["image"] for it in items], self.regions),
            "tokens": tokens,
            "lengths": lengths,
            "image_ids": torch.tensor([it["image_id"] for it in items], dtype=torch.long),
            "image_concepts": multi_hot([it["image_concepts"] for it in items], self.num_concepts),
            "caption_concepts": multi_hot([it["caption_concepts"] for it in items], self.num_concepts),
            "set_counts": torch.bincount(torch.tensor([it["set"] for it in items]), minlength=len(self.set_urls)),
            **counter.counts_since(since),
        }
        return batch

    def _mixed_samples(self, rng: random.Random, counter, tracked) -> Iterator[dict]:
        """Raw samples of several shard sets, each drawn from set i with probability set_weights[i]: one
        resampled shard stream per set, interleaved sample by sample (a per-shard choice would weight sets by
        their shard sizes, not by samples)."""
        def resampled(urls: list[str]) -> Iterator[dict]:
            while True:
                yield {"url": rng.choice(urls)}

        streams = [iter(wds.tarfile_to_samples(handler=counter)(tracked(resampled(urls)))) for urls in self.set_urls]
        sets = range(len(streams))
        while True:
            yield next(streams[rng.choices(sets, weights=self.set_weights)[0]])

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
        """Batches, and at the end possibly one counts-only item ({"n_read", "n_bad", "bad_counts"}, no "images")."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        counter = _BadSampleCounter()
        def tracked(urls: Iterator[dict]) -> Iterator[dict]:
            for source in urls:
                counter.current_url_broken = False
                yield source

        if len(self.set_urls) == 1:
            raw = wds.tarfile_to_samples(handler=counter)(tracked(self._shard_urls(rng, worker, num_workers)))
        else:
            raw = self._mixed_samples(rng, counter, tracked)
        items: list[dict] = []
        since: list = [0, [0] * len(BAD_KINDS)]
        produced = 0

        def take(sample: dict) -> Iterator[dict]:
            nonlocal produced
            counter.read += 1
            try:
                items.append(self._decode(sample, rng))
            except BadSample as e:
                counter(e, sample.get("__url__"))
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
        if counter.read > since[0] or counter.bad > sum(since[1]):
            yield counter.counts_since(since)
        # A partial last batch is dropped: every step must see exactly batch_size rows per rank.


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the training threads
    # A preemption signal sent to the whole process group (SLURM, a terminal) is for the training process, which
    # checkpoints at the next step; a loader worker killed by it would crash that process first.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def train_batches(stream: TrainStream, num_workers: int, start_epoch: int = 0,
                  skip_batches: int = 0) -> Iterator[tuple[int, dict]]:
    """Endless (data_epoch, batch) pairs; a new virtual epoch re-seeds every worker.

    skip_batches: batches of start_epoch already trained on (a resumed run). The stream of an epoch is a pure
    function of (seed, epoch, rank, worker), so reading and dropping them puts the run exactly where it stopped;
    their bad-sample counts were counted before the checkpoint and are dropped too."""
    epoch = start_epoch
    while True:
        stream.set_epoch(epoch)
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers, worker_init_fn=_worker_init,
                            prefetch_factor=4 if num_workers else None, pin_memory=torch.cuda.is_available())
        got_any = False
        # counts-only items are added to the next real batch
        pending = {"n_read": torch.tensor(0), "n_bad": torch.tensor(0),
                   "bad_counts": torch.zeros(len(BAD_KINDS), dtype=torch.long)}
        for batch in loader:
            if "images" not in batch:
                for key in pending:
                    pending[key] = pending[key] + batch[key]
                continue
            got_any = True
            if skip_batches > 0:
                skip_batches -= 1
                for key in pending:
                    pending[key] = torch.zeros_like(pending[key])
                continue
            for key in pending:
                batch[key] = batch[key] + pending[key]
                pending[key] = torch.zeros_like(pending[key])
            yield epoch, batch
        if not got_any:
            raise RuntimeError(f"training stream produced no full batch in epoch {epoch}: too few samples "
                               f"for batch size {stream.batch_size}, or every sample was bad")
        epoch += 1


def batches_per_worker(samples_per_epoch: int, batch_size: int, num_workers: int) -> int:
    return max(1, math.ceil(samples_per_epoch / batch_size / max(1, num_workers)))


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

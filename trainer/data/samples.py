"""What a training sample is made of and what can be wrong with one: the kinds of bad sample (BAD_KINDS), the
BadSample error, the per-worker counter of skipped samples with its bound (BadSampleLimits, TooManyBadSamples), the
checked json of a sample (parse_meta), its picture member (picture_bytes) and concept labels as multi-hot rows."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shards.format import PICTURE_EXTS
from shards.remote import redact_url
from usercli import UserError

log = logging.getLogger(__name__)

# What can be wrong with a training sample; each kind is counted on its own (TensorBoard data/bad/<kind>).
# New kinds go at the end: checkpoints keep the totals in this order (trainer.training.loop.restored_state pads).
BAD_KINDS = ("truncated_tar", "missing_json", "malformed_json", "empty_captions", "concept_out_of_range",
             "missing_image", "undecodable_image", "image_too_large", "other", "unreachable_shard")


class BadSample(ValueError):  # noqa: N818 (a sample the stream skips and counts, not an error of the program)
    """A sample that cannot be used; the message names it and says why, `kind` is one of BAD_KINDS."""

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind


class TooManyBadSamples(UserError, RuntimeError):  # noqa: N818 - named for what the user meets, like ConfigError
    """More than data.max_bad_fraction of the samples read were bad: the run ends with this one line (exit 2).
    A RuntimeError too, as the step's check of the agreed totals raised before it existed."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(redact_url(message), *args)  # a URL's password is never shown (shards.remote.redact_url)


@dataclass(frozen=True)
class BadSampleLimits:
    """When a worker gives up on its stream and how it reports what it skips. max_fraction, min_read: more than
    max_fraction of at least min_read samples read bad ends the stream (data.max_bad_fraction,
    data.bad_fraction_min_read; the default 1.0 never does). first_reported: bad samples logged one line each;
    after them, one line of counts per kind every report_every_s seconds (a set full of bad samples cannot flood
    the log)."""

    max_fraction: float = 1.0
    min_read: int = 1000
    first_reported: int = 10
    report_every_s: float = 30.0


NO_BAD_SAMPLE_BOUND = BadSampleLimits()  # counts and reports, never ends a stream (direct iteration, benchmarks)


def bad_kind(exn: Exception) -> str:
    """The BAD_KINDS entry of an exception met while reading a shard: anything not raised as a BadSample
    comes from webdataset's tar reading (a cut-off or unreadable tar)."""
    if isinstance(exn, BadSample):
        return exn.kind
    if getattr(exn, "kind", None) in BAD_KINDS:  # shards.remote.ShardUnreachableError: a URL past its retries
        return exn.kind
    return "truncated_tar"  # webdataset's tar reader: tarfile.ReadError, EOFError, OSError on a cut-off file


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
        raise BadSample(f"{key}: 'captions' is empty or holds an empty caption", "empty_captions")
    caption_concepts = meta.get("caption_concepts")
    if not isinstance(caption_concepts, list) or len(caption_concepts) != len(captions):
        raise BadSample(f"{key}: 'caption_concepts' does not match 'captions'", "malformed_json")
    image_concepts = meta.get("image_concepts")
    if not isinstance(image_concepts, list):
        raise BadSample(f"{key}: json has no 'image_concepts' list", "malformed_json")
    named = [("image_concepts", image_concepts)] + [(f"caption_concepts[{i}]", ids)
                                                    for i, ids in enumerate(caption_concepts)]
    for name, ids in named:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadSample(f"{key}: '{name}' is not a list of integer concept ids: {_short(ids)}", "malformed_json")
        if not all(0 <= i < num_concepts for i in ids):
            raise BadSample(f"{key}: '{name}' has a concept id out of range [0, {num_concepts}): {_short(ids)}",
                            "concept_out_of_range")
    image_id = meta.setdefault("image_id", key)  # a sample without one is known by its key
    if not isinstance(image_id, str) or not image_id.strip():
        # ids are hashed into tensors and keyed on in evaluation: a number, list or blank cannot stand for a picture
        raise BadSample(f"{key}: 'image_id' is not a non-empty string: {_short(image_id)}", "malformed_json")
    return meta


def _short(value, limit: int = 80) -> str:
    """A value's repr for a message, cut: a sample's json may hold megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def picture_bytes(sample: dict) -> bytes:
    """The bytes of the sample's picture member, whichever of the picture extensions it has."""
    for ext in PICTURE_EXTS:
        if ext in sample:
            return sample[ext]
    raise BadSample(f"{sample.get('__key__')}: no picture member ({'/'.join(PICTURE_EXTS)})", "missing_image")


def multi_hot(id_lists: list[list[int]], num_concepts: int) -> torch.Tensor:
    """Concept id lists -> float rows [len(id_lists), num_concepts] with 1.0 at each listed id."""
    out = torch.zeros(len(id_lists), num_concepts)
    for row, ids in enumerate(id_lists):
        if ids:
            out[row, ids] = 1.0
    return out


class BadSampleCounter:
    """Counts skipped samples per kind in a worker process and logs them at a limited rate (the first
    limits.first_reported one line each, then counts per kind every limits.report_every_s seconds), so a shard
    set full of broken samples cannot flood the log; past limits.max_fraction bad of at least limits.min_read
    read it raises TooManyBadSamples, naming the shard set and the kinds. A webdataset-style handler: called
    with the exception, it returns True (go on with the next sample or shard)."""

    def __init__(self, limits: BadSampleLimits = NO_BAD_SAMPLE_BOUND, who: str = "this worker") -> None:
        self.limits = limits
        self.who = who  # named in the messages: "worker 1 of rank 3"
        self.read = 0
        self.by_kind = [0] * len(BAD_KINDS)
        self.current_url_broken = False  # reset at each shard the stream opens (new_shard)
        self.last_bad = ""  # the last bad sample's message and its shard, for the summaries
        self.last_url: str | None = None
        self.unreported = [0] * len(BAD_KINDS)  # bad samples since the last summary line, per kind
        self.reported_at = time.monotonic()

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
        index = BAD_KINDS.index(kind)
        self.by_kind[index] += 1
        where = f" (in {url})" if url and url not in str(exn) else ""
        self.last_bad, self.last_url = redact_url(f"{exn}{where}", url), url or self.last_url
        self._report(kind, index)
        self._check_fraction()
        return True

    def _report(self, kind: str, index: int) -> None:
        bad = self.bad
        if bad <= self.limits.first_reported:
            log.warning("skipping bad sample (%s, %d so far in %s): %s", kind, bad, self.who, self.last_bad)
            self.reported_at = time.monotonic()
            return
        self.unreported[index] += 1
        if time.monotonic() - self.reported_at >= self.limits.report_every_s:
            counts = ", ".join(f"{k} {n}" for k, n in zip(BAD_KINDS, self.unreported) if n)
            log.warning("skipped %d more bad samples in %s (%s; %d of %d read so far), the last: %s",
                        sum(self.unreported), self.who, counts, bad, self.read, self.last_bad)
            self.unreported = [0] * len(BAD_KINDS)
            self.reported_at = time.monotonic()

    def _check_fraction(self) -> None:
        limits, bad = self.limits, self.bad
        if self.read < limits.min_read or bad <= limits.max_fraction * self.read:
            return
        counts = ", ".join(f"{kind} {n}" for kind, n in zip(BAD_KINDS, self.by_kind) if n)
        where = Path(self.last_url).parent if self.last_url else "data.shards"
        raise TooManyBadSamples(redact_url(
            f"{where}: {bad} of {self.read} samples read by {self.who} were bad ({bad / self.read:.2%} > "
            f"data.max_bad_fraction={limits.max_fraction}; {counts}; the last: {self.last_bad}); check the set with "
            f"`python -m shards check {where}` and rebuild it, or raise data.max_bad_fraction", self.last_url or ""))

    def counts_since(self, since: list) -> dict:
        """n_read, n_bad and bad_counts (per BAD_KINDS) since `since`, which is then moved to now."""
        by_kind = torch.tensor(self.by_kind, dtype=torch.long) - torch.tensor(since[1], dtype=torch.long)
        out = {"n_read": torch.tensor(self.read - since[0]), "n_bad": by_kind.sum(), "bad_counts": by_kind}
        since[:] = [self.read, list(self.by_kind)]
        return out

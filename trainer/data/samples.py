"""What a training sample is made of and what can be wrong with one: the kinds of bad sample (BAD_KINDS), the
BadSample error, the per-worker counter of skipped samples, the checked json of a sample (parse_meta), its picture
member (picture_bytes) and concept labels as multi-hot rows."""
from __future__ import annotations

import json
import logging

import torch

from shards.format import PICTURE_EXTS

log = logging.getLogger(__name__)

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

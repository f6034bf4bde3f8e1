"""Ground truth about the pictures that does not come from the captions' words, read from a shard set's
sample json (docs/design.md section 3): the built-in corpus stores the drawn objects ("objects"), from which the
plausible-match metric (trainer.eval.metrics.plausible_match_precision) decides which pictures are alike."""
from __future__ import annotations

import json
import tarfile

from shards.remote import open_shard


def split_objects(shardset, split: str, image_ids: list[str]) -> list[list[dict]] | None:
    """Each picture's "objects" in the order of image_ids; None when the split's samples do not have them."""
    found: dict[str, list[dict]] = {}
    for url in shardset.urls(split):
        with open_shard(url) as f, tarfile.open(fileobj=f, mode="r:") as tar:  # a local file or a URL
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                record = json.load(tar.extractfile(member))
                if "objects" not in record:
                    return None  # a source without ground truth: no metric rather than a partial one
                found[record["image_id"]] = record["objects"]
    missing = [i for i in image_ids if i not in found]
    if missing:
        raise ValueError(f"{len(missing)} embedded pictures of split {split!r} are not in its shards: {missing[:3]}")
    return [found[i] for i in image_ids]

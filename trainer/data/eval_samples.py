"""Reading an evaluation split: every sample of its shards in order (a rank's share), all captions tokenised."""
from __future__ import annotations

from typing import Iterator

import webdataset as wds

from trainer.data.decode import RegionSpec, decode_image_input
from trainer.data.samples import BadSample, parse_meta
from trainer.data.shardset import ShardSet
from trainer.data.text import CaptionTokenizer, WordTokenizer


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

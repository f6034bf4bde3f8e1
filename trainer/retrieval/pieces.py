"""Embed shard sets into retrieval-vector pieces, one piece per shard, on every rank, with bounded memory.

A piece is what one shard holds: INDEX/pieces/pNNNNNN.images.npy and .captions.npy (float32 rows
[sqrt(1 - a) g; sqrt(a) l], the model's `retrieval_vector`) and pNNNNNN.json (each picture's shard file, key, image
id and captions; written last, atomically, so it marks the piece complete). The plan numbers the shards of every set
in order, so an interrupted export that runs again skips the pieces already written (as `shards build
--resume` skips finished shards). Rank r embeds pieces r, r + world, ...; a rank holds one shard's vectors at
most. Samples are read and encoded as evaluation reads them (trainer.data's parse_meta and decode_image_input,
trainer.eval.evaluation's embed_batch); ranks make the same number of forward calls (dummy batches when a rank has
nothing left), because under ZeRO-3 each forward call gathers parameters collectively.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from trainer.data.collate import stack_image_inputs
from trainer.data.decode import decode_image_input
from trainer.data.samples import BadSample, parse_meta
from trainer.data.shardset import ShardSet
from trainer.distributed import all_reduce_max
from trainer.eval.evaluation import EmbedOptions, embed_batch  # the encoder calls evaluation makes, shared on purpose

log = logging.getLogger(__name__)
PIECES = "pieces"


def plan_pieces(sets: list[ShardSet], split: str) -> list[dict]:
    """One piece per shard of `split` in every set, numbered in order (the same sets give the same plan)."""
    plan = []
    for shardset in sets:
        for url in shardset.urls(split):
            plan.append({"piece": len(plan), "set": str(shardset.root), "split": split, "shard": url})
    return plan


def piece_path(out: Path, piece: int, suffix: str) -> Path:
    return Path(out) / PIECES / f"p{piece:06d}.{suffix}"


def piece_done(out: Path, piece: int) -> bool:
    return piece_path(out, piece, "json").is_file()


def _save_atomic(path: Path, data: bytes | np.ndarray) -> None:
    """Write under a temporary name, then rename: a killed export never leaves a half-written piece file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, data) if isinstance(data, np.ndarray) else f.write(data)
    tmp.replace(path)


class _Piece:
    """One shard's vectors and rows while it is embedded; written when the shard ends."""

    def __init__(self, entry: dict):
        self.entry = entry
        self.images: list[np.ndarray] = []
        self.captions: list[np.ndarray] = []
        self.rows: list[dict] = []
        self.skipped = 0

    def write(self, out: Path, dim: int) -> None:
        def stack(parts):
            return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, dim), np.float32)

        n = self.entry["piece"]
        _save_atomic(piece_path(out, n, "images.npy"), stack(self.images))
        _save_atomic(piece_path(out, n, "captions.npy"), stack(self.captions))
        record = {**self.entry, "images": self.rows, "skipped": self.skipped}
        _save_atomic(piece_path(out, n, "json"), json.dumps(record).encode())  # last: marks the piece done


def _shard_samples(entry: dict, num_concepts: int, image_size: int, tokenizer, regions, piece: _Piece):
    """The shard's samples decoded as evaluation decodes them; a bad sample is logged, counted and skipped."""
    url = entry["shard"]
    try:
        for sample in wds.tarfile_to_samples()([{"url": url}]):
            key = sample.get("__key__", "?")
            try:
                if "json" not in sample:
                    raise BadSample(f"{key} in {url}: no json member", "missing_json")
                meta = parse_meta(sample["json"], key, num_concepts)
                image = decode_image_input({**sample, "__url__": url}, image_size, regions)
            except BadSample as e:
                log.warning("skipped: %s", e)
                piece.skipped += 1
                continue
            yield {"key": key, "image_id": meta["image_id"], "image": image, "captions": meta["captions"],
                   "tokens": [tokenizer.encode(c) for c in meta["captions"]]}
    except (OSError, EOFError, ValueError) as e:  # a cut-off or unreadable tar (webdataset re-raises)
        raise ValueError(f"shard {url} cannot be read ({e}); check it with `python -m shards check`") from e


def _batches(todo: list[dict], shardsets: dict, image_size: int, tokenizer, regions, batch_size: int,
             out: Path, dim: int) -> Iterator[tuple[_Piece, list[dict], bool]]:
    """(piece, samples, last batch of the piece?) over this rank's pieces; an empty shard is written at once."""
    for entry in todo:
        piece = _Piece(entry)
        samples = _shard_samples(entry, shardsets[entry["set"]].num_concepts, image_size, tokenizer, regions, piece)
        chunk = [s for _, s in zip(range(batch_size), samples)]
        if not chunk:
            piece.write(out, dim)
            continue
        while chunk:
            following = [s for _, s in zip(range(batch_size), samples)]
            yield piece, chunk, not following
            chunk = following


@torch.no_grad()
def embed_pieces(model, shardsets: list[ShardSet], plan: list[dict], out: Path, options: EmbedOptions, *,
                 rank: int = 0, world: int = 1) -> int:
    """Write this rank's pieces of `plan` that are not written yet; returns how many it wrote. Every rank
    calls it (the forward calls are collective under ZeRO-3). The sets share one vocabulary (the run's): captions
    are tokenised by options.tokenizer, or the first set's words."""
    out = Path(out)
    tokenizer, regions = options.caption_tokenizer(shardsets[0].vocab), options.regions
    (out / PIECES).mkdir(parents=True, exist_ok=True)
    model.eval()
    device = next(iter(model.parameters())).device
    dim = model.embed_dim * (2 if model.local_space else 1)
    todo = [e for e in plan[rank::world] if not piece_done(out, e["piece"])]
    by_root = {str(s.root): s for s in shardsets}
    batches = _batches(todo, by_root, options.image_size, tokenizer, regions, options.batch_size, out, dim)
    dummy = options.dummy_inputs()
    written = 0
    while True:
        item = next(batches, None)
        if int(all_reduce_max(torch.tensor([0 if item is None else 1], device=device))[0]) == 0:
            break
        if item is None:  # keep collective forward calls in step with the ranks that still have data
            embed_batch(model, dummy, [tokenizer.encode("")], tokenizer.pad_id)
            continue
        piece, chunk, last = item
        image_inputs = stack_image_inputs([s["image"] for s in chunk], regions)
        token_lists = [t for s in chunk for t in s["tokens"]]
        img_g, img_l, cap_g, cap_l = embed_batch(model, image_inputs, token_lists, tokenizer.pad_id)
        piece.images.append(model.retrieval_vector(img_g, img_l).float().cpu().numpy())
        piece.captions.append(model.retrieval_vector(cap_g, cap_l).float().cpu().numpy())
        piece.rows.extend({"key": s["key"], "image_id": s["image_id"], "captions": s["captions"]} for s in chunk)
        if last:
            piece.write(out, dim)
            written += 1
            log.info("piece %d (%s): %d pictures", piece.entry["piece"], piece.entry["shard"], len(piece.rows))
    return written

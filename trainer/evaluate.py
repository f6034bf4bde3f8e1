"""Retrieval evaluation (DESIGN.md section 4): embed a split once, score by chunked matrix products.

Every rank embeds its share of the split's shards; the embeddings are gathered and scored once, on rank 0.
Ranks run the same number of forward calls (a rank that ran out of data embeds a dummy batch), because under
ZeRO-3 each forward call gathers partitioned parameters collectively.

Evaluate a finished run's last checkpoint on its test split:
    python -m trainer.evaluate --run runs/builtin --split test
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from trainer import metrics
from trainer.config import Config
from trainer.data import RegionSpec, ShardSet, iter_eval_samples, pad_tokens, stack_image_inputs
from trainer.distributed import DistInfo
from trainer.ground_truth import split_objects
from trainer.progress import ProgressBar, progress_enabled
from trainer.text import CaptionTokenizer, WordTokenizer
from trainer.text_encoders import caption_tokenizer

log = logging.getLogger(__name__)


def _embed_batch(model, image_inputs: dict, token_lists: list[list[int]], pad_id: int, dtype: torch.dtype):
    """image_inputs: {"images"} (pictures) or {"images", "image_lengths"} (region features)."""
    tokens, lengths = pad_tokens(token_lists, pad_id)
    device = next(iter(model.parameters())).device
    image_lengths = image_inputs.get("image_lengths")
    img_g, img_l = model.encode_image(image_inputs["images"].to(device=device, dtype=dtype),
                                      None if image_lengths is None else image_lengths.to(device))
    cap_g, cap_l = model.encode_text(tokens.to(device), lengths.to(device))
    return img_g, img_l, cap_g, cap_l


def _gather_rows(t: torch.Tensor | None, world: int) -> torch.Tensor | None:
    """Concatenate per-rank tensors of different lengths along dim 0 (pad to the longest, gather, trim)."""
    if t is None or world == 1:
        return t
    count = torch.tensor([t.shape[0]], dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])


@torch.no_grad()
def embed_split(model, shardset: ShardSet, split: str, *, image_size: int, max_words: int, batch_size: int,
                dtype: torch.dtype = torch.float32, rank: int = 0, world: int = 1,
                tokenizer: CaptionTokenizer | None = None, regions: RegionSpec | None = None) -> dict:
    """Embeddings of every picture and caption of a split, gathered on every rank (float32, CPU). Captions are
    tokenised by `tokenizer` (trainer.text_encoders.caption_tokenizer; None = the shard set's words). With
    `regions` the samples' npy region features are embedded instead of pictures."""
    was_training = model.training
    model.eval()
    tokenizer = tokenizer or WordTokenizer(shardset.vocab, max_words)
    samples = iter_eval_samples(shardset, split, image_size, max_words, rank, world, tokenizer, regions)
    bar = ProgressBar(shardset.split_info(split)["images"], f"embed {split}", unit="img", leave=False,
                      enabled=progress_enabled(rank))
    # what a rank that ran out of data embeds to keep its forward calls in step
    dummy = {"images": torch.zeros(1, 3, image_size, image_size)} if regions is None else \
        {"images": torch.zeros(1, 1, regions.dim), "image_lengths": torch.ones(1, dtype=torch.long)}
    out = {"img_g": [], "img_l": [], "cap_g": [], "cap_l": [], "cap_to_img": [], "image_ids": [], "captions": []}
    n_images = 0
    while True:
        chunk = [s for _, s in zip(range(batch_size), samples)]
        has_data = torch.tensor([len(chunk)], dtype=torch.long)
        if world > 1:
            dist.all_reduce(has_data, op=dist.ReduceOp.MAX)
        if int(has_data) == 0:
            break
        if not chunk:  # keep collective forward calls in step with the ranks that still have data
            _embed_batch(model, dummy, [tokenizer.encode("")], tokenizer.pad_id, dtype)
            continue
        image_inputs = stack_image_inputs([s["image"] for s in chunk], regions)
        token_lists = [t for s in chunk for t in s["tokens"]]
        img_g, img_l, cap_g, cap_l = _embed_batch(model, image_inputs, token_lists, tokenizer.pad_id, dtype)
        for key, value in (("img_g", img_g), ("img_l", img_l), ("cap_g", cap_g), ("cap_l", cap_l)):
            if value is not None:
                out[key].append(value.float().cpu())
        for i, s in enumerate(chunk):
            out["cap_to_img"].extend([n_images + i] * len(s["tokens"]))
            out["captions"].extend(s["captions"])
            out["image_ids"].append(s["image_id"])
        n_images += len(chunk)
        bar.update(len(chunk) * world)  # the ranks embed at about the same pace: count the split as a whole
    bar.close()
    model.train(was_training)

    result = {k: (torch.cat(v) if v else None) for k, v in out.items() if k in ("img_g", "img_l", "cap_g", "cap_l")}
    cap_to_img = torch.tensor(out["cap_to_img"], dtype=torch.long)
    if world > 1:
        # Caption -> image indices are local to a rank: shift each rank's by the images of the ranks before it.
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([n_images]))
        cap_to_img = cap_to_img + int(sum(int(c) for c in counts[:rank]))
        gathered_ids: list = [None] * world
        gathered_caps: list = [None] * world
        dist.all_gather_object(gathered_ids, out["image_ids"])
        dist.all_gather_object(gathered_caps, out["captions"])
        out["image_ids"] = [i for part in gathered_ids for i in part]
        out["captions"] = [c for part in gathered_caps for c in part]
    result = {k: _gather_rows(v, world) for k, v in result.items()}
    result["cap_to_img"] = _gather_rows(cap_to_img, world)
    result["image_ids"] = out["image_ids"]
    result["captions"] = out["captions"]
    return result


def score_embeddings(emb: dict, local_weight: float) -> dict:
    """R@K and rSum for the global, local and concatenated scores, plus chance level."""
    results = metrics.evaluate_embeddings(emb["img_g"], emb["img_l"], emb["cap_g"], emb["cap_l"],
                                          emb["cap_to_img"], local_weight=local_weight)
    per_image = torch.bincount(emb["cap_to_img"], minlength=emb["img_g"].shape[0])
    results["chance"] = metrics.chance_recalls(per_image)
    results["counts"] = {"images": int(emb["img_g"].shape[0]), "captions": int(emb["cap_g"].shape[0])}
    if emb.get("objects") is not None:  # PCME's plausible-match R-precision, where the shards know the objects
        results["pmrp"] = metrics.plausible_match_scores(emb["img_g"], emb["img_l"], emb["cap_g"], emb["cap_l"],
                                                         emb["cap_to_img"], metrics.object_classes(emb["objects"]),
                                                         local_weight)
    if emb["img_g"].shape[0] == 5000:  # the COCO 1K protocol beside 5K: the mean over five folds of 1,000
        results["folds_1k"] = metrics.fold_average(emb["img_g"], emb["img_l"], emb["cap_g"], emb["cap_l"],
                                                   emb["cap_to_img"], local_weight)
    return results


def evaluate_split(model, shardset: ShardSet, split: str, cfg, *, dtype=torch.float32, rank=0, world=1,
                   on_embeddings: Callable[[dict], None] | None = None) -> dict:
    """Recalls of a split; `on_embeddings` (e.g. TensorBoard's retrieval examples) sees embed_split's output."""
    emb = embed_split(model, shardset, split, image_size=cfg.data.image_size, max_words=cfg.data.max_words,
                      batch_size=cfg.data.eval_batch_size, dtype=dtype, rank=rank, world=world,
                      tokenizer=caption_tokenizer(cfg, shardset.vocab), regions=RegionSpec.from_config(cfg))
    if on_embeddings is not None:
        on_embeddings(emb)
    emb["objects"] = split_objects(shardset, split, emb["image_ids"])
    return score_embeddings(emb, cfg.model.local_score_weight)


def results_table(results: dict) -> str:
    scores = {k: v for k, v in results.items() if k in ("global", "local", "concat")}
    return metrics.format_table(scores, chance=results.get("chance"))


def write_results(results: dict, run_dir: Path, split: str, step: int) -> Path:
    path = Path(run_dir) / "eval" / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"split": split, "step": step, **results}, indent=2))
    return path


@dataclass
class LoadedRun:
    """A run's model restored from one checkpoint, inside its DeepSpeed engine."""

    cfg: Config
    info: DistInfo
    shardset: ShardSet
    engine: object  # deepspeed.DeepSpeedEngine
    load_path: str
    step: int

    @property
    def model(self):
        return self.engine.module


def load_run(run_dir: str | Path, checkpoint: str = "latest", overrides: list[str] = ()) -> LoadedRun:
    """Build the run's engine and load a checkpoint into it (any ZeRO stage); no optimizer/scheduler state.
    Leaves the process group up."""
    from trainer.config import load_config
    from trainer.distributed import init_distributed
    from trainer.engine import build_engine, deepspeed_config
    from trainer.train import build_model

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    info = init_distributed()
    shardset = ShardSet.open(cfg.data.shards)
    engine = build_engine(cfg, build_model(cfg, shardset), deepspeed_config(cfg, info.world_size))
    tag = None if checkpoint == "latest" else checkpoint
    load_path, client = engine.load_checkpoint(str(run_dir / "checkpoints"), tag=tag, load_optimizer_states=False,
                                               load_lr_scheduler_states=False)
    if load_path is None:
        raise FileNotFoundError(f"no checkpoint {checkpoint!r} in {run_dir / 'checkpoints'}")
    return LoadedRun(cfg, info, shardset, engine, str(load_path), int((client or {}).get("step", 0)))


def evaluate_run(run_dir: str | Path, split: str | None = None, checkpoint: str = "latest",
                 overrides: list[str] = ()) -> dict:
    """Evaluate one split of a run's checkpoint; rank 0 writes RUN/eval/<split>.json. Leaves the process group up
    (the caller may go on using it)."""
    from trainer.train import model_dtype

    run = load_run(run_dir, checkpoint, overrides)
    split = split or run.cfg.data.test_split
    results = evaluate_split(run.model, run.shardset, split, run.cfg, dtype=model_dtype(run.cfg),
                             rank=run.info.rank, world=run.info.world_size)
    if run.info.is_main:
        path = write_results(results, Path(run_dir), split, run.step)
        print(f"{split} split, checkpoint {run.load_path} (step {run.step}):\n{results_table(results)}\n"
              f"written to {path}")
    return results


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--run, --checkpoint, --split: which run, checkpoint and split a command reads (evaluate, retrieve export)."""
    parser.add_argument("--run", required=True, help="run folder written by trainer.train (has config.yaml)")
    parser.add_argument("--checkpoint", default="latest", help="checkpoint tag in RUN/checkpoints, or latest")
    parser.add_argument("--split", default=None, help="split to read (default: the config's test split)")


def main(argv: list[str] | None = None) -> int:
    from trainer.config import ConfigError
    from trainer.distributed import shutdown

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the run's config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        evaluate_run(args.run, args.split, args.checkpoint, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a hierarchical (global + local) image-text embedding with DeepSpeed, streaming WebDataset shards.

One process, no launcher (CPU or one GPU):
    python -m trainer.train --config configs/builtin.yaml
    python -m trainer.train --config configs/builtin.yaml train.steps=200 loss.labels=shuffled
Resume a killed run from its last checkpoint:
    python -m trainer.train --config configs/builtin.yaml --resume latest
Several processes: any launcher that sets RANK/WORLD_SIZE/LOCAL_RANK (deepspeed, torchrun, srun); see launch/.

Outputs in run.out_dir: config.yaml (resolved), checkpoints/ (DeepSpeed, with `latest`), tb/ (TensorBoard),
eval/<split>.json (R@K per score), train_log.jsonl (the logged scalars).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from trainer.config import Config, ConfigError, load_config, save_config
from trainer.data import (RegionSpec, ShardSet, TrainStream, batches_per_worker, check_image_input,
                          check_shards_for_workers, train_batches)
from trainer.distributed import DistInfo, all_reduce_sum, gather_no_grad, gather_with_grad, init_distributed, shutdown
from trainer.evaluate import evaluate_split, results_table, write_results
from trainer.loss import HierarchicalLoss
from trainer.model import HierarchicalEmbedder
from trainer.tblog import RunLogger

log = logging.getLogger("trainer")

EMBEDDING_KEYS = ("img_g", "img_l", "txt_g", "txt_l")
LABEL_KEYS = ("image_ids", "image_concepts", "caption_concepts")


def image_encoder_options(cfg: Config) -> dict:
    """The chosen image encoder's own settings from the model section."""
    m = cfg.model
    if m.image_encoder == "regions":
        return {"region_dim": m.region_dim, "max_regions": m.max_regions, "region_dropout": m.region_dropout}
    if m.image_encoder == "efficientnet_lite0":
        return {"trainable": m.backbone_trainable, "trainable_blocks": m.backbone_trainable_blocks,
                "weights": m.backbone_weights}
    return {}


def build_model(cfg: Config, shardset: ShardSet) -> HierarchicalEmbedder:
    m = cfg.model
    return HierarchicalEmbedder(
        vocab_size=len(shardset.vocab), num_concepts=shardset.num_concepts, embed_dim=m.embed_dim,
        image_encoder=m.image_encoder, cnn_width=m.cnn_width, image_size=cfg.data.image_size,
        word_dim=m.word_dim, gru_hidden=m.gru_hidden, gru_layers=m.gru_layers, max_words=cfg.data.max_words,
        pooling=m.pooling, local_space=cfg.loss.local != "none", local_score_weight=m.local_score_weight,
        concept_head=cfg.loss.concept_bce_weight > 0, image_encoder_options=image_encoder_options(cfg))


def build_loss(cfg: Config) -> HierarchicalLoss:
    lo = cfg.loss
    return HierarchicalLoss(margin=lo.margin, warmup_steps=lo.warmup_steps, local=lo.local,
                            local_weight=lo.local_weight, temperature=lo.temperature, local_margin=lo.local_margin,
                            concept_bce_weight=lo.concept_bce_weight, labels=lo.labels, seed=cfg.run.seed,
                            label_mass=lo.label_mass)


def model_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32


def gather_global_batch(out: dict, batch: dict) -> dict:
    """The global batch the loss scores against: embeddings with autograd, labels without."""
    gathered = {k: gather_with_grad(out[k]) for k in EMBEDDING_KEYS if k in out}
    gathered.update({k: gather_no_grad(batch[k]) for k in LABEL_KEYS})
    return gathered


def train_step(engine, loss_fn, batch: dict, step: int, info: DistInfo, dtype: torch.dtype,
               want_grad_norm: bool = False) -> dict:
    """One micro-step: forward on this rank's pairs, gather, loss of own rows vs all columns, backward."""
    device = info.device
    image_lengths = batch.get("image_lengths")  # region counts, with region features
    out = engine(batch["images"].to(device=device, dtype=dtype, non_blocking=True),
                 batch["tokens"].to(device, non_blocking=True), batch["lengths"].to(device, non_blocking=True),
                 None if image_lengths is None else image_lengths.to(device, non_blocking=True))
    labels = {k: batch[k].to(device, non_blocking=True) for k in LABEL_KEYS}
    gathered = gather_global_batch(out, labels)
    n = batch["images"].shape[0]
    logits = (out["img_concept_logits"], out["txt_concept_logits"]) if "img_concept_logits" in out else None
    losses = loss_fn(gathered, row_offset=info.rank * n, num_rows=n, step=step, concept_logits=logits)
    engine.backward(losses["loss"])
    stats = {k: v.detach() for k, v in losses.items()}
    if want_grad_norm and engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
        # DeepSpeed reports a grad norm only for its ZeRO optimizers; without ZeRO the grads are whole here.
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        stats["grad_norm"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    engine.step()
    return stats


def client_state(cfg: Config, step: int, samples: int, data_epoch: int) -> dict:
    return {"step": step, "samples": samples, "data_epoch": data_epoch, "config": cfg.to_dict(),
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}


def save_checkpoint(engine, cfg: Config, ckpt_dir: Path, step: int, samples: int, data_epoch: int,
                    info: DistInfo) -> None:
    """Every rank writes its shard; rank 0 then prunes old tags (DeepSpeed moves `latest` itself)."""
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step:07d}",
                           client_state=client_state(cfg, step, samples, data_epoch))
    if info.world_size > 1:
        torch.distributed.barrier()
    if info.is_main:
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def configure_threads(cfg: Config, info: DistInfo) -> None:
    if info.device.type == "cpu":
        threads = cfg.engine.threads or max(1, (os.cpu_count() or 1) // max(1, info.local_world_size))
        torch.set_num_threads(threads)


def train(cfg: Config) -> dict:
    info = init_distributed()
    from trainer.engine import backbone_lr, build_engine, deepspeed_config

    ds_config = deepspeed_config(cfg, info.world_size)  # refuses disagreeing batch sizes before any work
    d = cfg.data
    shardset = ShardSet.open(d.shards)
    split_info = shardset.split_info(d.train_split)
    if not d.resampled:
        check_shards_for_workers(len(split_info["shards"]), info.world_size, d.num_workers, d.train_split)
    regions = RegionSpec.from_config(cfg)
    check_image_input(shardset, d.train_split, regions)  # pictures vs region features, before any work
    configure_threads(cfg, info)
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    out_dir = Path(cfg.run.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    dtype = model_dtype(cfg)

    model = build_model(cfg, shardset)
    num_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them away
    loss_fn = build_loss(cfg)
    engine = build_engine(cfg, model, ds_config)
    tb = RunLogger(out_dir / "tb", enabled=info.is_main)
    tb.text("config", f"```\n{cfg.to_yaml()}\n```")
    tb.retrieval_layout(list(dict.fromkeys([cfg.data.eval_split, cfg.data.test_split])))

    step, samples, data_epoch = 0, 0, 0
    if cfg.run.resume:
        tag = None if cfg.run.resume == "latest" else cfg.run.resume
        load_path, state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"run.resume={cfg.run.resume}: no checkpoint found in {ckpt_dir}")
        step, samples, data_epoch = state["step"], state["samples"], state["data_epoch"] + 1
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        log.info("resumed from %s at step %d (%d samples seen)", load_path, step, samples)

    per_rank_epoch = d.samples_per_epoch or max(d.batch_size, split_info["images"] // info.world_size)
    stream = TrainStream(shardset, d.train_split, batch_size=d.batch_size, image_size=d.image_size,
                         max_words=d.max_words, shuffle_buffer=d.shuffle_buffer, resampled=d.resampled,
                         batches_per_worker=batches_per_worker(per_rank_epoch, d.batch_size, d.num_workers),
                         seed=cfg.run.seed, rank=info.rank, world_size=info.world_size, regions=regions)
    batches = train_batches(stream, d.num_workers, start_epoch=data_epoch)

    global_batch = d.batch_size * info.world_size
    if info.is_main:
        log.info("training %d steps, global batch %d (%d ranks x %d x accum %d), %.2fM parameters, %s",
                 cfg.train.steps, global_batch, info.world_size, d.batch_size, cfg.engine.grad_accum,
                 num_params / 1e6, cfg.engine.precision)

    sums: dict[str, torch.Tensor] = {}
    window = {"micro": 0, "data_wait": 0.0, "start": time.perf_counter()}
    bad_totals = torch.zeros(2, dtype=torch.long)  # read, bad (this rank)
    last_saved = -1
    log_path = out_dir / "train_log.jsonl"
    while step < cfg.train.steps:
        for _ in range(cfg.engine.grad_accum):
            t0 = time.perf_counter()
            data_epoch, batch = next(batches)
            window["data_wait"] += time.perf_counter() - t0
            bad_totals += torch.stack([batch["n_read"], batch["n_bad"]])
            log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
            engine.module.set_backbone_grad(step >= cfg.optim.backbone_freeze_steps)
            losses = train_step(engine, loss_fn, batch, step, info, dtype, want_grad_norm=log_now)
            grad_norm = losses.pop("grad_norm", None)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            window["micro"] += 1
        step += 1
        samples += global_batch * cfg.engine.grad_accum

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window["start"]
            read, bad = (int(x) for x in all_reduce_sum(bad_totals))
            scalars = {f"loss/{k}": float(v) / window["micro"] for k, v in sums.items()}
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            scalars.update({
                "train/lr": engine.get_lr()[0],
                "train/samples_per_s": global_batch * window["micro"] / elapsed,
                "train/data_wait_frac": window["data_wait"] / elapsed,
                "train/step_s": elapsed / (window["micro"] / cfg.engine.grad_accum),
                "train/bad_samples": bad,
                "train/data_epoch": data_epoch,
            })
            if grad_norm is not None:
                scalars["train/grad_norm"] = float(grad_norm)
            if (rate := backbone_lr(engine)) is not None:
                scalars["train/backbone_lr"] = rate
            if torch.cuda.is_available():
                scalars["train/max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            tb.scalars(step, scalars)
            if info.is_main:
                left_s = (cfg.train.steps - step) * scalars["train/step_s"]
                log.info("step %d/%d loss %.4f (global %.4f local %.4f) lr %.2e %.0f samples/s data wait %.0f%% "
                         "eta %dm%02ds", step, cfg.train.steps, scalars["loss/loss"],
                         scalars.get("loss/global", math.nan), scalars.get("loss/local", math.nan),
                         scalars["train/lr"], scalars["train/samples_per_s"], 100 * scalars["train/data_wait_frac"],
                         left_s // 60, left_s % 60)
                with log_path.open("a") as f:
                    f.write(json.dumps({"step": step, **scalars}) + "\n")
            if read >= 1000 and bad / read > d.max_bad_fraction:
                raise RuntimeError(f"{bad} of {read} samples read were bad ({bad / read:.2%} > "
                                   f"data.max_bad_fraction={d.max_bad_fraction}); see the warnings above")
            sums.clear()
            window.update(micro=0, data_wait=0.0, start=time.perf_counter())

        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            results = evaluate_split(engine.module, shardset, d.eval_split, cfg, dtype=dtype, rank=info.rank,
                                     world=info.world_size)
            tb.retrieval(step, d.eval_split, results)
            if info.is_main:
                write_results(results, out_dir, d.eval_split, step)
                log.info("step %d %s split:\n%s", step, d.eval_split, results_table(results))
        if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
            save_checkpoint(engine, cfg, ckpt_dir, step, samples, data_epoch, info)
            last_saved = step

    if last_saved != step:
        save_checkpoint(engine, cfg, ckpt_dir, step, samples, data_epoch, info)
    final = {}
    for split in dict.fromkeys([d.eval_split, d.test_split]):
        results = evaluate_split(engine.module, shardset, split, cfg, dtype=dtype, rank=info.rank,
                                 world=info.world_size)
        tb.retrieval(step, split, results)
        final[split] = results
        if info.is_main:
            path = write_results(results, out_dir, split, step)
            print(f"\n{split} split after {step} steps ({results['counts']['images']} images, "
                  f"{results['counts']['captions']} captions):\n{results_table(results)}\n(written to {path})",
                  flush=True)
    tb.hparams(cfg.to_dict(), final[d.test_split], d.test_split)
    tb.close()
    return final


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint tag (same as run.resume=...)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200 loss.labels=none")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"run.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

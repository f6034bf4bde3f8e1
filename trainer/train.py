"""Train a hierarchical (global + local) image-text embedding with DeepSpeed, streaming WebDataset shards.

One process, no launcher (CPU or one GPU):
    python -m trainer.train --config configs/builtin.yaml
    python -m trainer.train --config configs/builtin.yaml train.steps=200 loss.labels=shuffled
Resume a killed run from its last checkpoint:
    python -m trainer.train --config configs/builtin.yaml --resume latest
Several processes: any launcher that sets RANK/WORLD_SIZE/LOCAL_RANK (deepspeed, torchrun, srun); see launch/.

Outputs in run.out_dir: config.yaml (resolved), checkpoints/ (DeepSpeed, with `latest`), tb/ (TensorBoard),
eval/<split>.json (R@K per score), train_log.jsonl (the logged scalars).

Faults (each rank decides nothing alone: one all-reduce per step makes every rank take the same branch):
- SIGTERM or SIGUSR1 (SLURM's warning before the time limit): every rank writes a checkpoint at the next step
  boundary and exits 0; `--resume latest` continues from it. Exit code 2: a refused config or checkpoint.
- A step whose loss or gradient is not finite on any rank is skipped on all of them (no parameter or optimizer
  state changes); train.max_nonfinite_steps in a row stop the run, keeping the last checkpoint before them.
- Bad samples are skipped and counted per kind (TensorBoard data/bad/<kind>); past data.max_bad_fraction of
  the samples read, the run stops with an error.
- The data position (virtual epoch, batches into it, per rank) is in the checkpoint: a resumed run reads the
  batches the uninterrupted run would have read (re-reading and dropping the epoch's first ones), so on the same
  machine kind, world size, data.num_workers and engine.threads it ends with bit-identical parameters
  (tests/test_faults.py). That holds for data.resampled too: each worker's draws of shards, shuffle and caption
  picks come from a generator seeded by (run.seed, epoch, rank, worker), not from the run's history. Not
  reproduced: a resume on another world size or worker count (other shards per worker), timing scalars, and on
  GPUs any kernel or collective that sums in a varying order (then the runs agree to float rounding only).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.config import Config, ConfigError, load_config, save_config
from trainer.data import (BAD_KINDS, RegionSpec, ShardSet, TrainStream, batches_per_worker, check_image_input,
                          check_shards_for_workers, mix_sets, train_batches)
from trainer.distributed import (DistInfo, all_reduce_max, all_reduce_sum, gather_no_grad, gather_with_grad,
                                 init_distributed, shutdown)
from trainer.evaluate import evaluate_split, results_table, write_results
from trainer.loss import HierarchicalLoss
from trainer.model import HierarchicalEmbedder
from trainer.progress import ProgressBar, progress_enabled
from trainer.tblog import RunLogger
from trainer.text_encoders import caption_tokenizer, init_word_embeddings, pretrained_text_encoder

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
    """The model with its pretrained weights loaded (before DeepSpeed partitions anything)."""
    m = cfg.model
    model = HierarchicalEmbedder(
        vocab_size=len(shardset.vocab), num_concepts=shardset.num_concepts, embed_dim=m.embed_dim,
        image_encoder=m.image_encoder, cnn_width=m.cnn_width, image_size=cfg.data.image_size,
        word_dim=m.word_dim, gru_hidden=m.gru_hidden, gru_layers=m.gru_layers, max_words=cfg.data.max_words,
        pooling=m.pooling, local_space=cfg.loss.local != "none", local_score_weight=m.local_score_weight,
        concept_head=cfg.loss.concept_bce_weight > 0, text_encoder=pretrained_text_encoder(cfg),
        image_encoder_options=image_encoder_options(cfg))
    if m.word_vectors is not None:
        init_word_embeddings(model.text_encoder.embed, shardset.vocab, m.word_vectors)
    return model


def build_loss(cfg: Config) -> HierarchicalLoss:
    lo = cfg.loss
    return HierarchicalLoss(margin=lo.margin, warmup_steps=lo.warmup_steps, local=lo.local,
                            local_weight=lo.local_weight, temperature=lo.temperature, local_margin=lo.local_margin,
                            concept_bce_weight=lo.concept_bce_weight, labels=lo.labels, seed=cfg.run.seed,
                            label_mass=lo.label_mass, global_loss=lo.global_loss,
                            global_temperature=lo.global_temperature, global_label_margin=lo.global_label_margin,
                            global_exclude_above=lo.global_exclude_above)


def model_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32


def gather_global_batch(out: dict, batch: dict) -> dict:
    """The global batch the loss scores against: embeddings with autograd, labels without."""
    gathered = {k: gather_with_grad(out[k]) for k in EMBEDDING_KEYS if k in out}
    gathered.update({k: gather_no_grad(batch[k]) for k in LABEL_KEYS})
    return gathered


def local_grads_nonfinite(engine) -> bool:
    """Whether this rank's gradients hold inf/NaN, after backward at an accumulation boundary. Without ZeRO
    they are whole in p.grad; under ZeRO 1-3 they are partitioned and the optimizer's own check (a collective
    over the data-parallel group, so every rank calls it) reads its partitions."""
    if engine.zero_optimization_stage() >= 1 and hasattr(engine.optimizer, "has_overflow"):
        return bool(engine.optimizer.has_overflow(partition_gradients=True))
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def skip_optimizer_step(engine) -> None:
    """engine.step() with the optimizer's update left out: DeepSpeed still clears the gradients (of whatever
    ZeRO stage), counts the micro-steps and moves the LR schedule, but no parameter and no Adam moment or step
    count changes. The client optimizer (build_engine's torch AdamW) is the one every DeepSpeed wrapper calls."""
    inner = engine.client_optimizer
    own = vars(inner).get("step")  # the LR scheduler wraps step as an instance attribute
    inner.step = lambda *args, **kwargs: None
    try:
        engine.step()
    finally:
        if own is not None:
            inner.step = own
        else:
            del inner.step


def train_step(engine, loss_fn, batch: dict, step: int, info: DistInfo, dtype: torch.dtype,
               want_grad_norm: bool = False) -> dict:
    """One micro-step: forward on this rank's pairs, gather, loss of own rows vs all columns, backward; at the
    accumulation boundary the update, or (any rank's loss or gradient not finite) a skip on every rank.
    stats["skipped"]: 1.0 when the boundary's update was skipped."""
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
    boundary = engine.is_gradient_accumulation_boundary()
    if not boundary:
        # Mid-window: a non-finite loss here poisons the accumulated grads, which the boundary check sees.
        engine.step()
        return stats
    grads_bad = local_grads_nonfinite(engine)  # first and on every rank: under ZeRO it is a collective
    bad = grads_bad or not bool(torch.isfinite(stats["loss"]))
    bad = bool(all_reduce_max(torch.tensor([int(bad)], dtype=torch.long))[0])  # every rank the same branch
    stats["skipped"] = torch.tensor(float(bad))
    if bad:
        skip_optimizer_step(engine)
        return stats
    if want_grad_norm and engine.zero_optimization_stage() == 0:
        # DeepSpeed reports a grad norm only for its ZeRO optimizers; without ZeRO the grads are whole here.
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        stats["grad_norm"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    engine.step()
    return stats


class StopRequest:
    """Set by SIGTERM / SIGUSR1; the training loop checkpoints and leaves at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict = {}

    def _handler(self, signum: int, _frame) -> None:
        self.signal = signum

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        pid_dir = os.environ.get("TRAINER_PID_DIR")  # set by launch/*.sh to forward signals to the ranks
        if pid_dir and Path(pid_dir).is_dir():  # a node-local folder: absent on the other nodes
            Path(pid_dir, f"rank{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))
        return self

    def __exit__(self, *_exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class DataPosition:
    """Where this rank's stream is: the virtual epoch and how many of its batches were trained on."""

    def __init__(self, epoch: int = 0, batches: int = 0) -> None:
        self.epoch, self.batches = epoch, batches

    def advance(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0
        self.batches += 1


def client_state(cfg: Config, step: int, samples: int, positions: list[list[int]], counters: dict) -> dict:
    """Saved by rank 0 beside DeepSpeed's state. positions: [epoch, batches] of every rank (all-gathered);
    counters: the run's totals of bad samples (per kind), samples read and skipped steps, all ranks together."""
    return {"step": step, "samples": samples, "data_positions": positions, "counters": counters,
            "config": cfg.to_dict(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}


def save_checkpoint(engine, cfg: Config, ckpt_dir: Path, step: int, samples: int, position: DataPosition,
                    counters: dict, info: DistInfo) -> None:
    positions = gather_no_grad(torch.tensor([[position.epoch, position.batches]], dtype=torch.long)).tolist()
    checkpoint.save(engine, ckpt_dir, step, client_state(cfg, step, samples, positions, counters),
                    info.world_size, cfg.train.keep_checkpoints, info.is_main)


def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """model.init_from: the fp32 weights of `python -m trainer.export`."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model.init_from: cannot load {path} into this model: {e}") from e
    log.info("initial weights from %s (step %s of %s)", path, saved.get("step"), saved.get("run"))


def configure_threads(cfg: Config, info: DistInfo) -> None:
    if info.device.type == "cpu":
        threads = cfg.engine.threads or max(1, (os.cpu_count() or 1) // max(1, info.local_world_size))
        torch.set_num_threads(threads)


def train(cfg: Config) -> dict:
    """Train as configured; {split: results} at the end, or {"preempted": {"step", "signal"}} after a stop
    request (SIGTERM/SIGUSR1), whose handlers are in place from the start."""
    with StopRequest() as stop:
        return _train(cfg, stop)


def _train(cfg: Config, stop: StopRequest) -> dict:
    info = init_distributed()
    from trainer.engine import backbone_lr, build_engine, deepspeed_config

    ds_config = deepspeed_config(cfg, info.world_size)  # refuses disagreeing batch sizes before any work
    d = cfg.data
    shardset = ShardSet.open(d.shards)
    split_info = shardset.split_info(d.train_split)
    shardset.urls(d.train_split)  # refuses missing shard files before any work
    if not d.resampled:
        check_shards_for_workers(len(split_info["shards"]), info.world_size, d.num_workers, d.train_split)
    regions = RegionSpec.from_config(cfg)
    check_image_input(shardset, d.train_split, regions)  # pictures vs region features, before any work
    out_dir = Path(cfg.run.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    resume_tag = None
    if cfg.run.resume:
        resume_tag, marker = checkpoint.find_on_all_ranks(ckpt_dir, cfg.run.resume, info.is_main)
        checkpoint.check_world_size(ckpt_dir, resume_tag, marker, info.world_size)
    configure_threads(cfg, info)
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    dtype = model_dtype(cfg)

    model = build_model(cfg, shardset)
    num_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them away
    if cfg.model.init_from and not cfg.run.resume:
        load_init_weights(model, cfg.model.init_from)
    loss_fn = build_loss(cfg)
    engine = build_engine(cfg, model, ds_config)
    tb = RunLogger(out_dir / "tb", enabled=info.is_main)
    tb.text("config", f"```\n{cfg.to_yaml()}\n```")
    tb.retrieval_layout(list(dict.fromkeys([cfg.data.eval_split, cfg.data.test_split])))

    def log_examples(emb: dict) -> None:  # retrieval examples + projector of the eval split, at the current step
        if regions is None:  # feature shard sets hold no pictures to show
            tb.eval_examples(step, emb, shardset, d.eval_split, cfg.model.local_score_weight)

    step, samples, position, counters = 0, 0, DataPosition(), {}
    if resume_tag is not None:
        load_path, state = engine.load_checkpoint(str(ckpt_dir), tag=resume_tag)
        if load_path is None:
            raise checkpoint.CheckpointError(f"run.resume: DeepSpeed could not load {ckpt_dir / resume_tag}")
        step, samples = state["step"], state["samples"]
        position = DataPosition(*state["data_positions"][info.rank])
        counters = state["counters"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        log.info("resumed from %s at step %d (%d samples seen)", load_path, step, samples)

    mix = mix_sets(shardset, d.mix_shards, d.mix_weights, d.train_split)
    train_images = sum(s.split_info(d.train_split)["images"] for s, _ in mix) if mix else split_info["images"]
    for extra, _ in mix[1:]:
        check_image_input(extra, d.train_split, regions)
    set_names = [str(s.root) for s, _ in mix] or [str(shardset.root)]
    per_rank_epoch = d.samples_per_epoch or max(d.batch_size, train_images // info.world_size)
    stream = TrainStream(shardset, d.train_split, batch_size=d.batch_size, image_size=d.image_size,
                         max_words=d.max_words, shuffle_buffer=d.shuffle_buffer, resampled=d.resampled,
                         batches_per_worker=batches_per_worker(per_rank_epoch, d.batch_size, d.num_workers),
                         seed=cfg.run.seed, rank=info.rank, world_size=info.world_size,
                         tokenizer=caption_tokenizer(cfg, shardset.vocab), max_image_pixels=d.max_image_pixels,
                         regions=regions, mix=mix)
    batches = train_batches(stream, d.num_workers, start_epoch=position.epoch, skip_batches=position.batches)

    global_batch = d.batch_size * info.world_size
    bad_totals = torch.tensor(counters.get("bad_totals", [0] * len(BAD_KINDS)), dtype=torch.long)  # all ranks
    read_total = counters.get("read_total", 0)
    nonfinite_total = counters.get("nonfinite_steps", 0)
    set_samples = torch.tensor(counters.get("set_samples", [0] * len(set_names)), dtype=torch.long)  # all ranks
    if info.is_main and mix:
        log.info("mixing %d shard sets: %s", len(mix), ", ".join(f"{name} {w:.1%}" for name, (_, w) in
                                                               zip(set_names, mix)))
    if info.is_main:
        log.info("training %d steps, global batch %d (%d ranks x %d x accum %d), %.2fM parameters, %s",
                 cfg.train.steps, global_batch, info.world_size, d.batch_size, cfg.engine.grad_accum,
                 num_params / 1e6, cfg.engine.precision)

    sums: dict[str, torch.Tensor] = {}
    window = {"micro": 0, "updates": 0, "data_wait": 0.0, "start": time.perf_counter()}
    streak = counters.get("nonfinite_streak", 0)
    last_saved = step if resume_tag is not None else -1
    log_path = out_dir / "train_log.jsonl"
    bar = ProgressBar(cfg.train.steps * global_batch * cfg.engine.grad_accum, "train", initial=samples,
                      enabled=progress_enabled(info.rank))
    preempted = None

    def save() -> None:
        save_checkpoint(engine, cfg, ckpt_dir, step, samples, position,
                        {"bad_totals": bad_totals.tolist(), "read_total": read_total,
                         "nonfinite_steps": nonfinite_total, "nonfinite_streak": streak,
                         "set_samples": set_samples.tolist()}, info)

    while step < cfg.train.steps:
        # read, bad per kind, samples per mixed shard set: this rank, this step
        local_counts = torch.zeros(1 + len(BAD_KINDS) + len(set_names), dtype=torch.long)
        step_sums: dict[str, torch.Tensor] = {}
        for _ in range(cfg.engine.grad_accum):
            t0 = time.perf_counter()
            epoch, batch = next(batches)
            position.advance(epoch)
            window["data_wait"] += time.perf_counter() - t0
            local_counts[0] += batch["n_read"]
            local_counts[1:1 + len(BAD_KINDS)] += batch["bad_counts"]
            local_counts[1 + len(BAD_KINDS):] += batch["set_counts"]
            log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
            engine.module.set_backbone_grad(step >= cfg.optim.backbone_freeze_steps)
            losses = train_step(engine, loss_fn, batch, step, info, dtype, want_grad_norm=log_now)
            grad_norm = losses.pop("grad_norm", None)
            skipped = bool(losses.pop("skipped", 0.0))  # decided at the boundary, the last micro-step
            for k, v in losses.items():
                step_sums[k] = step_sums.get(k, 0.0) + v
            window["micro"] += 1
        step += 1
        samples += global_batch * cfg.engine.grad_accum
        bar.update(global_batch * cfg.engine.grad_accum, step=f"{step}/{cfg.train.steps}")
        # One all-reduce per step: whether any rank was asked to stop, and every rank's data counts.
        agreed = all_reduce_sum(torch.cat([torch.tensor([int(stop.signal is not None)]), local_counts]))
        stop_now = bool(agreed[0] > 0)
        read_total += int(agreed[1])
        bad_totals += agreed[2:2 + len(BAD_KINDS)]
        set_samples += agreed[2 + len(BAD_KINDS):]
        if skipped:
            nonfinite_total += 1
            streak += 1
            if info.is_main:
                log.warning("step %d: non-finite loss or gradient on some rank; update skipped on every rank "
                            "(%d in a row, %d in all)", step, streak, nonfinite_total)
        else:
            streak = 0
            window["updates"] += 1
            for k, v in step_sums.items():
                sums[k] = sums.get(k, 0.0) + v

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window["start"]
            per_update = max(1, window["updates"] * cfg.engine.grad_accum)
            scalars = {f"loss/{k}": float(v) / per_update for k, v in sums.items()}
            if grad_norm is None and not skipped:
                grad_norm = engine.get_global_grad_norm()
            scalars.update({
                "train/lr": engine.get_lr()[0],
                "train/samples_per_s": global_batch * window["micro"] / elapsed,
                "train/data_wait_frac": window["data_wait"] / elapsed,
                "train/step_s": elapsed / (window["micro"] / cfg.engine.grad_accum),
                "train/bad_samples": int(bad_totals.sum()),
                "train/data_epoch": position.epoch,
                "train/nonfinite_steps": nonfinite_total,
            })
            scalars.update({f"data/bad/{kind}": int(n) for kind, n in zip(BAD_KINDS, bad_totals)})
            if mix:  # how many training samples each corpus contributed so far
                scalars.update({f"data/samples/{Path(name).name}": int(n) for name, n in zip(set_names, set_samples)})
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
                         "eta %dm%02ds", step, cfg.train.steps, scalars.get("loss/loss", math.nan),
                         scalars.get("loss/global", math.nan), scalars.get("loss/local", math.nan),
                         scalars["train/lr"], scalars["train/samples_per_s"], 100 * scalars["train/data_wait_frac"],
                         left_s // 60, left_s % 60)
                bar.update(0, loss=f"{scalars.get('loss/loss', math.nan):.4f}")
                with log_path.open("a") as f:
                    f.write(json.dumps({"step": step, **scalars}) + "\n")
            sums.clear()
            window.update(micro=0, updates=0, data_wait=0.0, start=time.perf_counter())

        bad = int(bad_totals.sum())
        if read_total >= d.bad_fraction_min_read and bad > d.max_bad_fraction * read_total:
            counts = ", ".join(f"{kind} {int(n)}" for kind, n in zip(BAD_KINDS, bad_totals) if n)
            raise RuntimeError(f"{bad} of {read_total} samples read were bad ({bad / read_total:.2%} > "
                               f"data.max_bad_fraction={d.max_bad_fraction}; {counts}); see the warnings above")
        if streak >= cfg.train.max_nonfinite_steps:
            raise RuntimeError(f"{streak} steps in a row had a non-finite loss or gradient (train.max_nonfinite_"
                               f"steps={cfg.train.max_nonfinite_steps}), up to step {step}; the last checkpoint "
                               f"written before them is kept in {ckpt_dir}")
        if stop_now:
            preempted = {"step": step, "signal": stop.signal}
            if info.is_main:
                log.warning("stop requested by SIGTERM/SIGUSR1 to at least one rank: checkpoint at step %d, "
                            "then exit", step)
            save()
            break
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            results = evaluate_split(engine.module, shardset, d.eval_split, cfg, dtype=dtype, rank=info.rank,
                                     world=info.world_size, on_embeddings=log_examples)
            tb.retrieval(step, d.eval_split, results)
            if info.is_main:
                write_results(results, out_dir, d.eval_split, step)
                log.info("step %d %s split:\n%s", step, d.eval_split, results_table(results))
        if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and streak == 0:
            save()
            last_saved = step

    bar.close()
    if preempted is not None:
        tb.close()
        return {"preempted": preempted}
    if last_saved != step:
        save()
    final = {}
    for split in dict.fromkeys([d.eval_split, d.test_split]):
        results = evaluate_split(engine.module, shardset, split, cfg, dtype=dtype, rank=info.rank,
                                 world=info.world_size, on_embeddings=log_examples if split == d.eval_split else None)
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
    except ConfigError as e:  # a refusal before any work (config, checkpoint, world size): the same on all ranks
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput: the full trainer step against a bare PyTorch loop on the same model and batch.

"trainer": trainer.train's own building blocks, exactly as a run uses them: samples streamed from shards by
`TrainStream` / `TrainLoader` (decoding workers), the DeepSpeed engine of `build_engine`, and `train_step`
(forward, all-gather of the global batch, loss of the own rows against all columns, engine backward and step).
"bare": the same model (same initial weights), the same `HierarchicalLoss`, one batch held in memory on the
device, `loss.backward()` and `torch.optim.AdamW.step()`, nothing else.
Goal (issue 7): trainer samples/s >= 0.85 x bare samples/s.

The two loops run in alternating rounds in one process, and the ratio is the median of the per-round ratios:
the machine is shared, so only figures measured side by side compare. A third loop, "parts", repeats the
trainer step with a clock between its stages (data wait, forward, loss incl. the gather, backward, optimizer);
on a GPU every clock reading synchronises first.

Exact commands (from the repository root; about 3 minutes on 2 shared CPU cores):

    python bench/step.py                                # builds a small builtin shard set in a temp dir
    python bench/step.py --shards data/builtin --rounds 4 --steps 6 engine.precision=bf16
    python bench/step.py optim.fused=false          # both loops with the unfused AdamW (the default is fused)

Output: a table, then as the last line one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import Config, load_config  # noqa: E402
from trainer.data.loader import TrainLoader  # noqa: E402
from trainer.data.shardset import ShardSet  # noqa: E402
from trainer.distributed import DistInfo, init_distributed, shutdown  # noqa: E402
from trainer.engine.build import build_engine, deepspeed_config, param_groups  # noqa: E402
from trainer.training.factory import build_loss, build_model, build_train_stream  # noqa: E402
from trainer.training.loop import configure_device  # noqa: E402
from trainer.training.step import LABEL_KEYS, gather_global_batch, train_step  # noqa: E402

PARTS = ("data_wait", "forward", "loss", "backward", "optimizer")


# ------------------------------------------------------------------------------------------ set-up
def build_bench_shards(out: Path, train_images: int, shard_size: int) -> Path:
    """A builtin shard set (the same CLI the tests use), small enough to build in well under a minute."""
    from shards.__main__ import main as shards_main

    code = shards_main(["build", "--source", "builtin", "--out", str(out), "--train-images", str(train_images),
                        "--val-images", "32", "--test-images", "32", "--shard-size", str(shard_size),
                        "--min-concept-count", "2", "--pos", "NOUN,ADJ"])
    if code not in (0, None):
        raise RuntimeError(f"building the benchmark shard set in {out} failed (exit {code})")
    return out


def bench_config(config: str, shards: Path, overrides: list[str]) -> Config:
    return load_config(REPO / config if not Path(config).is_absolute() else config,
                       [f"data.shards={shards}", f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero0.json'}",
                        *overrides])


def open_stream(cfg: Config, shardset: ShardSet, info: DistInfo, num_workers: int | None = None
                ) -> Iterator[tuple[int, dict]]:
    """The trainer's batch iterator, built by the trainer's own factory (resampled or not, per the config)."""
    workers = cfg.data.num_workers if num_workers is None else num_workers
    stream = build_train_stream(cfg, shardset, rank=info.rank, world_size=info.world_size, num_workers=workers)
    return TrainLoader(stream, workers)


class Clock:
    """Wall-clock stage timer; synchronises the GPU before each reading so kernels are charged to their stage."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.totals = {part: 0.0 for part in PARTS}

    @contextmanager
    def stage(self, part: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.totals[part] += time.perf_counter() - start


def to_device(batch: dict, device: torch.device) -> dict:
    out = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["lengths"] = batch["lengths"]  # the model checks lengths on the host
    return out


# ------------------------------------------------------------------------------------------ the loops
class TrainerLoop:
    """trainer.train's inner loop: next batch from the stream, then train_step."""

    def __init__(self, cfg: Config, shardset: ShardSet, info: DistInfo):
        torch.manual_seed(cfg.run.seed)
        self.cfg, self.info = cfg, info
        self.engine = build_engine(cfg, build_model(cfg, shardset), deepspeed_config(cfg, info.world_size))
        self.loss_fn = build_loss(cfg)
        self.batches = open_stream(cfg, shardset, info)
        self.step = 0
        self.last_loss = float("nan")

    def run(self, steps: int) -> None:
        for _ in range(steps):
            _, batch = next(self.batches)
            stats = train_step(self.engine, self.loss_fn, batch, self.step, self.info)
            self.step += 1
        self.last_loss = float(stats["loss"])

    def run_parts(self, steps: int, clock: Clock) -> None:
        """train_step's stages one by one (same calls, same order) with a clock between them."""
        device, engine = self.info.device, self.engine
        for _ in range(steps):
            with clock.stage("data_wait"):
                _, batch = next(self.batches)
            with clock.stage("forward"):
                out = engine(batch["images"].to(device=device, non_blocking=True),
                             batch["tokens"].to(device, non_blocking=True), batch["lengths"])
            with clock.stage("loss"):
                labels = {k: batch[k].to(device, non_blocking=True) for k in LABEL_KEYS}
                gathered = gather_global_batch(out, labels)
                n = batch["images"].shape[0]
                logits = (out["img_concept_logits"], out["txt_concept_logits"]) if "img_concept_logits" in out \
                    else None
                losses = self.loss_fn(gathered, row_offset=self.info.rank * n, num_rows=n, step=self.step,
                                      concept_logits=logits)
            with clock.stage("backward"):
                engine.backward(losses["loss"])
            with clock.stage("optimizer"):
                engine.step()
            self.step += 1


class BareLoop:
    """The same model and loss in plain PyTorch: one in-memory batch, backward, AdamW step."""

    def __init__(self, cfg: Config, shardset: ShardSet, batch: dict, device: torch.device):
        torch.manual_seed(cfg.run.seed)
        self.model = build_model(cfg, shardset).to(device=device)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                           fused=o.fused)
        self.loss_fn = build_loss(cfg)
        self.batch = to_device(batch, device)
        self.step = 0
        self.last_loss = float("nan")

    def _forward(self) -> dict:
        b = self.batch
        return self.model(b["images"], b["tokens"], b["lengths"])

    def _loss(self, out: dict) -> torch.Tensor:
        logits = (out["img_concept_logits"], out["txt_concept_logits"]) if "img_concept_logits" in out else None
        scored = {**out, **{k: self.batch[k] for k in LABEL_KEYS}}
        return self.loss_fn(scored, step=self.step, concept_logits=logits)["loss"]

    def run(self, steps: int) -> None:
        for _ in range(steps):
            loss = self._loss(self._forward())
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        self.last_loss = float(loss.detach())

    def run_parts(self, steps: int, clock: Clock) -> None:
        for _ in range(steps):
            with clock.stage("forward"):
                out = self._forward()
            with clock.stage("loss"):
                loss = self._loss(out)
            with clock.stage("backward"):
                loss.backward()
            with clock.stage("optimizer"):
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.step += 1


def timed(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ driver
def measure(cfg: Config, shardset: ShardSet, args: argparse.Namespace) -> dict:
    info = init_distributed()
    if info.world_size != 1:
        raise SystemExit("bench/step.py measures one process; run it without a launcher")
    configure_device(cfg, info)
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    n = cfg.data.batch_size
    _, first = next(open_stream(cfg, shardset, info, num_workers=0))
    trainer = TrainerLoop(cfg, shardset, info)
    bare = BareLoop(cfg, shardset, first, info.device)
    trainer.run(args.warmup)
    bare.run(args.warmup)

    rounds = []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
        t_trainer = timed(lambda: trainer.run(args.steps), sync)
        t_bare = timed(lambda: bare.run(args.steps), sync)
        rounds.append({"trainer_samples_per_s": n * args.steps / t_trainer,
                       "bare_samples_per_s": n * args.steps / t_bare, "ratio": t_bare / t_trainer})
    parts = {}
    for name, loop in (("trainer", trainer), ("bare", bare)):
        clock = Clock(info.device)
        loop.run_parts(args.steps, clock)
        parts[name] = {part: 1000 * seconds / args.steps for part, seconds in clock.totals.items()}
    return {"rounds": rounds, "parts_ms": parts, "device": str(info.device), "threads": torch.get_num_threads(),
            "final_loss": {"trainer": trainer.last_loss, "bare": bare.last_loss}}


def report(cfg: Config, args: argparse.Namespace, result: dict) -> dict:
    rounds = result["rounds"]
    med = {key: statistics.median(r[key] for r in rounds)
           for key in ("trainer_samples_per_s", "bare_samples_per_s", "ratio")}
    print(f"train step, {result['device']}, {result['threads']} threads, batch {cfg.data.batch_size}, "
          f"{cfg.data.num_workers} data workers, {cfg.engine.precision}, {Path(cfg.engine.deepspeed_config).name}, "
          f"AdamW {'fused' if cfg.optim.fused else 'unfused'}; "
          f"{args.rounds} alternating rounds of {args.steps} steps after {args.warmup} warm-up steps")
    print(f"{'round':>5} {'trainer samples/s':>18} {'bare samples/s':>15} {'trainer/bare':>13}")
    for i, r in enumerate(rounds):
        print(f"{i:>5} {r['trainer_samples_per_s']:>18.1f} {r['bare_samples_per_s']:>15.1f} {r['ratio']:>13.3f}")
    print(f"{'med':>5} {med['trainer_samples_per_s']:>18.1f} {med['bare_samples_per_s']:>15.1f} {med['ratio']:>13.3f}"
          f"   goal >= 0.85: {'met' if med['ratio'] >= 0.85 else 'NOT met'}")
    print(f"\nper step, ms ({args.steps} steps each, a clock between stages)")
    print(f"{'loop':>8} " + " ".join(f"{p:>10}" for p in PARTS) + f" {'total':>10}")
    for name, parts in result["parts_ms"].items():
        print(f"{name:>8} " + " ".join(f"{parts[p]:>10.1f}" for p in PARTS) + f" {sum(parts.values()):>10.1f}")
    summary = {"batch_size": cfg.data.batch_size, "num_workers": cfg.data.num_workers, "fused_adamw": cfg.optim.fused,
               "precision": cfg.engine.precision, "steps": args.steps, "rounds": args.rounds,
               **{f"median_{k}": round(v, 3) for k, v in med.items()}, "goal_ratio": 0.85,
               "goal_met": med["ratio"] >= 0.85, **result}
    print(json.dumps(summary))
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/builtin.yaml")
    parser.add_argument("--shards", type=Path, default=None, help="a shard set (default: build one in a temp dir)")
    parser.add_argument("--train-images", type=int, default=1024, help="size of the built shard set")
    parser.add_argument("--steps", type=int, default=4, help="steps per round and loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    for name in ("steps", "rounds", "train_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        shards = args.shards or build_bench_shards(Path(tmp) / "shards", args.train_images, 128)
        cfg = bench_config(args.config, shards, args.overrides)
        try:
            return report(cfg, args, measure(cfg, ShardSet.open(shards), args))
        finally:
            shutdown()


if __name__ == "__main__":
    main()

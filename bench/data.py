"""Data headroom: samples/s the shard pipeline delivers per worker against samples/s the trainer consumes.

"per worker": `TrainStream` iterated in this process with one torch thread (as `TrainLoader` sets up each
DataLoader worker): tar reading, the raw-sample shuffle buffer, decoding (json, PNG -> normalised tensor,
caption choice, tokens) and collation into full batches.
"delivered": the real `TrainLoader` DataLoader with the configured data.num_workers, drained as fast as
possible (worker processes, inter-process transfer, pinned memory on a GPU machine).
"consumed": trainer.train's `train_step` (DeepSpeed engine, gather, loss, backward, step) on one batch held in
memory, i.e. the rate the trainer would ask for if data were free.
Headroom = num_workers x per-worker rate / consumed rate ("delivered" shows what the loader sustains once its
prefetch queue is drained; on few cores the workers share them with the training threads). Goal (issue 7): >= 3 with the
default workers. The measurements alternate in rounds in one process (the machine is shared); medians.

Exact commands (from the repository root; about 2 minutes on 2 shared CPU cores):

    python bench/data.py                                 # builds a small builtin shard set in a temp dir
    python bench/data.py --shards data/builtin data.num_workers=2

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
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from step import TrainerLoop, bench_config, build_bench_shards, open_stream  # noqa: E402

from trainer.data.shardset import ShardSet  # noqa: E402
from trainer.distributed import init_distributed, shutdown  # noqa: E402
from trainer.training.loop import configure_device  # noqa: E402
from trainer.training.step import train_step  # noqa: E402


def rate(batches, count: int, batch_size: int) -> float:
    """Samples/s of pulling `count` batches from an iterator of (epoch, batch)."""
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch_size / (time.perf_counter() - start)


def measure(cfg, shardset: ShardSet, args: argparse.Namespace) -> dict:
    info = init_distributed()
    configure_device(cfg, info)
    n, workers = cfg.data.batch_size, cfg.data.num_workers
    trainer = TrainerLoop(cfg, shardset, info)  # its own stream is the "delivered" loader
    single = open_stream(cfg, shardset, info, num_workers=0)
    _, held = next(single)
    for _ in range(args.warmup):
        train_step(trainer.engine, trainer.loss_fn, held, 0, info)
    next(trainer.batches)  # workers started, buffers filled

    rounds = []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
        training_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # what _worker_init gives every decoding worker
        per_worker = rate(single, args.batches, n)
        torch.set_num_threads(training_threads)
        rate(trainer.batches, 4 * max(1, workers), n)  # drain what the workers prefetched during training
        delivered = rate(trainer.batches, args.batches, n)
        start = time.perf_counter()
        for step in range(args.steps):
            train_step(trainer.engine, trainer.loss_fn, held, step, info)
        consumed = args.steps * n / (time.perf_counter() - start)
        supply = max(1, workers) * per_worker
        rounds.append({"per_worker_samples_per_s": per_worker, "delivered_samples_per_s": delivered,
                       "consumed_samples_per_s": consumed, "headroom": supply / consumed})
    return {"rounds": rounds, "threads": torch.get_num_threads(), "device": str(info.device)}


def report(cfg, args: argparse.Namespace, out: dict) -> None:
    rounds = out["rounds"]
    keys = list(rounds[0])
    med = {k: statistics.median(r[k] for r in rounds) for k in keys}
    workers = cfg.data.num_workers
    print(f"data pipeline vs trainer, {out['device']}, batch {cfg.data.batch_size}, data.num_workers={workers}, "
          f"{out['threads']} training threads, image {cfg.data.image_size}px; {args.rounds} rounds of "
          f"{args.batches} batches and {args.steps} steps")
    print(f"{'round':>5} {'per worker/s':>13} {'delivered/s':>12} {'consumed/s':>11} {'headroom':>9}")
    for i, r in enumerate(rounds + [med]):
        print(f"{'med' if i == len(rounds) else i:>5} {r['per_worker_samples_per_s']:>13.1f} "
              f"{r['delivered_samples_per_s']:>12.1f} {r['consumed_samples_per_s']:>11.1f} {r['headroom']:>9.2f}")
    print(f"headroom = workers x per worker / consumed; goal >= 3: "
          f"{'met' if med['headroom'] >= 3 else 'NOT met'}")
    print(json.dumps({"batch_size": cfg.data.batch_size, "num_workers": workers, **{f"median_{k}": round(v, 3)
                      for k, v in med.items()}, "goal_headroom": 3, "goal_met": med["headroom"] >= 3, **out}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/builtin.yaml")
    parser.add_argument("--shards", type=Path, default=None, help="a shard set (default: build one in a temp dir)")
    parser.add_argument("--train-images", type=int, default=1024, help="size of the built shard set")
    parser.add_argument("--batches", type=int, default=4, help="batches pulled per round and source")
    parser.add_argument("--steps", type=int, default=2, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    for name in ("batches", "steps", "rounds", "train_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        shards = args.shards or build_bench_shards(Path(tmp) / "shards", args.train_images, 128)
        cfg = bench_config(args.config, shards, args.overrides)
        try:
            report(cfg, args, measure(cfg, ShardSet.open(shards), args))
        finally:
            shutdown()


if __name__ == "__main__":
    main()

"""Gradient caching (engine.grad_cache) against plain accumulation and one big batch, for k = 1, 2, 4, 8, 16
micro-batches of a fixed n per optimizer step.

For each k and each way of taking the step:
- "plain": engine.grad_accum=k, k train_steps; each micro-step's loss sees n x world pairs;
- "cache": engine.grad_accum=k with engine.grad_cache=true, one grad_cache_step; the loss sees k n world pairs;
- "big": one batch of k n per rank, engine.grad_accum=1; the loss sees k n world pairs, and the activations of
  all of them are held at once (what gradient caching avoids).
the figures are: the global batch the loss sees, the peak memory of the step (on CPU the rise of the process's
peak RSS over its RSS before the first step, the peak reset through /proc/self/clear_refs; on a GPU
torch.cuda.max_memory_allocated over what was allocated before), and the median time of an optimizer step, with
cache / plain (goal: <= 1.4, the price of the second forward). Each (k, way) runs in a fresh process, since
memory freed inside a process is not always given back to the OS, and the ways alternate within each k.

Data: synthetic batches in memory (no loader), the trainer's own model, loss, engine and step functions, one
process (a world of one still runs the gathers). Exact command (from the repository root; about 3 minutes on 2
shared CPU cores):

    python bench/grad_cache.py                         # n = 32, small_cnn at 64 px
    python bench/grad_cache.py --n 16 --ks 1,4,16 --steps 4 model.cnn_width=64

Output: a table, then as the last line one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import Config, load_config  # noqa: E402
from trainer.distributed import DistInfo, init_distributed, shutdown  # noqa: E402
from trainer.engine.build import build_engine, deepspeed_config  # noqa: E402
from trainer.training.factory import build_loss, build_model  # noqa: E402
from trainer.training.step import grad_cache_step, train_step  # noqa: E402

WAYS = ("plain", "cache", "big")
VOCAB_SIZE, NUM_CONCEPTS, MAX_WORDS = 200, 50, 12
MODEL = ("data.image_size=64", "model.cnn_width=32", "model.embed_dim=64", "model.gru_hidden=64",
         "model.word_dim=32", f"data.max_words={MAX_WORDS}", "optim.warmup_steps=0", "loss.hinge_warmup_steps=0")


def way_config(way: str, k: int, n: int, overrides: list[str]) -> Config:
    batch, accum = (k * n, 1) if way == "big" else (n, k)
    return load_config(None, [f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero0.json'}",
                              f"data.batch_size={batch}", f"engine.grad_accum={accum}",
                              f"engine.grad_cache={str(way == 'cache').lower()}", "engine.threads=1", *MODEL,
                              *overrides], check_paths=False)


def synthetic_batch(cfg: Config, size: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = cfg.data.image_size
    lengths = torch.randint(1, MAX_WORDS + 1, (size,), generator=g)
    tokens = torch.randint(2, VOCAB_SIZE, (size, MAX_WORDS), generator=g)
    tokens[torch.arange(MAX_WORDS).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    concepts = (torch.rand(size, NUM_CONCEPTS, generator=g) < 0.1).float()
    return {"images": torch.randn(size, 3, side, side, generator=g), "tokens": tokens, "lengths": lengths,
            "image_ids": torch.arange(seed * size, (seed + 1) * size), "image_concepts": concepts,
            "caption_concepts": concepts * (torch.rand(size, NUM_CONCEPTS, generator=g) < 0.6).float()}


class Memory:
    """The step's peak memory over the memory held before it: CUDA's allocator on GPUs, the RSS on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS, to the RSS now
            self.base = self._status("VmRSS")

    @staticmethod
    def _status(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def peak_rise(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM") - self.base


def run_child(way: str, k: int, n: int, steps: int, overrides: list[str]) -> dict:
    """Build the engine, then `steps` optimizer steps of one way; the first is a warm-up, left out of the time."""
    info: DistInfo = init_distributed()
    cfg = way_config(way, k, n, overrides)
    torch.manual_seed(cfg.run.seed)
    shardset = SimpleNamespace(vocab=[None] * VOCAB_SIZE, num_concepts=NUM_CONCEPTS)
    engine = build_engine(cfg, build_model(cfg, shardset), deepspeed_config(cfg, info.world_size))
    loss_fn = build_loss(cfg)
    per_step = 1 if way == "big" else k
    batches = [synthetic_batch(cfg, cfg.data.batch_size, seed) for seed in range(per_step)]
    memory, times, loss = Memory(info.device), [], float("nan")
    for step in range(steps):
        start = time.perf_counter()
        if way == "cache":
            loss = float(grad_cache_step(engine, loss_fn, batches, step, info)["loss"])
        else:
            losses = [float(train_step(engine, loss_fn, batch, step, info)["loss"]) for batch in batches]
            loss = sum(losses) / len(losses)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seen = (k * n if way != "plain" else n) * info.world_size
    out = {"way": way, "k": k, "n": n, "loss_batch": seen, "peak_mb": memory.peak_rise() / 2**20,
           "step_s": statistics.median(times[1:] or times), "loss": loss, "device": str(info.device)}
    shutdown()
    return out


def run_in_process(way: str, k: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", way, str(k), "--n", str(args.n), "--steps",
           str(args.steps), *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{way} k={k} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    by = {(r["k"], r["way"]): r for r in rows}
    lines = [f"{'k':>3} {'loss sees':>22} {'peak MB plain/cache/big':>26} {'step s plain/cache/big':>24} "
             f"{'cache/plain':>11}"]
    for k in sorted({r["k"] for r in rows}):
        plain, cache, big = (by[(k, way)] for way in WAYS)
        lines.append(f"{k:>3} {plain['loss_batch']:>6} / {cache['loss_batch']:>6} / {big['loss_batch']:>6} "
                     f"{plain['peak_mb']:>8.1f} /{cache['peak_mb']:>7.1f} /{big['peak_mb']:>7.1f} "
                     f"{plain['step_s']:>7.3f} /{cache['step_s']:>7.3f} /{big['step_s']:>7.3f} "
                     f"{cache['step_s'] / plain['step_s']:>11.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="pairs per micro-batch (per rank)")
    parser.add_argument("--ks", default="1,2,4,8,16", help="micro-batches per optimizer step, comma-separated")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is a warm-up)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one (k, way) run may take")
    parser.add_argument("--child", nargs=2, metavar=("WAY", "K"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child[0], int(args.child[1]), args.n, args.steps, args.overrides)))
        return 0
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        for way in WAYS:
            rows.append(run_in_process(way, k, args))
            print(f"  k={k} {way}: {rows[-1]['peak_mb']:.1f} MB, {rows[-1]['step_s']:.3f} s/step", file=sys.stderr)
    print(table(rows))
    ratios = {str(k): round(by["step_s"] / plain["step_s"], 3) for k in sorted({r["k"] for r in rows})
              for by in rows for plain in rows
              if by["k"] == plain["k"] == k and by["way"] == "cache" and plain["way"] == "plain"}
    print(json.dumps({"bench": "grad_cache", "n": args.n, "overrides": args.overrides, "rows": rows,
                      "cache_over_plain_time": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

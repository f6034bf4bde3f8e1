"""Per-rank memory and time of HierarchicalLoss against the global batch size N (docs/design.md section 2).

One rank scores only its own n rows against all N = n * world gathered columns, so its loss memory must grow
as O(n * N), never O(N * N). This benchmark measures it: for a fixed local batch n and growing N it runs
- "ours": one rank of N / n simulated in one process: a gathered batch of N random normalised embeddings whose
  remote rows carry no grad and whose n local rows are leaf tensors, scored with row_offset = that rank's
  offset and num_rows = n (default loss settings: contrastive local term, labels=concepts, after warmup);
- "full": the naive single-rank loss, all N rows against all N columns (num_rows = N),
each forward + backward, in a fresh subprocess per (method, N) so that peak memory is not polluted by earlier
runs. Peak memory is the increase of VmHWM (reset through /proc/self/clear_refs) over the RSS right before the
call, with glibc's mmap threshold at 64 KiB so that freed tensors leave RSS at once; ru_maxrss is the fallback
where the reset is refused (the output says which). Besides its O(n * N) score matrices, one rank also holds
O(N * (K + D)) gathered labels and embeddings: linear in N as well. Sizes whose estimated loss memory exceeds
--memory-cap-gb are skipped, never attempted.

Exact command (from the repository root; about 3 minutes on 2 shared CPU cores with the defaults):

    .venv/bin/python bench/loss_scaling.py --local-batch 256 \
        --global-batches 1024,2048,4096,8192,16384,32768,65536 --dim 256 --threads 1 --memory-cap-gb 6

Output: a table, then as the last line one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.config import LossConfig
from trainer.loss.hierarchical import HierarchicalLoss
from trainer.tools.plan import loss_bytes

EMBED_KEYS = ("img_g", "txt_g", "img_l", "txt_l")
METHODS = ("ours", "full")
MB = 2**20
# The loss memory model is trainer.plan's (LOSS_BYTES_PER_PAIR per scored (row, column) pair, measured by this
# script, plus the concept indicators of all N columns): one estimate for the planner and for this script's cap.


# ------------------------------------------------------------------------------------------ peak memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel or sandbox refuses it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return _status_kb("VmHWM") <= _status_kb("VmRSS") + 1024
    except OSError:
        return False


def measure_peak_increase(fn: Callable[[], None]) -> tuple[float, float, str]:
    """Run fn() once: (peak RSS increase in MB over the RSS right before it, its seconds, how memory was measured)."""
    exact = _reset_peak_rss()
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    if exact:
        return (_status_kb("VmHWM") - before) / 1024, seconds, "VmHWM after clear_refs=5"
    # ru_maxrss is the lifetime peak, so this is an upper bound if setting up the inputs peaked higher.
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak_kb - before) / 1024, seconds, "ru_maxrss (upper bound)"


# ------------------------------------------------------------------------------------------ synthetic batch
def make_global_batch(num: int, dim: int, num_concepts: int, active: int, seed: int) -> dict[str, torch.Tensor]:
    """N normalised embeddings per key, image ids with ~10% repeated pictures, ~`active` caption concepts per
    row and image concepts = the union over the captions of the same picture (as the shard builder makes them)."""
    gen = torch.Generator().manual_seed(seed)
    batch = {key: F.normalize(torch.randn(num, dim, generator=gen), dim=1) for key in EMBED_KEYS}
    ids = torch.arange(num, dtype=torch.int64)
    repeated = torch.randperm(num, generator=gen)[: num // 10]
    ids[repeated] = torch.randint(0, num, (repeated.numel(),), generator=gen)
    batch["image_ids"] = ids
    captions = torch.zeros(num, num_concepts)
    captions.scatter_(1, torch.randint(0, num_concepts, (num, active), generator=gen), 1.0)
    pictures, picture_of_row = torch.unique(ids, return_inverse=True)
    union = torch.zeros(pictures.numel(), num_concepts).index_add_(0, picture_of_row, captions).clamp_(max=1.0)
    batch["caption_concepts"] = captions
    batch["image_concepts"] = union[picture_of_row]
    return batch


def estimated_loss_bytes(rows: int, num: int, num_concepts: int) -> int:
    return loss_bytes(rows, num, num_concepts)


# ------------------------------------------------------------------------------------------ one measurement
def run_worker(method: str, num: int, args: argparse.Namespace) -> dict:
    """Peak memory and time of one (method, N) forward + backward; run in a fresh process by spawn_worker."""
    torch.set_num_threads(args.threads)
    n = args.local_batch
    world = num // n
    offset = (world // 2) * n  # a rank in the middle: its rows are neither the first nor the last
    data = make_global_batch(num, args.dim, args.concepts, args.active_concepts, args.seed)
    loss_fn = HierarchicalLoss(LossConfig())
    step = loss_fn.cfg.hinge_warmup_steps  # the hardest-negative (max) hinge, as after warmup

    if method == "ours":
        rows, row_offset = n, offset
        leaves = {key: data[key][offset:offset + n].clone().requires_grad_(True) for key in EMBED_KEYS}

        def gathered() -> dict[str, torch.Tensor]:
            # What all_gather with autograd hands this rank: remote rows without grad around its own leaves.
            out = dict(data)
            for key in EMBED_KEYS:
                out[key] = torch.cat([data[key][:offset], leaves[key], data[key][offset + n:]])
            return out
    else:
        rows, row_offset = num, 0
        leaves = {key: data[key].requires_grad_(True) for key in EMBED_KEYS}

        def gathered() -> dict[str, torch.Tensor]:
            return data

    def forward_backward() -> None:
        for leaf in leaves.values():
            leaf.grad = None
        loss_fn(gathered(), row_offset=row_offset, num_rows=rows, step=step)["loss"].backward()

    # Load kernels and autograd machinery on a tiny batch first, so the measured peak is the loss's own.
    tiny = make_global_batch(2 * n, args.dim, args.concepts, args.active_concepts, args.seed + 1)
    tiny["img_g"].requires_grad_(True)
    loss_fn(tiny, row_offset=0, num_rows=n, step=step)["loss"].backward()
    del tiny

    peak_mb, first_s, memory_method = measure_peak_increase(forward_backward)
    # The measured run is the first timed one: the tiny batch warmed the kernels up, and every large tensor is a
    # fresh mapping in every run (see spawn_worker), so it is no colder than the next. Runs of more than
    # cell_budget_s / repeats seconds get fewer repeats, so the benchmark fits in minutes on a shared machine.
    times = [first_s]
    while len(times) < min(args.repeats, args.cell_budget_s // first_s):
        start = time.perf_counter()
        forward_backward()
        times.append(time.perf_counter() - start)
    return {"method": method, "N": num, "ms": 1000 * statistics.median(times), "timed_runs": len(times),
            "peak_mb": peak_mb, "memory_method": memory_method}


def spawn_worker(method: str, num: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--worker-n", str(num),
               "--local-batch", str(args.local_batch), "--dim", str(args.dim), "--concepts", str(args.concepts),
               "--active-concepts", str(args.active_concepts), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--seed", str(args.seed), "--cell-budget-s", str(args.cell_budget_s)]
    # Every tensor of 64 KiB or more gets its own mapping, returned to the kernel when freed: RSS then follows
    # the live tensors instead of glibc's heap high-water mark (its default threshold adapts up to 32 MiB).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {method} N={num} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ driver
def _cell(value: float | None, width: int, decimals: int = 1) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{decimals}f}"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def growth_exponent(rows: list[dict], key: str) -> float | None:
    """Slope of log(figure) against log(N) between the smallest and largest measured N: 1 linear, 2 quadratic."""
    measured = [(row["N"], row[key]) for row in rows if row[key] is not None and row[key] > 0]
    if len(measured) < 2 or measured[0][0] == measured[-1][0]:
        return None
    (n0, v0), (n1, v1) = measured[0], measured[-1]
    return round(math.log(v1 / v0) / math.log(n1 / n0), 3)


def measure_row(num: int, args: argparse.Namespace) -> dict:
    n = args.local_batch
    row: dict = {"N": num, "world_size": num // n, "score_matrix_nN_mb": 4 * n * num / MB,
                 "score_matrix_NN_mb": 4 * num * num / MB}
    for method, rows in (("ours", n), ("full", num)):
        needed = estimated_loss_bytes(rows, num, args.concepts)
        if needed > args.memory_cap_gb * 1e9:
            row.update({f"{method}_ms": None, f"{method}_peak_mb": None, f"{method}_timed_runs": 0,
                        f"{method}_skipped_needs_gb": round(needed / 1e9, 1)})
            continue
        measured = spawn_worker(method, num, args)
        row.update({f"{method}_ms": round(measured["ms"], 2), f"{method}_peak_mb": round(measured["peak_mb"], 1),
                    f"{method}_timed_runs": measured["timed_runs"], "memory_method": measured["memory_method"]})
    return row


def format_row(row: dict) -> str:
    ours = (f"{_cell(row['ours_ms'], 9)} {_cell(row['ours_peak_mb'], 8)} "
            f"{_cell(_ratio(row['ours_peak_mb'], row['score_matrix_nN_mb']), 5)}")
    if row["ours_ms"] is None:
        ours = f"{'skipped: needs ~' + str(row['ours_skipped_needs_gb']) + ' GB':>24}"
    full = (f"{_cell(row['full_ms'], 9)} {_cell(row['full_peak_mb'], 8)} "
            f"{_cell(_ratio(row['full_peak_mb'], row['score_matrix_NN_mb']), 5)}")
    if row["full_ms"] is None:
        full = f"{'skipped: needs ~' + str(row['full_skipped_needs_gb']) + ' GB':>24}"
    ratios = (f"{_cell(_ratio(row['full_ms'], row['ours_ms']), 12)} "
              f"{_cell(_ratio(row['full_peak_mb'], row['ours_peak_mb']), 12)}")
    return (f"{row['N']:>6} {row['world_size']:>5} | {ours} | {full} | {ratios} | "
            f"{row['score_matrix_nN_mb']:>8.1f} {row['score_matrix_NN_mb']:>9.1f}")


def run_benchmark(args: argparse.Namespace) -> None:
    header = (f"{'N':>6} {'world':>5} | {'ours ms':>9} {'ours MB':>8} {'x nN':>5} | "
              f"{'full ms':>9} {'full MB':>8} {'x NN':>5} | {'full/ours ms':>12} {'full/ours MB':>12} | "
              f"{'n x N MB':>8} {'N x N MB':>9}")
    print(f"HierarchicalLoss per-rank scaling: local batch n={args.local_batch}, D={args.dim}, K={args.concepts} "
          f"(~{args.active_concepts} active), threads={args.threads}; memory cap {args.memory_cap_gb:g} GB (estimated)")
    print("ours = one rank's n rows against all N columns; full = all N rows against all N columns (naive baseline)")
    print("MB = peak RSS increase of one forward + backward over the RSS right before it, in a fresh process")
    print("x nN, x NN = that peak in units of one float32 n x N (ours) or N x N (full) score matrix")
    print(f"ms = median of up to {args.repeats} runs (fewer where a run takes over "
          f"{args.cell_budget_s / args.repeats:.1f} s; counts in the JSON)")
    print(header)
    print("-" * len(header))
    rows = []
    for num in args.global_batches:
        rows.append(measure_row(num, args))
        print(format_row(rows[-1]), flush=True)
    for row in rows:
        for method in METHODS:
            if row[f"{method}_ms"] is None:
                print(f"N={row['N']} {method}: skipped: needs ~{row[f'{method}_skipped_needs_gb']} GB "
                      f"(cap {args.memory_cap_gb:g} GB)")
    methods = sorted({row.pop("memory_method") for row in rows if "memory_method" in row})
    memory_method = ", ".join(methods) or "none measured"
    exponents = {f"{method}_{figure}_exponent": growth_exponent(rows, f"{method}_{key}")
                 for method in METHODS for figure, key in (("memory", "peak_mb"), ("time", "ms"))}
    print(f"growth with N (log-log slope, 1 = linear, 2 = quadratic): memory ours {exponents['ours_memory_exponent']}, "
          f"full {exponents['full_memory_exponent']}; time ours {exponents['ours_time_exponent']}, "
          f"full {exponents['full_time_exponent']}")
    print(f"peak memory measured with {memory_method}, malloc mmap threshold 64 KiB in the workers")
    print(json.dumps({"local_batch": args.local_batch, "dim": args.dim, "concepts": args.concepts,
                      "active_concepts": args.active_concepts, "threads": args.threads, "repeats": args.repeats,
                      "cell_budget_s": args.cell_budget_s, "memory_cap_gb": args.memory_cap_gb,
                      "memory_method": memory_method, **exponents, "rows": rows}))


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--global-batches must be comma-separated integers; got {text!r}") from error
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"--global-batches must be positive integers; got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local-batch", type=int, default=256, help="rows per rank, n")
    parser.add_argument("--global-batches", type=_int_list, default=[1024 * 2**k for k in range(7)],
                        help="comma-separated global batch sizes N, each a multiple of --local-batch")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension D of each space")
    parser.add_argument("--concepts", type=int, default=1000, help="number of concepts K")
    parser.add_argument("--active-concepts", type=int, default=5, help="concepts drawn per caption")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward + backward runs (median)")
    parser.add_argument("--cell-budget-s", type=float, default=10.0,
                        help="timed runs per cell are cut (to at least 1) to fit about this many seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every worker")
    parser.add_argument("--memory-cap-gb", type=float, default=6.0,
                        help="skip a (method, N) whose estimated loss memory exceeds this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("local_batch", "dim", "concepts", "active_concepts", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if not (args.cell_budget_s > 0 and args.memory_cap_gb > 0):
        parser.error(f"--cell-budget-s and --memory-cap-gb must be positive; got {args.cell_budget_s}, "
                     f"{args.memory_cap_gb}")
    if args.active_concepts > args.concepts:
        parser.error(f"--active-concepts ({args.active_concepts}) exceeds --concepts ({args.concepts})")
    bad = [num for num in args.global_batches if num % args.local_batch or num < 2 * args.local_batch]
    if bad:
        parser.error(f"every global batch must be a multiple (>= 2x) of --local-batch {args.local_batch}; got {bad}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(args.worker, args.worker_n, args)))
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()

"""bf16 against fp32 on the built-in config: does bf16 autocast (over fp32 master weights) train as well?

Trains configs/builtin.yaml from scratch in both precisions over several seeds (same seed = same data order and
initial weights) and compares test rSum of the concatenated score: bf16 passes when its mean lies within the
fp32 runs' seed spread (mean +- 2 sd), and the paired differences are printed per seed. Step time is reported
beside it; on CPUs without bf16 matrix units bf16 is slower, the point here is the numerics.

    python bench/precision.py --seeds 0 1 2 --steps 200 --parallel 2
    python bench/precision.py --seeds 0 --steps 10        # a smoke run

Needs a built shard set (make shards). Runs go to runs/precision/<precision>-s<seed>/ and a finished run is
reused. The last line printed is a JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(precision: str, seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.out) / f"{precision}-s{seed}"
    result_path = out / "eval" / "test.json"
    if not result_path.is_file():
        cmd = [sys.executable, "-m", "trainer.train", "--config", args.config, f"run.out_dir={out}",
               f"run.seed={seed}", f"train.steps={args.steps}", f"data.batch_size={args.batch_size}",
               f"engine.precision={precision}", f"engine.threads={args.threads}", "train.eval_every=0",
               f"train.ckpt_every={args.steps}", f"train.log_every={max(1, args.steps // 4)}", *args.overrides]
        out.mkdir(parents=True, exist_ok=True)
        with (out / "stdout.log").open("w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
        if code != 0:
            raise RuntimeError(f"{precision} seed {seed} failed (exit {code}); see {out / 'stdout.log'}")
    log_lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    result = json.loads(result_path.read_text())
    return {"rsum": result["concat"]["rsum"], "step_s": statistics.median(r["train/step_s"] for r in log_lines),
            "final_loss": log_lines[-1]["loss/loss"]}


def summarise(runs: dict, seeds: list[int]) -> dict:
    fp32 = [runs["fp32", s]["rsum"] for s in seeds]
    bf16 = [runs["bf16", s]["rsum"] for s in seeds]
    spread = statistics.stdev(fp32) if len(fp32) > 1 else 0.0
    diffs = [b - f for b, f in zip(bf16, fp32)]
    return {
        "fp32_rsum_mean": statistics.mean(fp32), "fp32_rsum_sd": spread,
        "bf16_rsum_mean": statistics.mean(bf16), "bf16_rsum_sd": statistics.stdev(bf16) if len(bf16) > 1 else 0.0,
        "paired_diff_mean": statistics.mean(diffs),
        "paired_diff_se": statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0,
        "bf16_within_fp32_spread": abs(statistics.mean(bf16) - statistics.mean(fp32)) <= 2 * spread,
        "step_s_fp32": statistics.median(runs["fp32", s]["step_s"] for s in seeds),
        "step_s_bf16": statistics.median(runs["bf16", s]["step_s"] for s in seeds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/builtin.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", default="runs/precision")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = parser.parse_args()
    jobs = [(p, s) for s in args.seeds for p in ("fp32", "bf16")]
    started = time.time()
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = dict(zip(jobs, pool.map(lambda job: run_one(*job, args), jobs)))
    print(f"{'seed':>4} {'fp32 rSum':>10} {'bf16 rSum':>10} {'bf16-fp32':>10} {'fp32 s/step':>12} {'bf16 s/step':>12}")
    for s in args.seeds:
        f, b = runs["fp32", s], runs["bf16", s]
        print(f"{s:>4} {f['rsum']:>10.1f} {b['rsum']:>10.1f} {b['rsum'] - f['rsum']:>+10.1f} {f['step_s']:>12.3f} "
              f"{b['step_s']:>12.3f}")
    summary = summarise(runs, args.seeds)
    print(f"fp32 {summary['fp32_rsum_mean']:.1f} +- {summary['fp32_rsum_sd']:.1f} (sd), bf16 "
          f"{summary['bf16_rsum_mean']:.1f} +- {summary['bf16_rsum_sd']:.1f}; paired bf16 - fp32 "
          f"{summary['paired_diff_mean']:+.1f} +- {summary['paired_diff_se']:.1f} (SE); within the fp32 spread: "
          f"{summary['bf16_within_fp32_spread']} ({time.time() - started:.0f} s)")
    print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds,
                      "runs": {f"{p}-s{s}": r for (p, s), r in runs.items()}, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Do the lexical labels earn their keep? The ablation table of DESIGN.md section 1, over several seeds.

Variants (each trained from scratch with the same step budget, evaluated on the test split):
  global_only   one space, VSE++ hinge (loss.local=none)
  concepts      global + local space, local space supervised by the captions' concepts (the method)
  shuffled      the same, concept sets permuted across the batch's pictures (control: labels without content)
  none          the same, no labels: identity targets (control: a label-free second space, same loss)
  concepts_mass, shuffled_mass: as concepts and shuffled, with loss.label_mass=0.3 (labelled columns get a fixed
                30% of each contrastive target instead of a share that shrinks as the batch grows)
For the two-space variants the global, local and concatenated scores of the same model are all reported, so
"concat vs global-only" and "labels vs controls" are both read off one table.

    python bench/ablation.py --seeds 0 1 2 --steps 300 --parallel 2      # 12 runs, ~33 min on 2 cores
    python bench/ablation.py --variants concepts_mass shuffled_mass      # the label_mass variants
    python bench/ablation.py --seeds 0 --steps 20 --variants concepts none   # a smoke run

Needs a built shard set (make shards). Runs go to runs/ablation/<variant>-s<seed>/; a finished run is reused,
so an interrupted ablation continues where it stopped. The last line printed is a JSON object with every figure.
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

VARIANTS = {
    "global_only": ["loss.local=none"],
    "concepts": ["loss.labels=concepts"],
    "shuffled": ["loss.labels=shuffled"],
    "none": ["loss.labels=none"],
    # the same three with the labelled columns held to 30% of each contrastive target (loss.label_mass)
    "concepts_mass": ["loss.labels=concepts", "loss.label_mass=0.3"],
    "shuffled_mass": ["loss.labels=shuffled", "loss.label_mass=0.3"],
}
SCORES = ("global", "local", "concat")


def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.out) / f"{variant}-s{seed}"
    result_path = out / "eval" / f"{args.split}.json"
    if not result_path.is_file():
        cmd = [sys.executable, "-m", "trainer.train", "--config", args.config, f"run.out_dir={out}",
               f"run.seed={seed}", f"train.steps={args.steps}", f"data.batch_size={args.batch_size}",
               f"engine.threads={args.threads}", "train.eval_every=0", f"train.ckpt_every={args.steps}",
               f"data.test_split={args.split}", *VARIANTS[variant], *args.overrides]
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with (out / "stdout.log").open("w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise RuntimeError(f"{variant} seed {seed} failed (exit {code}); see {out / 'stdout.log'}")
        print(f"  {variant} seed {seed}: {time.time() - started:.0f} s", flush=True)
    return json.loads(result_path.read_text())


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/builtin.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["global_only", "concepts", "shuffled", "none"],
                        choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (each gets --threads threads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for every run")
    args = parser.parse_args()

    jobs = [(v, s) for s in args.seeds for v in args.variants]
    print(f"{len(jobs)} runs of {args.steps} steps, batch {args.batch_size}, {args.parallel} at a time", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        results = dict(zip(jobs, pool.map(lambda job: run_one(*job, args), jobs)))

    chance = next(iter(results.values()))["chance"]["rsum"]
    rows = []
    for variant in args.variants:
        for score in SCORES:
            per_seed = [results[(variant, s)].get(score) for s in args.seeds]
            if any(r is None for r in per_seed):
                continue
            rsum = summarise([r["rsum"] for r in per_seed])
            i2t = summarise([r["i2t_r1"] for r in per_seed])
            t2i = summarise([r["t2i_r1"] for r in per_seed])
            rows.append({"variant": variant, "score": score, "rsum_mean": round(rsum[0], 2),
                         "rsum_std": round(rsum[1], 2), "i2t_r1_mean": round(i2t[0], 2),
                         "t2i_r1_mean": round(t2i[0], 2), "rsum_per_seed": [r["rsum"] for r in per_seed]})
    print(f"\n{args.split} split, {len(args.seeds)} seeds, {args.steps} steps x batch {args.batch_size}; "
          f"chance rSum {chance:.2f}")
    print(f"{'variant':<12} {'score':<7} {'rSum mean':>10} {'± std':>7} {'i2t R@1':>8} {'t2i R@1':>8}  per seed")
    for r in rows:
        seeds = " ".join(f"{x:.1f}" for x in r["rsum_per_seed"])
        print(f"{r['variant']:<12} {r['score']:<7} {r['rsum_mean']:>10.2f} {r['rsum_std']:>7.2f} "
              f"{r['i2t_r1_mean']:>8.2f} {r['t2i_r1_mean']:>8.2f}  {seeds}")
    print(json.dumps({"split": args.split, "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size,
                      "chance_rsum": chance, "rows": rows}))


if __name__ == "__main__":
    main()

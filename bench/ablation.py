"""Do the lexical labels earn their keep? The ablation table of docs/design.md section 1, over several seeds.

Every variant is trained from scratch with the same step budget and evaluated on the validation and the test
split (eval/val.json, eval/test.json of each run). Runs of the same seed share the data order and the
initialisation, so each variant is compared with its controls *per seed* (paired differences):
  shuffled twin  the same loss with concept sets permuted across the batch's pictures (labels without content)
  label-free     the same two-space model without labels (identity targets; for InfoNCE variants InfoNCE too)
  global_only    one space, VSE++ hinge
A difference is marked * when |mean| > 2 x its standard error (SE = sample std / sqrt(number of seeds)) over at
least 3 seeds.

Variants (loss options, see trainer/config/schema.py's LossConfig):
  global_only       loss.local=none
  concepts / shuffled / none                 docs/design.md's soft targets; none = label-free second space
  concepts_mass / shuffled_mass              label_mass=0.3: labelled columns get a fixed 30% of each target
  concepts_lhinge / shuffled_lhinge          label_mass=0.3, and the global hinge reads the labels: margin scaled
                                             by 1 - containment, captions the labels call a full match (containment
                                             1) left out of the hardest-negative max
  none_infonce / concepts_infonce / shuffled_infonce   InfoNCE global loss (label variants: matches excluded)

    python bench/ablation.py --seeds 0 1 2 3 4 --steps 300 --variants concepts_mass shuffled_mass none \\
        --out runs/hn100 loss.hinge_warmup_steps=100     # train what is missing (2 runs at a time), then report
    python bench/ablation.py --no-train --out runs/hn100 --variants ...   # rebuild the table from finished runs

A finished run (its eval JSON present) is reused, so an interrupted ablation continues where it stopped and
--no-train rebuilds the table without training. Prints one table per split and score, then one JSON line with
every figure, and writes a PNG (--plot) of the chosen score per variant with SE error bars and each seed's value.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HARDEST_NEGATIVE_LABELS = ("loss.global_label_margin=true", "loss.global_exclude_above=1.0")
MASS = ("loss.label_mass=0.3",)
INFONCE = ("loss.global_loss=infonce",)
# The hinge variants name their global loss: configs/builtin.yaml has shipped InfoNCE since 2026-12-04. Every other
# key is the config's; the tables in docs/ablation_builtin*.md were made with the builtin config before then:
# --base OLD_BUILTIN reproduces it under each variant's options.
HINGE = ("loss.global_loss=hinge",)
OLD_BUILTIN = ("loss.global_loss=hinge", "loss.label_mass=null", "loss.temperature=0.05", "loss.local_weight=1.0",
               "loss.hinge_warmup_steps=1000000")


@dataclass(frozen=True)
class Variant:
    overrides: tuple[str, ...]
    shuffled_twin: str | None = None  # the same loss with labels permuted across pictures
    label_free: str | None = None  # the same model and loss family without labels


VARIANTS = {
    "global_only": Variant(("loss.local=none", *HINGE)),
    "concepts": Variant(("loss.labels=concepts", *HINGE), "shuffled", "none"),
    "shuffled": Variant(("loss.labels=shuffled", *HINGE), None, "none"),
    "none": Variant(("loss.labels=none", *HINGE)),
    "concepts_mass": Variant(("loss.labels=concepts", *MASS, *HINGE), "shuffled_mass", "none"),
    "shuffled_mass": Variant(("loss.labels=shuffled", *MASS, *HINGE), None, "none"),
    "concepts_lhinge": Variant(("loss.labels=concepts", *MASS, *HARDEST_NEGATIVE_LABELS, *HINGE), "shuffled_lhinge",
                               "none"),
    "shuffled_lhinge": Variant(("loss.labels=shuffled", *MASS, *HARDEST_NEGATIVE_LABELS, *HINGE), None, "none"),
    "none_infonce": Variant(("loss.labels=none", *INFONCE)),
    "concepts_infonce": Variant(("loss.labels=concepts", *MASS, *INFONCE, "loss.global_exclude_above=1.0"),
                                "shuffled_infonce", "none_infonce"),
    "shuffled_infonce": Variant(("loss.labels=shuffled", *MASS, *INFONCE, "loss.global_exclude_above=1.0"),
                                None, "none_infonce"),
}
SCORES = ("concat", "local", "global")
MIN_SEEDS_FOR_SE = 3
SPLITS = ("val", "test")


def run_dir(args: argparse.Namespace, variant: str, seed: int) -> Path:
    return Path(args.out) / f"{variant}-s{seed}"


def train_one(variant: str, seed: int, args: argparse.Namespace) -> None:
    """Train and evaluate one run (val and test) unless its eval JSON exists; the command is kept beside it."""
    out = run_dir(args, variant, seed)
    if (out / "eval" / "test.json").is_file():
        return
    cmd = [sys.executable, "-m", "trainer.train", "--config", args.config, f"run.out_dir={out}", f"run.seed={seed}",
           f"train.steps={args.steps}", f"data.batch_size={args.batch_size}", f"engine.threads={args.threads}",
           "train.eval_every=0", f"train.ckpt_every={args.steps}", "data.eval_split=val", "data.test_split=test",
           *args.base, *VARIANTS[variant].overrides, *args.overrides]
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(" ".join(cmd) + "\n")
    started = time.time()
    with (out / "stdout.log").open("w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{variant} seed {seed} failed (exit {code}); see {out / 'stdout.log'}")
    print(f"  {variant} seed {seed}: {time.time() - started:.0f} s", flush=True)


def load_results(args: argparse.Namespace) -> dict:
    """{(variant, seed, split): eval JSON} for every finished run; missing runs are simply absent."""
    found = {}
    for variant in args.variants:
        for seed in args.seeds:
            for split in SPLITS:
                path = run_dir(args, variant, seed) / "eval" / f"{split}.json"
                if path.is_file():
                    found[(variant, seed, split)] = json.loads(path.read_text())
    return found


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)); SE is nan for a single value."""
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.mean(values), se


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Mean and SE of a[seed] - b[seed] over the seeds both have; significant when |mean| > 2 SE and there are at
    least MIN_SEEDS_FOR_SE seeds (the SE of two differences is itself too noisy to judge by)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, se = mean_se(diffs)
    return {"diff": round(mean, 3), "se": round(se, 3), "n": len(seeds),
            "significant": bool(len(seeds) >= MIN_SEEDS_FOR_SE and se > 0 and abs(mean) > 2 * se), "per_seed": diffs}


def figure(result: dict, score: str, metric: str) -> float | None:
    """One figure of a run's eval JSON: R@K / rsum of a score, or a plausible-match figure (pmrp, i2t_z1, ...)."""
    value = result.get(score, {}).get(metric)
    if value is None:
        value = result.get("pmrp", {}).get(score, {}).get(metric)
    return None if value is None else float(value)


def controls_of(variant: str) -> dict[str, str]:
    """Control name -> control variant for a variant (itself excluded)."""
    spec = VARIANTS[variant]
    found = {"shuffled": spec.shuffled_twin, "label_free": spec.label_free, "global_only": "global_only"}
    return {name: v for name, v in found.items() if v is not None and v != variant}


def per_seed(results: dict, variant: str, score: str, split: str, args: argparse.Namespace) -> dict[int, float]:
    """{seed: figure} of one variant's score; global_only has only a global score, which stands for every score."""
    score = "global" if variant == "global_only" else score
    return {s: x for s in args.seeds
            if (x := figure(results.get((variant, s, split), {}), score, args.metric)) is not None}


def build_rows(results: dict, args: argparse.Namespace) -> list[dict]:
    """One row per (split, score, variant) with mean, SE, per-seed values and paired differences to controls."""
    rows = []
    for split in SPLITS:
        for score in args.scores:
            for variant in args.variants:
                if variant == "global_only" and score != "global":
                    continue
                values = per_seed(results, variant, score, split, args)
                if not values:
                    continue
                mean, se = mean_se(list(values.values()))
                row = {"split": split, "score": score, "variant": variant, "metric": args.metric, "n": len(values),
                       "mean": round(mean, 3), "se": round(se, 3), "per_seed": values, "vs": {}}
                for name, control in controls_of(variant).items():
                    base = per_seed(results, control, score, split, args) if control in args.variants else {}
                    if base:
                        row["vs"][name] = paired(values, base)
                rows.append(row)
    return rows


def digits(metric: str) -> int:
    """Decimals to print: rSum is in the hundreds, PMRP figures are a few percent."""
    return 1 if metric == "rsum" else 2


def format_diff(d: dict | None, n: int = 1) -> str:
    if d is None:
        return f"{'-':>16}"
    mark = "*" if d["significant"] else " "
    return f"{d['diff']:>+8.{n}f} ±{d['se']:>5.{n}f}{mark}"


def chance_note(metric: str, chance: dict[str, float], split: str) -> str:
    """The chance level where it is known: rSum's (from the split's captions per picture), not PMRP's."""
    return f" (chance rSum {chance.get(split)})" if metric == "rsum" else ""


def print_tables(rows: list[dict], args: argparse.Namespace, chance: dict[str, float]) -> None:
    for split in SPLITS:
        for score in args.scores:
            block = [r for r in rows if r["split"] == split and r["score"] == score]
            if not block:
                continue
            print(f"\n{split} split, {score} score, {args.metric}{chance_note(args.metric, chance, split)}; "
                  f"mean ± SE over seeds; paired differences ± SE, * = |diff| > 2 SE")
            print(f"{'variant':<17}{'n':>2} {'mean':>7} {'± SE':>6}  {'vs shuffled':>16} {'vs label-free':>16} "
                  f"{'vs global_only':>16}  per seed")
            for r in block:
                seeds = " ".join(f"{x:.{digits(args.metric)}f}" for x in r["per_seed"].values())
                n = digits(args.metric)
                print(f"{r['variant']:<17}{r['n']:>2} {r['mean']:>7.{n}f} {r['se']:>6.{n}f}  "
                      f"{format_diff(r['vs'].get('shuffled'), n)} {format_diff(r['vs'].get('label_free'), n)} "
                      f"{format_diff(r['vs'].get('global_only'), n)}  {seeds}")


def markdown(rows: list[dict], args: argparse.Namespace, chance: dict[str, float]) -> str:
    """The tables as markdown (for the README): one per split and score."""
    n = digits(args.metric)

    def cell(d: dict | None) -> str:
        if d is None:
            return ""
        se = "n/a" if d["se"] is None or math.isnan(d["se"]) else f"{d['se']:.{n}f}"
        return f"{d['diff']:+.{n}f} ± {se}" + (" **\\***" if d["significant"] else "")

    out = []
    for split in SPLITS:
        for score in args.scores:
            block = [r for r in rows if r["split"] == split and r["score"] == score]
            if not block:
                continue
            out += [f"\n{split} split, {score} score, {args.metric}{chance_note(args.metric, chance, split)}:\n",
                    "| variant | seeds | mean ± SE | vs shuffled | vs label-free | vs global only | per seed |",
                    "|---|---|---|---|---|---|---|"]
            for r in block:
                se = "n/a" if math.isnan(r["se"]) else f"{r['se']:.{n}f}"
                seeds = ", ".join(f"{x:.{n}f}" for x in r["per_seed"].values())
                out.append(f"| {r['variant']} | {r['n']} | {r['mean']:.{n}f} ± {se} | "
                           f"{cell(r['vs'].get('shuffled'))} | "
                           f"{cell(r['vs'].get('label_free'))} | {cell(r['vs'].get('global_only'))} | {seeds} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    """One panel per split: the plot score's mean per variant, SE error bars, one dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPLITS), figsize=(5 + 0.9 * len(args.variants), 4.2), sharey=True)
    for ax, split in zip(axes, SPLITS):
        block = [r for r in rows if r["split"] == split and r["score"] == args.plot_score]
        names = [r["variant"] for r in block]
        ax.bar(range(len(block)), [r["mean"] for r in block], yerr=[0 if math.isnan(r["se"]) else r["se"]
                                                                     for r in block], capsize=4, color="#9bb7d4")
        for i, r in enumerate(block):
            ax.plot([i] * len(r["per_seed"]), list(r["per_seed"].values()), "k.", markersize=4)
        ax.set_xticks(range(len(block)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{split}: {args.plot_score} score ({args.metric}), mean ± SE")
    axes[0].set_ylabel(args.metric)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"plot written to {args.plot}")


def no_nan(obj):
    """JSON has no NaN: an undefined SE (one seed) becomes null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [no_nan(v) for v in obj]
    return obj


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/builtin.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=["global_only", "concepts_mass", "shuffled_mass", "none"],
                        choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (each gets --threads threads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--no-train", action="store_true", help="only read finished runs and report")
    parser.add_argument("--order", choices=("variant", "seed"), default="seed",
                        help="training order of missing runs: all seeds of a variant first, or all variants of a seed")
    parser.add_argument("--scores", nargs="+", default=list(SCORES), choices=SCORES)
    parser.add_argument("--metric", default="rsum", help="key of an eval JSON score row (rsum, or e.g. pmrp)")
    parser.add_argument("--plot", default=None, help="PNG path (default OUT/ablation.png)")
    parser.add_argument("--plot-score", default="concat", choices=SCORES)
    parser.add_argument("--markdown", default=None, help="also write the tables as markdown to this file")
    parser.add_argument("--base", nargs="*", default=[],
                        help="section.key=value given before each variant's options (give --base last); the builtin"
                        f" config before 2026-12-04: {' '.join(OLD_BUILTIN)}")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for every run")
    args = parser.parse_args()
    args.plot = args.plot or str(Path(args.out) / "ablation.png")
    return args


def main() -> None:
    args = parse_args()
    if not args.no_train:
        # variant-major: the first variants get all their seeds first; seed-major: whole seeds (paired sets) first
        jobs = [(v, s) for v in args.variants for s in args.seeds] if args.order == "variant" else \
            [(v, s) for s in args.seeds for v in args.variants]
        print(f"{len(jobs)} runs of {args.steps} steps, batch {args.batch_size}, {args.parallel} at a time",
              flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda job: train_one(*job, args), jobs))
    results = load_results(args)
    if not results:
        sys.exit(f"no finished runs under {args.out}")
    chance = {split: round(r["chance"]["rsum"], 2) for (_, _, split), r in results.items()}
    rows = build_rows(results, args)
    print_tables(rows, args, chance)
    plot(rows, args)
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, args, chance))
    steps = sorted({r["step"] for r in results.values()})  # what the runs trained, whatever --steps says now
    print(json.dumps(no_nan({"seeds": args.seeds, "steps": steps, "metric": args.metric, "out": args.out,
                             "chance_rsum": chance, "rows": rows})))


if __name__ == "__main__":
    main()

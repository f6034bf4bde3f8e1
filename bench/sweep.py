"""Search a config's training knobs on the validation split; finalists over seeds, paired with the default.

Stage 1 (random search): --trials settings drawn from SPACE (seeded, so the same command draws the same
settings), each trained once (seed 0) with the config's own step budget unless --steps says otherwise; ranked by
the validation rSum of --score. Stage 2 (finalists): the --finalists best settings and the config's default
("default": no override) are trained for every --seeds seed; each finalist is compared with the default *per
seed* on validation (paired differences, SE = std / sqrt(n)). The winner is the finalist with the best mean
validation figure; test is reported once, for the winner and the default, paired by seed. `--write-winner FILE`
writes the winner's overrides as a YAML fragment (section: key: value) to merge into the shipped config.

    python bench/sweep.py --config configs/builtin.yaml --trials 16 --finalists 3 --seeds 0 1 2 \\
        --out runs/sweep_builtin data.shards=data/builtin
    python bench/sweep.py ... --no-train      # the tables from the runs that exist

A finished run (its eval/test.json) is reused, so an interrupted search continues where it stopped. Prints the
stage-1 ranking, the finalists' paired table, then one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml
from ablation import mean_se, paired  # the same paired statistics as the labels ablation (bench/ablation.py)

# The knobs that matter for the hierarchical loss (issue 27), each with the values tried. Keys are config keys;
# a value of None leaves the key at the config's own value.
SPACE: dict[str, list] = {
    "loss.label_mass": [None, 0.1, 0.3, 0.5],
    "loss.temperature": [0.03, 0.05, 0.1],
    "loss.local_weight": [0.5, 1.0, 2.0],
    "loss.global_loss": ["hinge", "infonce"],
    "loss.global_temperature": [0.05, 0.1],
    "loss.hinge_warmup_steps": [None, 100],  # None = the config's (the first search: builtin never switched)
    "optim.lr": [5e-4, 1e-3, 2e-3],
}
# model.local_score_weight was searched here too (0.5, 1, 2) until it was learned on validation after training
# (model.local_score_weight=auto, trainer/eval/concat_weight.py): the first search's table drew with it.
DEFAULT = "default"


def draw_settings(trials: int, seed: int) -> dict[str, tuple[str, ...]]:
    """`trials` distinct settings from SPACE, named by a short hash of their overrides (stable across calls)."""
    rng = random.Random(seed)
    found: dict[str, tuple[str, ...]] = {}
    for _ in range(trials * 50):
        if len(found) == trials:
            break
        picks = {key: rng.choice(values) for key, values in SPACE.items()}
        if picks["loss.global_loss"] != "infonce":
            picks["loss.global_temperature"] = None  # only InfoNCE reads it
        overrides = tuple(f"{k}={'null' if v is None else v}" for k, v in picks.items() if v is not None)
        found["t" + hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:8]] = overrides
    return found


def train(name: str, overrides: tuple[str, ...], seed: int, args: argparse.Namespace) -> Path:
    """Train and evaluate one run unless it is finished; returns its folder."""
    out = Path(args.out) / f"{name}-s{seed}"
    if (out / "eval" / "test.json").is_file() or args.no_train:
        return out
    cmd = [sys.executable, "-m", "trainer.train", "--config", args.config, f"run.out_dir={out}", f"run.seed={seed}",
           f"engine.threads={args.threads}", "train.eval_every=0", "data.eval_split=val", "data.test_split=test",
           *([f"train.steps={args.steps}", f"train.ckpt_every={args.steps}"] if args.steps else []),
           *args.overrides, *overrides]
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(" ".join(cmd) + "\n")
    started = time.time()
    with (out / "stdout.log").open("w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"  {name} seed {seed}: exit {code}, {time.time() - started:.0f} s", flush=True)
    return out


def figure(run: Path, split: str, score: str) -> float | None:
    path = run / "eval" / f"{split}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(score, {}).get("rsum")


def stage_one(settings: dict[str, tuple[str, ...]], args: argparse.Namespace) -> list[tuple[str, float]]:
    """(name, validation figure) of every setting trained with seed 0, best first."""
    ranked = []
    for name, overrides in {DEFAULT: (), **settings}.items():
        value = figure(train(name, overrides, 0, args), "val", args.score)
        if value is not None:
            ranked.append((name, value))
    return sorted(ranked, key=lambda item: -item[1])


def stage_two(finalists: list[str], settings: dict[str, tuple[str, ...]], args: argparse.Namespace) -> list[dict]:
    """Each finalist and the default over every seed; paired differences to the default on val and test."""
    names = [DEFAULT, *[n for n in finalists if n != DEFAULT]]
    values: dict[tuple[str, str], dict[int, float]] = {}
    for name in names:
        for seed in args.seeds:
            run = train(name, settings.get(name, ()), seed, args)
            for split in ("val", "test"):
                if (x := figure(run, split, args.score)) is not None:
                    values.setdefault((name, split), {})[seed] = x
    rows = []
    for name in names:
        row = {"name": name, "overrides": list(settings.get(name, ()))}
        for split in ("val", "test"):
            seeds = values.get((name, split), {})
            mean, se = mean_se(list(seeds.values()))
            row[split] = {"mean": round(mean, 2), "se": round(se, 2), "per_seed": seeds,
                          "vs_default": paired(seeds, values.get((DEFAULT, split), {})) if name != DEFAULT else None}
        rows.append(row)
    return rows


def winner_yaml(overrides: list[str]) -> str:
    tree: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        tree.setdefault(section, {})[name] = yaml.safe_load(value)
    return yaml.safe_dump(tree, sort_keys=False)


def print_report(ranked: list[tuple[str, float]], rows: list[dict], settings: dict, args: argparse.Namespace) -> dict:
    print(f"\nstage 1: validation {args.score} rSum, seed 0 ({len(ranked)} runs)")
    for name, value in ranked:
        print(f"  {value:7.1f}  {name:10s} {' '.join(settings.get(name, ('(the config as shipped)',)))}")
    print(f"\nstage 2: seeds {args.seeds}, {args.score} rSum mean ± SE; difference to the default paired by seed")
    for row in rows:
        cells = []
        for split in ("val", "test"):
            d = row[split]["vs_default"]
            diff = "" if d is None else f" ({d['diff']:+.1f} ± {d['se']:.1f}{' *' if d['significant'] else ''})"
            cells.append(f"{split} {row[split]['mean']:.1f} ± {row[split]['se']:.1f}{diff}")
        print(f"  {row['name']:10s} " + "   ".join(cells))
    best = max(rows, key=lambda r: r["val"]["mean"] if r["val"]["mean"] == r["val"]["mean"] else -1e9)
    print(f"\nwinner on validation: {best['name']} {' '.join(best['overrides']) or '(the default)'}")
    return {"score": args.score, "stage1": ranked, "stage2": rows, "winner": best["name"],
            "winner_overrides": best["overrides"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/builtin.yaml")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--search-seed", type=int, default=0, help="seed of the random draw of settings")
    p.add_argument("--finalists", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=0, help="0 = the config's train.steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--score", choices=("concat", "global", "local"), default="concat")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--write-winner", help="write the winner's overrides to this YAML file (refused if it exists)")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run (e.g. data.shards=...)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.write_winner and Path(args.write_winner).exists():
        sys.exit(f"--write-winner: {args.write_winner} exists; name a new file")
    settings = draw_settings(args.trials, args.search_seed)
    ranked = stage_one(settings, args)
    rows = stage_two([name for name, _ in ranked[: args.finalists]], settings, args)
    report = print_report(ranked, rows, settings, args)
    if args.write_winner:
        Path(args.write_winner).write_text(winner_yaml(report["winner_overrides"]))
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()

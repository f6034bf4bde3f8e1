"""Margins of the tests that assert a learning outcome, measured over seeds and torch thread counts.

Float results differ between CPU models and thread counts, so a learning test's bound must hold well inside what
every seed and thread count reaches, not just the one run seen on the machine that wrote the test. This runs each
learning test's exact training configuration (imported from the test module itself) for run.seed in --seeds and
engine.threads in --threads, and prints the figures the tests assert on, their min and max per test, and one JSON
line with everything.

    python bench/test_margins.py                                   # 3 tests x 5 seeds x threads 1, 2: ~30 runs
    python bench/test_margins.py --cases emoji --seeds 0 1 --threads 1
    python bench/test_margins.py --threads 1 --parallel 2 && python bench/test_margins.py --threads 2 --parallel 1
        # (the same runs, faster on 2 cores: one-thread runs two at a time; the last command reuses them)
    python bench/test_margins.py --cases emoji -- train.steps=60    # try a change of a test's configuration

On 2 shared cores a one-thread run takes 1-5 min (e2e), 40-75 s (regions), 50-100 s (emoji); a two-thread run
took 10-30 min there (oversubscribed), so the figures beside the tests' bounds are seeds 0-9 (e2e, regions) or
0-4 (emoji) with one thread, plus seed 0 with two threads for e2e and emoji.

Cases (test -> figures):
  e2e      tests/integration/test_train_e2e.py::test_short_run_learns_checkpoints_resumes_and_logs
           (small_shards corpus);
           also the 10-step resume (resumed_loss_ratio) and how much the weights moved between the step-60 and
           step-120 checkpoints (moved_frac: share of parameter tensors changed; rel_change: |w120 - w60| / |w60|)
  regions  test_regions_train_on_variable_region_shards_and_on_extracted_features
           (tests/integration/test_region_features.py)
  emoji    tests/unit/shards/test_emoji_corpus.py::test_a_small_emoji_set_trains_and_evaluates_with_the_emoji_config;
           also train_<score>_x_chance: the saved checkpoint evaluated on the train split, as that test does
Every case: loss_ratio (last logged loss / first), <score>_x_chance (rSum / chance rSum for global, local,
concat), concat_i2t_r1_x_chance and concat_t2i_r1_x_chance.

Each run is a process of its own (torch threads and the process group do not leak between runs) writing
<out>/<case>/s<seed>-t<threads>/figures.json; a finished run is reused while the test's configuration is the one
it ran with (its config.yaml), so an interrupted measurement continues and a changed test is measured again.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCORES = ("global", "local", "concat")
CASES = ("e2e", "regions", "emoji")


def _import_tests() -> None:
    """The test modules import each other as top-level modules (pytest puts each test's folder, tests/ for
    conftest and tests/helpers on sys.path)."""
    folders = ("", "tests", "tests/helpers", "tests/integration", "tests/unit/shards")
    for path in (str(REPO / folder) for folder in folders):
        if path not in sys.path:
            sys.path.insert(0, path)


# ---------------------------------------------------------------------------------------------- shard sets


def build_shards(case: str, root: Path) -> Path:
    """The case's shard set, built once under root/shards exactly as its test's fixture builds it."""
    _import_tests()
    out = root / "shards" / case
    if (out / "manifest.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if case == "e2e":
        from conftest import SMALL_CORPUS, build_builtin
        build_builtin(out, *SMALL_CORPUS)
    elif case == "regions":
        from conftest import build_builtin
        from test_region_features import MAX_REGIONS, PICTURES, convert_to_regions
        pictures = build_builtin(root / "shards" / "region-pictures", *PICTURES)
        convert_to_regions(pictures, out, MAX_REGIONS)
    else:
        from test_emoji_corpus import EMOJI_RUN_BUILD, build_emoji_shards
        build_emoji_shards(out, *EMOJI_RUN_BUILD)
    return out


# ---------------------------------------------------------------------------------------------- one run


def _config(case: str, shards: Path, out: Path, extra: tuple[str, ...], seed: int, threads: int):
    _import_tests()
    knobs = (f"run.seed={seed}", f"engine.threads={threads}", *extra)
    if case == "e2e":
        from test_train_e2e import STEPS, learning_config
        return learning_config(shards, out, STEPS, *knobs)
    if case == "regions":
        from test_region_features import REGION_RUN
        from test_region_features import region_run_config as region_config
        return region_config(shards, out, *REGION_RUN, *knobs)
    from test_emoji_corpus import emoji_run_config
    return emoji_run_config(shards, out, *knobs)


def last_config_yaml(case: str, shards: Path, out: Path, seed: int, threads: int, extra: tuple[str, ...]) -> str:
    """The resolved config of the run's last train() call, as it writes it to out/config.yaml."""
    if case == "e2e":
        from test_train_e2e import RESUMED_STEPS, learning_config
        return learning_config(shards, out, RESUMED_STEPS, "run.resume=latest", f"run.seed={seed}",
                               f"engine.threads={threads}", *extra).to_yaml()
    return _config(case, shards, out, extra, seed, threads).to_yaml()


def learning_figures(out: Path, final: dict) -> dict:
    """What the learning tests assert on: the logged loss's fall and the test split's recalls against chance."""
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    test, chance = final["test"], final["test"]["chance"]
    figures = {"loss_first": log[0]["loss/loss"], "loss_last": log[-1]["loss/loss"],
               "loss_ratio": log[-1]["loss/loss"] / log[0]["loss/loss"], "chance_rsum": chance["rsum"]}
    for score in SCORES:
        if score in test:
            figures[f"{score}_rsum"] = test[score]["rsum"]
            figures[f"{score}_x_chance"] = test[score]["rsum"] / chance["rsum"]
    for key in ("i2t_r1", "t2i_r1"):
        figures[f"concat_{key}_x_chance"] = test["concat"][key] / chance[key]
    return figures


def weight_change(ckpt_dir: Path, before: str, after: str) -> dict:
    """How far training moved the weights between two checkpoints (read from the files, no process group)."""
    import torch
    from test_train_e2e import relative_change

    from trainer.engine.checkpoint import fp32_state_dict

    a, b = fp32_state_dict(ckpt_dir, before), fp32_state_dict(ckpt_dir, after)
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    return {"moved_frac": len(moved) / len(a), "rel_change": relative_change(a, b),
            "unmoved": sorted(set(a) - set(moved))}


def run_one(case: str, shards: Path, out: Path, seed: int, threads: int, extra: tuple[str, ...]) -> dict:
    """Train (and for e2e resume) as the test does; the figures it asserts on."""
    from trainer.training.loop import train

    started = time.perf_counter()
    final = train(_config(case, shards, out, extra, seed, threads))
    figures = learning_figures(out, final)
    if case == "e2e":
        from test_train_e2e import RESUMED_STEPS, STEPS, learning_config
        logged = len((out / "train_log.jsonl").read_text().splitlines())
        figures.update(weight_change(out / "checkpoints", "step0000060", f"step{STEPS:07d}"))
        train(learning_config(shards, out, RESUMED_STEPS, "run.resume=latest", f"run.seed={seed}",
                              f"engine.threads={threads}", *extra))
        resumed = json.loads((out / "train_log.jsonl").read_text().splitlines()[logged])
        figures["resumed_loss_ratio"] = resumed["loss/loss"] / figures["loss_first"]
    if case == "emoji":  # its test also evaluates the saved checkpoint on the pictures it trained on
        from trainer.eval.evaluation import evaluate_run
        fit = evaluate_run(out, "train")
        figures.update({f"train_{score}_x_chance": fit[score]["rsum"] / fit["chance"]["rsum"]
                        for score in SCORES if score in fit})
    figures["seconds"] = time.perf_counter() - started
    return figures


# ---------------------------------------------------------------------------------------------- driver


def measure(case: str, seed: int, threads: int, shards: Path, root: Path, extra: list[str]) -> dict:
    """One run in a process of its own, or its saved figures."""
    out = root / (case + "".join(f"+{x}" for x in extra)) / f"s{seed}-t{threads}"
    result = out / "figures.json"
    _import_tests()
    if result.is_file() and (out / "config.yaml").read_text() != last_config_yaml(case, shards, out, seed, threads,
                                                                                tuple(extra)):
        print(f"  {out}: the test's configuration changed since this run, running it again", flush=True)
        result.unlink()
    if not result.is_file():
        if out.exists():  # an interrupted run: start it over (its log would append to the old one)
            shutil.rmtree(out)
        out.mkdir(parents=True)
        cmd = [sys.executable, __file__, "--one", case, str(seed), str(threads), str(shards), str(out), *extra]
        with (out.parent / f"s{seed}-t{threads}.log").open("w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
        if code != 0:
            raise RuntimeError(f"{case} seed {seed} threads {threads} failed (exit {code}); see {log.name}")
    figures = json.loads(result.read_text())
    print(f"  {case} seed {seed} threads {threads}: {figures['seconds']:.0f} s", flush=True)
    return {"case": case, "seed": seed, "threads": threads, **figures}


def summary(runs: list[dict]) -> dict:
    """min and max of every numeric figure over the runs of one case."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and k not in ("seed", "threads")]
    return {k: {"min": min(r[k] for r in runs), "max": max(r[k] for r in runs)} for k in keys}


def print_case(case: str, runs: list[dict], spread: dict) -> None:
    print(f"\n{case}: {len(runs)} runs (seeds {sorted({r['seed'] for r in runs})}, "
          f"threads {sorted({r['threads'] for r in runs})})")
    for key, mm in spread.items():
        values = " ".join(f"{r[key]:.3g}" for r in runs)
        print(f"  {key:<24} min {mm['min']:9.4g}  max {mm['max']:9.4g}   {values}")
    unmoved = sorted({k for r in runs for k in r.get("unmoved", [])})
    if unmoved:
        print(f"  parameters unchanged between the checkpoints in some run: {unmoved}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--out", default="runs/test_margins")
    parser.add_argument("--one", nargs=5, metavar=("CASE", "SEED", "THREADS", "SHARDS", "OUT"),
                        help=argparse.SUPPRESS)  # the per-run child process
    parser.add_argument("extra", nargs="*", help="section.key=value added to every run (to try a change of a "
                        "test's configuration before making it; such runs go to <out>/<case>+<overrides>/)")
    args = parser.parse_args()
    if args.one:
        case, seed, threads, shards, out = args.one
        _import_tests()
        figures = run_one(case, Path(shards), Path(out), int(seed), int(threads), tuple(args.extra))
        (Path(out) / "figures.json").write_text(json.dumps(figures))
        return

    root = Path(args.out).resolve()
    shards = {case: build_shards(case, root) for case in args.cases}
    jobs = [(c, s, t) for c in args.cases for t in args.threads for s in args.seeds]
    print(f"{len(jobs)} runs, {args.parallel} at a time", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: measure(*job, shards[job[0]], root, args.extra), jobs))
    report = {}
    for case in args.cases:
        mine = [r for r in runs if r["case"] == case]
        report[case] = {"spread": summary(mine), "runs": mine}
        print_case(case, mine, report[case]["spread"])
    print(json.dumps({"seeds": args.seeds, "threads": args.threads, "extra": args.extra, "cases": report}))


if __name__ == "__main__":
    main()

"""Does pretraining on the union pay on a corpus held out of it? Three arms per seed, paired by seed.

    python bench/pretrain_transfer.py --seeds 0 1 2 --out runs/transfer engine.threads=1

Per seed S (each step skipped when its output is there, so a killed bench continues where it stopped):
  pretrain   python -m trainer.train --config configs/pretrain_union.yaml run.seed=S   (data/union)
             python -m trainer.export --run OUT/pretrain-sS --out OUT/pretrain-sS/model.pt
  zero-shot  python -m trainer.evaluate --run OUT/pretrain-sS --split test data.shards=data/openmoji-u
             (and --split val): the pretrained model on the held-out corpus, no training on it
  fine-tune  python -m trainer.train --config configs/openmoji_finetune.yaml run.seed=S
             model.init_from=OUT/pretrain-sS/model.pt
  scratch    the same config with model.init_from=null, the same steps and seed

Prints per arm the held-out test (and val) concat rSum and PMRP, mean +- SE over seeds, and each arm minus
scratch paired by seed; then one JSON line. Overrides after the options go to every training run (e.g.
engine.threads=1 on 2 shared cores, train.steps=... for a quick look). Nothing is picked here: every arm's
settings are fixed beforehand (the emoji search's winner), so test is reported directly, val beside it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ablation import mean_se, paired  # the paired statistics of the labels ablation (bench/ablation.py)

REPO = Path(__file__).resolve().parent.parent
ARMS = ("zero-shot", "fine-tune", "scratch")


def run_logged(cmd: list[str], log: Path, what: str) -> None:
    """Run one command with its output in `log`; a failure ends the bench naming the command and the log."""
    started = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    print(f"  {what}: exit {code}, {time.time() - started:.0f} s", flush=True)
    if code != 0:
        sys.exit(f"pretrain_transfer: {what} failed (exit {code}): see {log}")


def train(config: str, out: Path, seed: int, extra: list[str], args: argparse.Namespace) -> None:
    if (out / "eval" / "test.json").is_file():
        return
    cmd = [sys.executable, "-m", "trainer.train", "--config", config, f"run.out_dir={out}", f"run.seed={seed}",
           *extra, *args.overrides]
    run_logged(cmd + (["--resume", "latest"] if (out / "checkpoints").is_dir() else []), out / "stdout.log",
               f"{out.name}")


def one_seed(seed: int, args: argparse.Namespace) -> None:
    pre = args.out / f"pretrain-s{seed}"
    train(args.pretrain_config, pre, seed, [f"data.shards={args.union}"], args)
    model = pre / "model.pt"
    if not model.is_file():
        run_logged([sys.executable, "-m", "trainer.export", "--run", str(pre), "--out", str(model)],
                   pre / "stdout.log", f"{pre.name} export")
    for split in ("val", "test"):
        if not (pre / "eval" / f"{args.heldout_name}.{split}.json").is_file():
            run_logged([sys.executable, "-m", "trainer.evaluate", "--run", str(pre), "--split", split,
                        f"data.shards={args.heldout}"], pre / "stdout.log", f"{pre.name} zero-shot {split}")
    held = [f"data.shards={args.heldout}"]
    train(args.finetune_config, args.out / f"finetune-s{seed}", seed, held + [f"model.init_from={model}"], args)
    train(args.finetune_config, args.out / f"scratch-s{seed}", seed, held + ["model.init_from=null"], args)


def results_file(arm: str, seed: int, split: str, args: argparse.Namespace) -> Path:
    if arm == "zero-shot":
        return args.out / f"pretrain-s{seed}" / "eval" / f"{args.heldout_name}.{split}.json"
    return args.out / f"{'finetune' if arm == 'fine-tune' else 'scratch'}-s{seed}" / "eval" / f"{split}.json"


def figures(args: argparse.Namespace) -> dict:
    """{arm: {split: {"rsum"|"pmrp": {seed: value}}}} for the concatenated score."""
    out: dict = {}
    for arm in ARMS:
        for split in ("val", "test"):
            per = out.setdefault(arm, {}).setdefault(split, {"rsum": {}, "pmrp": {}})
            for seed in args.seeds:
                results = json.loads(results_file(arm, seed, split, args).read_text())
                per["rsum"][seed] = results["concat"]["rsum"]
                per["pmrp"][seed] = results["pmrp"]["concat"]["pmrp"]
    return out


def report(found: dict, args: argparse.Namespace) -> dict:
    print(f"\nheld-out corpus {args.heldout}, seeds {args.seeds}: concat score, mean +- SE; "
          "minus scratch paired by seed (* beyond 2 SE)")
    print(f"{'arm':>10} {'test rSum':>14} {'test PMRP':>12} {'val rSum':>14} {'- scratch rSum':>16} "
          f"{'- scratch PMRP':>16}")
    summary = {}
    for arm in ARMS:
        row = {f"{split}_{m}": mean_se(list(found[arm][split][m].values())) for split in ("val", "test")
               for m in ("rsum", "pmrp")}
        diff = {m: paired(found[arm]["test"][m], found["scratch"]["test"][m]) for m in ("rsum", "pmrp")}
        summary[arm] = {**{k: [round(v, 2) for v in mv] for k, mv in row.items()},
                        "minus_scratch_test": diff if arm != "scratch" else None}
        cells = ["" if arm == "scratch" else f"{d['diff']:+.1f} +- {d['se']:.1f}{'*' if d['significant'] else ''}"
                 for d in diff.values()]
        print(f"{arm:>10} {row['test_rsum'][0]:8.1f} +- {row['test_rsum'][1]:3.1f} "
              f"{row['test_pmrp'][0]:6.2f} +- {row['test_pmrp'][1]:3.2f} "
              f"{row['val_rsum'][0]:8.1f} +- {row['val_rsum'][1]:3.1f} {cells[0]:>16} {cells[1]:>16}")
    return summary


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("runs/transfer"))
    p.add_argument("--union", default="data/union", help="the pretraining shard set")
    p.add_argument("--heldout", default="data/openmoji-u", help="the held-out set, built with --vocab-from UNION")
    p.add_argument("--pretrain-config", default="configs/pretrain_union.yaml")
    p.add_argument("--finetune-config", default="configs/openmoji_finetune.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value for every training run")
    args = p.parse_args()
    args.out = args.out.resolve()
    manifest = Path(args.heldout) / "manifest.json"
    if not manifest.is_file():
        sys.exit(f"pretrain_transfer: {manifest} does not exist: build the held-out set first ({__file__} docstring)")
    args.heldout_name = json.loads(manifest.read_text()).get("name") or Path(args.heldout).name
    return args


def main() -> None:
    args = parse_args()
    started = time.time()
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        one_seed(seed, args)
    summary = report(figures(args), args)
    print(json.dumps({"heldout": args.heldout, "seeds": args.seeds, "arms": summary,
                      "minutes": round((time.time() - started) / 60, 1)}))


if __name__ == "__main__":
    main()

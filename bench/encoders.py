"""Which encoders pay off on the emoji corpus? Issue 5's comparison, each variant trained with the same budget.

Variants (all: GPO pooling, global + concept-supervised local space, the loss and sizes of configs/emoji.yaml):
  scratch_gru         small CNN from scratch on 32 px pictures + BiGRU over random word vectors (configs/emoji.yaml)
  scratch_glove       the same, the GRU's words initialised from GloVe 6B 50-d
  lite0_frozen_glove  EfficientNet-Lite0 (ImageNet) frozen: its 4 x 4 x 1280 grid at 128 px, extracted once
                      (trainer.extract_features), as 16 regions + BiGRU with GloVe
  lite0_frozen_minilm the same features + all-MiniLM-L6-v2 text encoder (fine-tuned at optim.text_lr_mult)
  lite0_finetune_glove EfficientNet-Lite0 on 128 px pictures, last 2 MBConv blocks + head fine-tuned after
                      --freeze-steps frozen steps (configs/emoji_efficientnet.yaml) + BiGRU with GloVe; it runs the
                      backbone every step, so on CPUs it may get its own --finetune-steps (marked in the table)
Every run: --steps x --batch-size, one thread (engine.threads), test split evaluated at the end. Test emoji are
never seen in training (splits keep all variants of an emoji together).

    python -m shards build --source emoji --out data/emoji128 --name emoji --pos NOUN,ADJ --min-concept-count 3 \
        --shard-size 400 --emoji-image-size 128
    python bench/encoders.py --shards data/emoji128 --steps 300 --batch-size 64
    python bench/encoders.py --variants scratch_gru lite0_frozen_glove --steps 20       # a smoke run

Runs go to runs/encoders/<variant>/ (--out); a variant whose RUN/eval/test.json exists is reused (its wall time
read from RUN/bench.json) unless --force. The feature shard set goes to <shards>-lite0 and is reused likewise.
The last line printed is one JSON object with every figure.

Measured (2026-11-27, 2 shared CPU cores, load ~4, two variants running at a time so wall times are inflated;
one seed; `python bench/encoders.py --steps 300 --batch-size 64`), test split rSum (R@1/5/10 both ways summed):
  variant               concat  global  local   wall s
  scratch_gru            52.7    49.9   32.3      233
  scratch_glove          40.4    38.5   29.7      225
  lite0_frozen_glove    110.1   101.9   67.3      127   (+121 s feature extraction, once)
  lite0_frozen_minilm   196.6   185.8  133.1     1603
  lite0_finetune_glove  129.4   125.8   72.3     2218
  chance                  7.45
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCORES = ("concat", "global", "local")
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
GLOVE = ["model.word_vectors=glove6b50d", "model.word_dim=50"]
# regions = the extracted Lite0 grid: 128 px pictures give 4 x 4 cells of 1280 channels; no region dropout, as
# configs/emoji_efficientnet.yaml's extraction recipe (16 parts are few to drop from)
REGIONS = ["model.image_encoder=regions", "model.region_dim=1280", "model.max_regions=16", "model.region_dropout=0"]
VARIANTS = ("scratch_gru", "scratch_glove", "lite0_frozen_glove", "lite0_frozen_minilm", "lite0_finetune_glove")


def variant_command(variant: str, args: argparse.Namespace, features: Path, out: Path) -> list[str]:
    """The trainer command of one variant: its config and overrides, the shared budget, then --override extras."""
    steps = args.finetune_steps if variant == "lite0_finetune_glove" else args.steps
    shared = [f"run.out_dir={out}", f"run.seed={args.seed}", f"train.steps={steps}",
              f"data.batch_size={args.batch_size}", f"engine.threads={args.threads}", "data.num_workers=1",
              "train.eval_every=0", f"train.ckpt_every={steps}", f"optim.warmup_steps={args.warmup_steps}"]
    if variant in ("scratch_gru", "scratch_glove"):
        config, extra = "configs/emoji.yaml", [f"data.shards={args.shards}"]
        if variant == "scratch_glove":
            extra += GLOVE
    elif variant == "lite0_frozen_glove":
        config, extra = "configs/emoji_efficientnet.yaml", [f"data.shards={features}", *REGIONS, *GLOVE]
    elif variant == "lite0_frozen_minilm":
        config, extra = "configs/emoji_efficientnet.yaml", [f"data.shards={features}", *REGIONS,
                                                            "model.text_encoder=minilm"]
    elif variant == "lite0_finetune_glove":
        config = "configs/emoji_efficientnet.yaml"
        extra = [f"data.shards={args.shards}", "data.image_size=128", "model.image_encoder=efficientnet_lite0",
                 "model.backbone_trainable=partial", f"optim.backbone_freeze_steps={args.freeze_steps}", *GLOVE]
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return [sys.executable, "-m", "trainer.train", "--config", config, *extra, *shared, *args.override]


def child_env(threads: int) -> dict[str, str]:
    """No launcher variables (each run is its own one-process job) and OpenMP held to the thread budget."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str], what: str) -> float:
    """Run `cmd` with its output in `log_path`; the wall seconds, or an error quoting the log's tail."""
    started = time.time()
    with log_path.open("w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{what} failed (exit {code}); see {log_path}:\n{tail}")
    return time.time() - started


def ensure_features(args: argparse.Namespace, features: Path) -> dict:
    """Extract the frozen Lite0 grid once (reused while its manifest.json, written last, exists)."""
    record = features.parent / f"{features.name}.bench.json"
    if (features / "manifest.json").is_file() and record.is_file() and not args.force:
        return json.loads(record.read_text())
    if features.exists():  # an interrupted extraction or --force: extract_features refuses an existing folder
        shutil.rmtree(features)
    cmd = [sys.executable, "-m", "trainer.extract_features", "--shards", args.shards, "--out", str(features),
           "--image-size", "128", "--device", "cpu"]
    print(f"extracting features: {' '.join(cmd[1:])}", flush=True)
    wall = run_logged(cmd, features.parent / f"{features.name}.log", child_env(args.threads), "feature extraction")
    result = {"command": cmd[1:], "wall_s": round(wall, 1)}
    record.write_text(json.dumps(result) + "\n")
    return result


def run_variant(variant: str, args: argparse.Namespace, features: Path) -> dict:
    out = Path(args.out) / variant
    result_path, record_path = out / "eval" / "test.json", out / "bench.json"
    if not (result_path.is_file() and record_path.is_file()) or args.force:
        if out.exists():  # a stale or interrupted run: start clean so no old checkpoint is resumed
            shutil.rmtree(out)
        out.mkdir(parents=True)
        cmd = variant_command(variant, args, features, out)
        print(f"{variant}: {' '.join(cmd[1:])}", flush=True)
        wall = run_logged(cmd, out / "stdout.log", child_env(args.threads), variant)
        steps = next(int(a.split("=", 1)[1]) for a in cmd if a.startswith("train.steps="))
        record_path.write_text(json.dumps({"command": cmd[1:], "wall_s": round(wall, 1), "steps": steps,
                                           "batch_size": args.batch_size}) + "\n")
        print(f"  {variant}: {wall:.0f} s", flush=True)
    record = json.loads(record_path.read_text())
    return {**record, "results": json.loads(result_path.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="data/emoji128", help="emoji shard set with 128 px pictures")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="steps of lite0_finetune_glove (default --steps); fewer is marked in the table")
    parser.add_argument("--freeze-steps", type=int, default=50, help="lite0_finetune_glove: backbone frozen first")
    parser.add_argument("--warmup-steps", type=int, default=50, help="optim.warmup_steps of every variant")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="engine.threads of every run")
    parser.add_argument("--out", default="runs/encoders")
    parser.add_argument("--force", action="store_true", help="retrain (and re-extract) even if results exist")
    parser.add_argument("--override", nargs="*", default=[], help="extra section.key=value for every run")
    args = parser.parse_args()
    if args.finetune_steps is None:
        args.finetune_steps = args.steps
    if not (Path(args.shards) / "manifest.json").is_file():
        parser.error(f"--shards {args.shards}: no manifest.json (build it: see this script's docstring)")
    features = Path(f"{args.shards.rstrip('/')}-lite0")

    extraction = None
    if any(v.startswith("lite0_frozen") for v in args.variants):
        extraction = ensure_features(args, features)
    runs = {v: run_variant(v, args, features) for v in args.variants}

    chance = next(iter(runs.values()))["results"]["chance"]
    print(f"\ntest split, batch {args.batch_size}, seed {args.seed}, {args.threads} thread(s); R@K in percent")
    print(f"{'variant':<21} {'steps':>5} {'score':<7} " + " ".join(f"{k:>7}" for k in RECALLS) + f" {'wall s':>7}")
    rows = []
    for variant, run in runs.items():
        unequal = "*" if run["steps"] != args.steps else " "
        for score in SCORES:
            if score not in run["results"]:
                continue
            r = run["results"][score]
            rows.append({"variant": variant, "steps": run["steps"], "score": score, "wall_s": run["wall_s"],
                         **{k: round(r[k], 2) for k in RECALLS}})
            print(f"{variant:<21} {run['steps']:>4}{unequal} {score:<7} " + " ".join(f"{r[k]:7.2f}" for k in RECALLS)
                  + f" {run['wall_s']:7.0f}")
    print(f"{'chance':<21} {'':>5} {'':<7} " + " ".join(f"{chance[k]:7.2f}" for k in RECALLS))
    if extraction is not None:
        print(f"feature extraction (frozen Lite0 variants, once): {extraction['wall_s']:.0f} s")
    if any(run["steps"] != args.steps for run in runs.values()):
        print(f"* NOT the shared budget of {args.steps} steps: this variant trained for fewer (CPU time); "
              "its row is not comparable to the others as equal training")
    print(json.dumps({"split": "test", "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                      "threads": args.threads, "chance": {k: round(chance[k], 2) for k in RECALLS},
                      "extraction_wall_s": extraction["wall_s"] if extraction else None,
                      "commands": {v: run["command"] for v, run in runs.items()}, "rows": rows}))


if __name__ == "__main__":
    main()

"""A tiny trained ZeRO-3 run and its exported index, made once per test session and shared by test_retrieve.py
and test_search_page.py (cached under pytest's session temp folder, so whichever module runs first pays)."""
from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict:
    """This environment without launcher variables (a world of its own unless `extra` sets them), the worktree
    importable, one torch thread per process (the CI machine has 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def trained_run(base: Path, shards: Path) -> Path:
    """A 4-step ZeRO-3 run on `shards` (tiny model): a checkpoint to export, not a model that ranks well."""
    from trainer.config import load_config
    from trainer.training.loop import train

    run_dir = base / "retrieval_run"
    if (run_dir / "checkpoints" / "latest").is_file():
        return run_dir
    train(load_config(REPO / "configs" / "builtin.yaml", [
        f"data.shards={shards}", f"run.out_dir={run_dir}", "data.num_workers=1", "data.shuffle_buffer=256",
        f"engine.deepspeed_config={REPO}/configs/deepspeed/zero3.json", "engine.precision=fp32",
        "data.batch_size=16", "model.embed_dim=32", "model.cnn_width=16", "model.gru_hidden=32",
        "model.word_dim=16", "train.steps=4", "train.log_every=2", "train.eval_every=0", "train.ckpt_every=0"]))
    return run_dir


def exported_index(base: Path, shards: Path) -> Path:
    """The run's test split exported to an exact index folder (in this process)."""
    from trainer.retrieval.commands import export_index

    index_dir = base / "retrieval_index"
    if not (index_dir / "index.json").is_file():
        export_index(trained_run(base, shards), index_dir)
    return index_dir


def first_test_picture(shards: Path, out: Path) -> tuple[Path, str]:
    """The first picture of the test split's first shard, written to a file, and its image id."""
    manifest = json.loads((shards / "manifest.json").read_text())
    with tarfile.open(shards / manifest["splits"]["test"]["shards"][0]) as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        key = png.name[: -len(".png")]
        meta = json.loads(tar.extractfile(f"{key}.json").read())
        path = out / "query.png"
        path.write_bytes(tar.extractfile(png).read())
    return path, meta.get("image_id", key)


PYTHON = sys.executable

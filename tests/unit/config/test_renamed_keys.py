"""Renamed config keys (schema.RENAMED_KEYS): refused in what the user gives, naming the new key; read under the
new name in a run folder's own config.yaml, written before the rename."""
import json
from pathlib import Path

import pytest

from trainer.config import RENAMED_KEYS, ConfigError, load_config, load_run_config, save_config
from trainer.eval.evaluation import open_run_config

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def run_dir(tmp_path):
    """A run folder whose config.yaml was written before loss.warmup_steps became loss.hinge_warmup_steps."""
    shards = tmp_path / "shards"
    shards.mkdir()
    splits = {s: {"images": 10, "captions": 50, "shards": []} for s in ("train", "val", "test")}
    (shards / "manifest.json").write_text(json.dumps({"format": "hier-shards", "splits": splits}))
    cfg = load_config(REPO / "configs" / "builtin.yaml", [
        f"data.shards={shards}", f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero0.json'}",
        f"run.out_dir={tmp_path / 'run'}", "loss.hinge_warmup_steps=77"])
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    text = (run / "config.yaml").read_text()
    assert text.count("  hinge_warmup_steps: 77\n") == 1
    (run / "config.yaml").write_text(text.replace("  hinge_warmup_steps: 77\n", "  warmup_steps: 77\n"))
    return run


def test_old_loss_warmup_key_is_refused_naming_the_new_one(tmp_path):
    with pytest.raises(ConfigError, match=r"^loss\.warmup_steps: renamed to loss\.hinge_warmup_steps \(.+\)$"):
        load_config(None, ["loss.warmup_steps=5"], check_paths=False)
    path = tmp_path / "old.yaml"
    path.write_text("loss:\n  warmup_steps: 5\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: loss\.warmup_steps: renamed to loss\.hinge_warmup_steps"):
        load_config(path, check_paths=False)
    assert load_config(None, ["optim.warmup_steps=5"], check_paths=False).optim.warmup_steps == 5  # not renamed


def test_every_renamed_key_names_a_key_that_exists():
    for old, (new, why) in RENAMED_KEYS.items():
        section, key = new.split(".")
        assert key in load_config(None, check_paths=False).to_dict()[section], new
        assert old != new and why


def test_a_run_folder_written_before_the_rename_still_opens(run_dir):
    cfg = open_run_config(run_dir)  # what trainer.evaluate / export_index --run read
    assert cfg.loss.hinge_warmup_steps == 77 and cfg.optim.warmup_steps == 50
    assert load_run_config(run_dir / "config.yaml", ["loss.hinge_warmup_steps=3"]).loss.hinge_warmup_steps == 3
    with pytest.raises(ConfigError, match="loss.warmup_steps: renamed to loss.hinge_warmup_steps"):
        open_run_config(run_dir, ["loss.warmup_steps=3"])  # the command line is the user's: refused


def test_a_file_with_both_names_is_refused(run_dir):
    path = run_dir / "config.yaml"
    path.write_text(path.read_text().replace("  warmup_steps: 77\n", "  warmup_steps: 77\n  hinge_warmup_steps: 5\n"))
    with pytest.raises(ConfigError, match="loss.warmup_steps: renamed to loss.hinge_warmup_steps, and both are given"):
        open_run_config(run_dir)

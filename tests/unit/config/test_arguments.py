"""Issue 17, part 2: trainer.train's arguments in any order, and --help generated from the typed config."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from trainer.config import Config
from trainer.config.help import config_keys_help, type_name
from trainer.training.loop import main as train_main

REPO = Path(__file__).resolve().parents[3]
CONFIG = str(REPO / "configs" / "builtin.yaml")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _printed(capsys, argv: list[str]) -> dict:
    assert train_main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("argv", [
    ["--config", CONFIG, "run.out_dir=R", "--resume", "latest", "train.steps=5", "--print-config"],
    ["train.steps=5", "--config", CONFIG, "run.out_dir=R", "--print-config", "--resume", "latest"],
    ["--print-config", "--resume", "latest", "run.out_dir=R", "train.steps=5", "--config", CONFIG],
    ["run.out_dir=R", "train.steps=5", "--resume", "latest", "--print-config", "--config", CONFIG],
])
def test_overrides_and_options_in_any_order(capsys, argv):
    tree = _printed(capsys, argv)
    assert tree["train"]["steps"] == 5 and tree["run"]["out_dir"] == "R" and tree["run"]["resume"] == "latest"


def test_a_later_override_of_the_same_key_wins(capsys):
    tree = _printed(capsys, ["train.steps=5", "--config", CONFIG, "--print-config", "train.steps=7"])
    assert tree["train"]["steps"] == 7


def test_resume_needs_a_tag_not_an_override(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", CONFIG, "--print-config", "--resume", "train.steps=5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--resume takes latest or a checkpoint tag" in err


def test_help_lists_every_section_and_key_with_type_and_default():
    text = config_keys_help()
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        assert f"  {section.name}:" in text
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f"    {section.name}.{f.name}  {type_name(hints[f.name])} = " in text, f.name
    assert "train.steps  int = 1000" in text
    assert "loss.local  contrastive|adaptive_hinge|none = 'contrastive'" in text
    assert "run.resume  str or null = null" in text
    assert "data.mix_weights  list[float] = []" in text
    # the key's own comment in trainer/config/schema.py comes along
    assert "micro-batch per rank" in text


def test_train_help_prints_the_config_keys_and_exits_0():
    done = subprocess.run([sys.executable, "-m", "trainer.train_args", "--help"], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=60)
    assert done.returncode == 0
    assert "config keys" in done.stdout and "optim.lr  float = 0.0005" in done.stdout
    assert "--print-config" in done.stdout and "section.key=value" in done.stdout


def test_launch_preflight_refuses_in_one_line_without_torch():
    """The launch scripts' check imports neither torch nor DeepSpeed (it runs before every launch)."""
    code = ("import sys, runpy; sys.argv = ['x', '--config', 'configs/builtin.yaml', 'train.steps=0'];\n"
            "try:\n    runpy.run_module('trainer.train_args', run_name='__main__')\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules, 'deepspeed' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=ENV,
                          timeout=60)
    assert done.stdout.split() == ["2", "False", "False"], done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == ["python -m trainer.train: error: train.steps: must be positive, got 0"]

"""Issue 26, a run folder is owned: `python -m trainer.train` into a run.out_dir that holds another run's
checkpoints is refused before any work with the way out; `--overwrite` moves that run's outputs aside and trains."""
from __future__ import annotations

import json

import pytest
from bad_input_matrix import REPO, TINY_MODEL

import trainer.training.loop as loop_module
from trainer.engine import checkpoint
from trainer.train import main as train_main


@pytest.fixture(autouse=True)
def keep_the_process_group(monkeypatch):
    """main() ends by destroying the process group, which DeepSpeed cannot set up twice in one process."""
    monkeypatch.setattr(loop_module, "shutdown", lambda *_: None)


def _args(shards, out, *extra):
    return ["--config", str(REPO / "configs" / "builtin.yaml"), f"data.shards={shards}", f"run.out_dir={out}",
            *TINY_MODEL, "train.steps=1", "train.eval_every=0", "train.ckpt_every=0", *extra]


def test_a_fresh_run_into_a_used_folder_is_refused_then_overwrite_starts_afresh(tiny_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(_args(tiny_shards, out, "train.steps=2")) == 0
    capsys.readouterr()
    first = json.loads((out / "checkpoints" / "step0000002" / "complete.json").read_text())

    assert train_main(_args(tiny_shards, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"python -m trainer.train: error: run.out_dir: {out} holds the checkpoints of another "
                              f"run in {out / 'checkpoints'} (newest step0000002); continue it with --resume latest")
    assert (out / "checkpoints" / "latest").read_text() == "step0000002"  # untouched

    assert train_main(_args(tiny_shards, out, "--overwrite")) == 0
    aside = list(out.glob("replaced-*"))
    assert len(aside) == 1
    assert json.loads((aside[0] / "checkpoints" / "step0000002" / "complete.json").read_text()) == first
    assert checkpoint.find(out / "checkpoints", "latest")[0] == "step0000001"  # the new run's own
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1]


def test_overwrite_and_resume_together_are_refused(tiny_shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        train_main(_args(tiny_shards, tmp_path / "run", "--overwrite", "--resume", "latest"))
    assert refused.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert train_main(_args(tiny_shards, tmp_path / "run", "--overwrite", "run.resume=latest")) == 2
    assert "--overwrite starts the run afresh and run.resume=latest" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

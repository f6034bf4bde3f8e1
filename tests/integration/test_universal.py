"""Resume on another world size (issue 12, item 4): a ZeRO checkpoint converted to DeepSpeed's universal format
and loaded by another number of ranks, with the weights, Adam moments and step counts it holds.

Slow: the real trainer (tests/helpers/universal_worker.py runs `trainer.train.main` and writes the whole state, gathered
from every rank, right after each checkpoint it saves and right after it resumed), ZeRO 2 and 3: 2 ranks train 2
steps; `--resume latest` on 1 rank (2 -> 1) trains to step 4; `--resume latest` on 2 ranks (1 -> 2) trains to
step 6. Each resumed state must equal, bit for bit, the state the checkpoint was saved from: fp32 parameters,
exp_avg, exp_avg_sq, per-group settings, LR schedule; and the step count must be right after resumed training
too. Without ZeRO (stage 0) the checkpoint loads as it is, 2 -> 1.
Fast: which checkpoints are carried over to another world size and which are refused, with the way out.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import TINY_RUN, clean_env, wait_all
from test_faults import FakeEngine, start_ranks

from trainer.engine import checkpoint, universal

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "helpers" / "universal_worker.py"


def launch(world: int, shards: Path, out: Path, zero: str, steps: int, logs_dir: Path, *extra: str) -> list[Path]:
    cmd = [sys.executable, str(WORKER), "--config", str(REPO / "configs" / "builtin.yaml"), f"data.shards={shards}",
           f"run.out_dir={out}", f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / f'{zero}.json'}",
           *TINY_RUN, f"train.steps={steps}", "train.keep_checkpoints=2", *extra]
    procs, logs = start_ranks(cmd, logs_dir, f"{zero}-w{world}-to{steps}", world=world)
    wait_all(procs, logs, timeout=400)
    return logs


def assert_same_state(saved: dict, restored: dict, step: int, what: str) -> None:
    for key in ("params", "exp_avg", "exp_avg_sq"):
        assert saved[key].keys() == restored[key].keys() and len(saved[key]) > 10, (what, key)
        differ = [n for n in saved[key] if not torch.equal(saved[key][n], restored[key][n])]
        assert not differ, f"{what}: {key} of {len(differ)} parameters differ, e.g. {differ[0]}"
    assert all(s == step for rank_steps in saved["steps"] + restored["steps"] for s in rank_steps), \
        (what, saved["steps"], restored["steps"])
    assert restored["groups"] == saved["groups"], what  # weight decay, lr, "pretrained" of every group
    assert restored["scheduler"] == saved["scheduler"], what


@pytest.mark.slow
@pytest.mark.parametrize("zero, worlds", [("zero2", (2, 1, 2)), ("zero3", (2, 1, 2)), ("zero0", (2, 1))])
def test_resume_on_another_world_size_keeps_weights_and_adam_moments(tiny_shards, tmp_path, monkeypatch, zero,
                                                                     worlds):
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    monkeypatch.setenv("UNIVERSAL_DUMP", str(dump))
    logs = []
    for i, world in enumerate(worlds):
        logs.append(launch(world, tiny_shards, out, zero, 2 * (i + 1), tmp_path,
                           *(["--resume", "latest"] if i else [])))

    def state(label: str, step: int, world: int) -> dict:
        return torch.load(dump / f"{label}-{step}-w{world}.pt", weights_only=False)

    ckpts = out / "checkpoints"
    for i in range(1, len(worlds)):
        step, before, after = 2 * i, worlds[i - 1], worlds[i]
        what = f"{zero} {before} -> {after} ranks at step {step}"
        assert_same_state(state("saved", step, before), state("restored", step, after), step, what)
        rank0 = logs[i][0].read_text()
        assert f"was written by {before} ranks, this run has {after}" in rank0, what
        assert f"data position on {after} ranks instead of {before}: every rank starts virtual epoch" in rank0
        marker = json.loads((ckpts / checkpoint.tag_for(step + 2) / "complete.json").read_text())
        assert marker["world_size"] == after  # the resumed run trained on and saved on its own world size
    last = 2 * len(worlds)
    final = state("saved", last, worlds[-1])
    assert all(s == last for rank_steps in final["steps"] for s in rank_steps), final["steps"]  # counts on right
    with (out / "train_log.jsonl").open() as f:
        assert [json.loads(line)["step"] for line in f] == list(range(2, last + 1, 2))
    if zero == "zero0":
        assert not (ckpts / "universal").exists()  # loaded as it is
        return
    converted = ckpts / "universal" / "step0000004"
    uc_marker = json.loads((converted / "complete.json").read_text())
    assert uc_marker["source_world_size"] == 1 and uc_marker["zero_stage"] == int(zero[-1])
    assert not (ckpts / "universal" / "step0000002").exists()  # pruned with its source checkpoint
    print(f"{zero}: conversion to {len(uc_marker['files'])} files took {uc_marker['seconds']} s")
    if zero == "zero2":  # a killed conversion (no marker) is done again, here by the command for doing it by hand
        (converted / "complete.json").unlink()
        cli = subprocess.run([sys.executable, "-m", "trainer.universal", "--run", str(out), "--tag", "step0000004"],
                             env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr[-3000:]
        again = json.loads((converted / "complete.json").read_text())
        assert again["files"] == uc_marker["files"]


# ------------------------------------------------------------------------------------------------ fast

def test_another_world_size_is_carried_over_or_refused_with_the_way_out(tmp_path):
    ckpt = tmp_path / "checkpoints"
    checkpoint.save(FakeEngine(), ckpt, 2, {}, world_size=2, keep=2, is_main=True)  # ZeRO-2, 2 ranks
    tag, marker = checkpoint.find(ckpt, "latest")
    zero2 = {"zero_optimization": {"stage": 2}}
    assert checkpoint.check_world_size(ckpt, tag, marker, 2, zero2) == "same"
    assert checkpoint.check_world_size(ckpt, tag, marker, 1, zero2) == "universal"
    assert checkpoint.check_world_size(ckpt, tag, marker, 4, {"zero_optimization": {"stage": 2, "offload_optimizer":
                                                                                    {"device": "cpu"}}}) == "universal"
    assert checkpoint.check_world_size(ckpt, tag, {**marker, "zero_stage": 0}, 1, {}) == "plain"
    refusals = {"uses stage 3": {"zero_optimization": {"stage": 3}},
                "offloaded to NVMe": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}}
    for why, ds_config in refusals.items():
        with pytest.raises(checkpoint.CheckpointError) as refused:
            checkpoint.check_world_size(ckpt, tag, marker, 1, ds_config)
        message = str(refused.value)
        assert "step0000002/complete.json" in message and "written by 2 ranks, this run has 1" in message
        assert why in message and "python -m trainer.export" in message and "model.init_from" in message
    # a conversion that fails (here: the fake files are no DeepSpeed checkpoint) is reported on every rank
    with pytest.raises(checkpoint.CheckpointError, match="converting .*step0000002 to a universal checkpoint failed"):
        universal.prepare_resume(ckpt, tag, marker, 1, zero2, is_main=True)
    assert not (ckpt / "universal" / tag / "complete.json").exists()


def test_evaluation_refuses_sharded_weights_on_another_world_size(tmp_path):
    """load_run (evaluate, export) must refuse before DeepSpeed waits forever for ranks the checkpoint lacks."""
    ckpt = tmp_path / "checkpoints"
    checkpoint.save(FakeEngine(), ckpt, 2, {}, world_size=2, keep=2, is_main=True)
    tag, marker = checkpoint.find(ckpt, "latest")
    zero3 = {**marker, "zero_stage": 3}
    checkpoint.refuse_sharded_weights_elsewhere(ckpt, tag, zero3, 2, "load")  # same world size: loads
    checkpoint.refuse_sharded_weights_elsewhere(ckpt, tag, {**marker, "zero_stage": 2}, 1, "load")  # full weights
    with pytest.raises(checkpoint.CheckpointError, match=r"step0000002 is a ZeRO-3 checkpoint of 2 rank\(s\); load "
                                                         r"it on 2 rank\(s\) \(this launch has 1\)"):
        checkpoint.refuse_sharded_weights_elsewhere(ckpt, tag, zero3, 1, "load")

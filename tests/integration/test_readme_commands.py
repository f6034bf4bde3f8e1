"""The README's launch lines, as written, through to the end: train, checkpoint, final evaluation, exit 0.

The README holds two command blocks: the two make targets, and the launch block under "## Several processes,
several nodes". Each launch line that can run on one machine (not the hostfile, multi-node and SLURM ones, which
tests/integration/test_distributed.py runs with stand-ins) runs verbatim from a scratch folder that looks like a
checkout: configs/ and launch/ are the repository's, and data/builtin is a small built-in shard set whose val and
test splits have one shard each, as the real built-in corpus's val split does, so one of the two ranks embeds
nothing at evaluation. Only small overrides are appended (few steps, a small model); the README's own overrides
stay, and a later override of the same key wins. Then a 2-process run is preempted and resumed to its end with the
README's `--resume latest` form. A fast check keeps the contract that the README holds no command block this file
does not know of; the third block, "## Pretraining from an object store", is run against real servers by
tests/integration/test_remote_shards.py, the fourth, "## Pretraining, then your own corpus", by
tests/integration/test_pretrain_transfer.py. The commands in docs/*.md are not run here.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_distributed import clean_env

REPO = Path(__file__).resolve().parents[2]
SMALL = ("train.steps=4", "data.batch_size=8", "model.embed_dim=32", "model.cnn_width=16", "model.gru_hidden=32",
         "model.word_dim=16", "data.image_size=32", "data.shuffle_buffer=64", "train.log_every=2",
         "train.eval_every=2", "train.ckpt_every=2")
NOT_ON_ONE_MACHINE = ("HOSTFILE=", "NNODES=", "sbatch ")
LAUNCH_HEADING = "## Several processes, several nodes"
STORE_HEADING = "## Pretraining from an object store"  # its lines: test_remote_shards.py
PRETRAIN_HEADING = "## Pretraining, then your own corpus"  # its lines: test_pretrain_transfer.py
MAKE_TARGETS = ("make run", "make test")  # the Makefile's own recipes; `make test` is this suite
TIMEOUT = 300


def command_lines(block: str) -> list[str]:
    """A fenced block's command lines, comments dropped."""
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def readme_block(heading: str) -> list[str]:
    """The command lines of the first fenced block after `heading`."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    return command_lines(re.search(r"```bash\n(.*?)```", section, re.S).group(1))


def readme_blocks() -> list[list[str]]:
    """The command lines of every fenced bash block of the README, in order."""
    text = (REPO / "README.md").read_text()
    return [command_lines(block) for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def one_machine_launch_lines() -> list[str]:
    """The block's lines that start a run on one machine (the `--resume latest` line continues one)."""
    return [line for line in readme_block(LAUNCH_HEADING)
            if not any(marker in line for marker in NOT_ON_ONE_MACHINE) and "--resume" not in line]


def readme_resume_line() -> str:
    return next(line for line in readme_block(LAUNCH_HEADING) if "--resume latest" in line)


@pytest.fixture
def checkout(uneven_shards, tmp_path) -> Path:
    """A scratch folder laid out like a checkout, with data/builtin the small uneven shard set."""
    for name in ("configs", "launch"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "builtin").symlink_to(uneven_shards)
    return tmp_path


def run_line(line: str, cwd: Path, extra: tuple[str, ...], log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(["bash", "-c", f"{line} {' '.join(extra)}"], cwd=cwd, env=clean_env(),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        proc.kill()
        raise AssertionError(f"timed out; log:\n{log.read_text()[-4000:]}") from err
    assert code == 0, f"exit {code}; log:\n{log.read_text()[-4000:]}"


def check_finished(run: Path, steps: int, world: int = 2) -> None:
    test = json.loads((run / "eval" / "test.json").read_text())
    assert test["step"] == steps and test["counts"] == {"images": 24, "captions": 120}
    assert json.loads((run / "eval" / "val.json").read_text())["step"] == steps
    tag = (run / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["dp_world_size"] == world and state["run_state"]["step"] == steps


def test_the_readme_lists_the_launch_lines_this_file_runs():
    starts = ("bash launch/cpu_2proc.sh ", "deepspeed --num_gpus 2 ", "OMP_NUM_THREADS=1 torchrun --standalone ",
              "NUM_PROCESSES=2 bash launch/accelerate.sh ")
    lines = one_machine_launch_lines()
    assert len(lines) == len(starts) and all(line.startswith(start) for line, start in zip(lines, starts)), lines
    assert readme_resume_line().startswith("bash launch/cpu_2proc.sh ")


def test_every_readme_command_is_a_make_target_or_a_launch_line_run_here():
    """No untested command in the README: its blocks are the two make targets and the launch block, whose lines
    this file runs (or test_distributed.py with stand-ins, for the lines that need several machines)."""
    blocks = readme_blocks()
    assert blocks == [list(MAKE_TARGETS), readme_block(LAUNCH_HEADING), readme_block(STORE_HEADING),
                      readme_block(PRETRAIN_HEADING)], blocks
    launch = readme_block(LAUNCH_HEADING)
    run_here = [*one_machine_launch_lines(), readme_resume_line()]
    several_machines = [line for line in launch if any(marker in line for marker in NOT_ON_ONE_MACHINE)]
    assert sorted(run_here + several_machines) == sorted(launch), launch


@pytest.mark.slow
@pytest.mark.parametrize("line", one_machine_launch_lines())
def test_readme_launch_line_trains_checkpoints_and_evaluates_on_two_ranks(line, checkout):
    log = checkout / "launch.log"
    finish(run_line(line, checkout, SMALL, log), log)
    check_finished(checkout / "runs" / "builtin", steps=4)


@pytest.mark.slow
def test_readme_cpu_2proc_run_preempted_then_resumed_to_its_end(checkout):
    """SIGTERM to the launch script: every rank checkpoints at the next step and exits 0; the README's
    `--resume latest` line continues from that checkpoint to the end and evaluates."""
    line = one_machine_launch_lines()[0]
    assert line.startswith("bash launch/cpu_2proc.sh")
    run = checkout / "runs" / "builtin"
    log = checkout / "first.log"
    proc = run_line(line, checkout, (*SMALL, "train.steps=40", "train.ckpt_every=100"), log)
    deadline = time.time() + TIMEOUT
    while not (run / "train_log.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    finish(proc, log)
    tag = (run / "checkpoints" / "latest").read_text().strip()
    stopped = int(tag[4:])
    assert 2 <= stopped < 40 and not (run / "eval" / "test.json").exists()
    log = checkout / "resumed.log"
    finish(run_line(readme_resume_line(), checkout, (*SMALL, "train.steps=6"), log), log)
    check_finished(run, steps=max(6, stopped))
    assert f"resumed from runs/builtin/checkpoints/{tag}" in log.read_text()

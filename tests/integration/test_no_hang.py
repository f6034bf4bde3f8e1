"""Issue 26, no hang: a shard set whose every sample is bad ends `python -m trainer.train` with one line (exit 2)
instead of logging "skipping bad sample" forever, and SIGTERM ends a run that waits for data within a bounded
time (a checkpoint when a step completed since the last one, else one line and exit 128 + 15). Each case runs
under a hard timeout: a regression hangs no test session."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from bad_input_matrix import REPO, TINY_MODEL, child_env
from corrupt_shards import read_members, write_tar

import trainer.training.loop as loop_module
from trainer.data.loader import DataWait
from trainer.data.stream import TrainStream
from trainer.train import main as train_main


@pytest.fixture(autouse=True)
def keep_the_process_group(monkeypatch):
    """main() ends by destroying the process group, which DeepSpeed cannot set up twice in one process: the
    in-process runs of this module share one, as trainer.training.loop.train's callers in other tests do."""
    monkeypatch.setattr(loop_module, "shutdown", lambda *_: None)


class Hung(BaseException):  # noqa: N818 - what the test found; a BaseException so that no handler swallows it
    """The hard timeout of a case passed."""


@contextlib.contextmanager
def hard_timeout(seconds: float):
    def expire(_signum, _frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def all_bad_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of a shard set whose every train sample is bad: `captions` is 42 in every json, or concepts.json
    holds no concept (every concept id is then out of range)."""
    import shutil

    shutil.copytree(src, dst)
    if how == "no_concepts":
        (dst / "concepts.json").write_text(json.dumps({"concepts": []}))
        return dst
    manifest = json.loads((dst / "manifest.json").read_text())
    for name in manifest["splits"]["train"]["shards"]:
        members = read_members(dst / name)
        write_tar(dst / name, [(n, json.dumps(dict(json.loads(d), captions=42)).encode() if n.endswith(".json")
                                else d) for n, d in members])
    return dst


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "builtin.yaml"), f"data.shards={shards}", f"run.out_dir={out}",
            *TINY_MODEL, "train.steps=3", "train.eval_every=0", "train.ckpt_every=0", *extra]


@pytest.mark.parametrize("how, kind", [("captions_42", "malformed_json"), ("no_concepts", "concept_out_of_range")])
@pytest.mark.parametrize("workers", [0, 1])
def test_an_all_bad_shard_set_ends_the_run_with_one_line(tiny_shards, tmp_path, capsys, how, kind, workers):
    bad = all_bad_copy(tiny_shards, tmp_path / "bad", how)
    with hard_timeout(120):
        code = train_main(train_args(bad, tmp_path / "run", f"data.num_workers={workers}",
                                     "data.bad_fraction_min_read=200"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-5:]
    assert err[-1].startswith(f"python -m trainer.train: error: {bad}: 200 of 200 samples read by worker 0 of "
                              f"rank 0 were bad (100.00% > data.max_bad_fraction=0.01; {kind} 200"), err[-1]
    assert f"python -m shards check {bad}" in err[-1]
    assert not list((tmp_path / "run").glob("checkpoints/step*"))


def _stall_after_first_batch(original):
    def worker_batches(self, *args, **kwargs):
        yield next(original(self, *args, **kwargs))
        time.sleep(300)  # a read that never returns; the loader ends this worker when it closes
    return worker_batches


def _signal_when(path: Path, sig: int) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 120
        while not path.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigterm_while_waiting_for_data_checkpoints_the_completed_step(tiny_shards, tmp_path, capsys, monkeypatch):
    """One process, one loader worker that sends one batch and then nothing: SIGTERM after step 1 ends the run
    within the grace with a checkpoint of step 1 (exit 0), which --resume latest can continue."""
    monkeypatch.setattr(TrainStream, "worker_batches", _stall_after_first_batch(TrainStream.worker_batches))
    monkeypatch.setattr(loop_module, "DataWait", functools.partial(DataWait, stop_grace_s=1.0))
    out = tmp_path / "run"
    _signal_when(out / "train_log.jsonl", signal.SIGTERM)
    start = time.monotonic()
    with hard_timeout(150):
        code = train_main(train_args(tiny_shards, out, "data.num_workers=1", "train.log_every=1"))
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step0000001"
    assert (out / "checkpoints" / "step0000001" / "complete.json").is_file()
    assert time.monotonic() - start < 120


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_signal_ends_a_run_stuck_on_bad_data_in_bounded_time(tiny_shards, tmp_path, sig, code):
    """A real process, data.max_bad_fraction=1 (the bound never fires), every sample bad: no step ever comes.
    The signal goes to the whole process group, as a terminal's Ctrl-C or a scheduler's SIGTERM does; the run
    ends with one line well within the grace plus the workers' shutdown, and its log is not flooded."""
    bad = all_bad_copy(tiny_shards, tmp_path / "bad", "captions_42")
    cmd = [sys.executable, "-m", "trainer.train",
           *train_args(bad, tmp_path / "run", "data.num_workers=1", "data.max_bad_fraction=1.0")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=child_env(), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any("skipping bad sample" in line for line in lines) and time.monotonic() < deadline:
            lines.append(proc.stderr.readline())  # the worker is reading bad samples: the main process waits
        time.sleep(1)
        os.killpg(proc.pid, sig)
        sent = time.monotonic()
        _, rest = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = ("".join(lines) + rest).strip().splitlines()
    assert proc.returncode == code, err[-5:]
    assert took < 30
    assert len(err) < 30  # first 10 bad samples one line each, then counts every 30 s: no flood
    if sig == signal.SIGTERM:
        assert err[-1].startswith("python -m trainer.train: stopped: stop requested by SIGTERM while waiting for "
                                  "training data"), err[-1]
        assert "nothing new to save" in err[-1] and "--resume latest" in err[-1]
    else:
        assert err[-1].startswith("python -m trainer.train: interrupted"), err[-1]


def test_the_step_check_of_the_agreed_totals_ends_the_run_with_one_line_too(tmp_path):
    """Workers that each read fewer than data.bad_fraction_min_read are judged together at the step."""
    from types import SimpleNamespace

    from trainer.config import Config
    from trainer.data.samples import BAD_KINDS, TooManyBadSamples

    cfg = Config()
    cfg.data.bad_fraction_min_read, cfg.data.max_bad_fraction = 100, 0.1
    run = SimpleNamespace(cfg=cfg, ckpt_dir=tmp_path)
    state = loop_module.RunState(read_total=120, bad_totals=[0] * len(BAD_KINDS))
    state.bad_totals[BAD_KINDS.index("missing_image")] = 12
    loop_module.check_health(run, state)  # 10%: not past the bound
    state.bad_totals[BAD_KINDS.index("missing_image")] = 13
    with pytest.raises(TooManyBadSamples, match=r"^data.shards: 13 of 120 samples read were bad \(10.83% > "
                                                r"data.max_bad_fraction=0.1; missing_image 13\)"):
        loop_module.check_health(run, state)

"""The generated bad-input matrix, family `outputs` (issue 26 part 1): every file or folder a command writes x
{a device, a folder where a file belongs, a file where a folder belongs, a path ending in '/', a read-only place,
a parent that does not exist, an earlier output in its place, a full disk}.

The outputs come from OUTPUTS, the table kept here of every output option; output_options() finds the output
options in the commands' own parsers (every option whose dest is one of OUTPUT_DESTS, and the config keys of
OUTPUT_KEYS) and the test fails when one appears that OUTPUTS lacks, or when OUTPUTS names one that is gone.

Each case runs the command's main(argv) in this process, its other inputs valid but FAKE where they would cost
work (an empty run folder for the commands that read a run: the refusal must come before the run is read), and
must end in exit 2 with one line naming the path as given and the way out, no traceback, and its scratch folder
exactly as it was (a snapshot of every entry's kind and bytes before and after: nothing half-written, no
temporary left, an existing file never overwritten, a device never replaced).

A device is a real character device made with mknod (the /dev/null numbers) inside the case's scratch folder, so
that a regression replaces that node, never the machine's /dev/null or /dev/full; where mknod is not permitted a
named pipe stands in. A read-only place is a path under a regular FILE (the tests run as root, which ignores
permission bits; see bad_input_matrix.py). A full disk is RLIMIT_FSIZE in a child process (FULL_DISK: a handful,
run in parallel), judged the same way but for the snapshot: a refusal may leave resumable state its line names.

trainer.train runs its real main with trainer.training.loop.train replaced by what prepare() does before any
work in order (refuse_before_work, then claim_run_folder): no process group, nothing trained.
"""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bad_input_generated import REPO, GenCase, GenResult, _Accepted, _call, judge_refusal, train_replaced

OUTPUT_DESTS = ("out", "output", "out_dir", "output_dir", "save", "save_to")
OUTPUT_KEYS = ("run.out_dir",)  # config keys naming something the run writes
TINY = ("data.batch_size=16", "model.embed_dim=32", "model.cnn_width=16", "model.gru_hidden=32",
        "model.word_dim=16", "data.num_workers=0", "data.shuffle_buffer=64",
        f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero0.json'}")


@dataclass
class Inputs:
    """The valid other inputs of the commands: a shard set and an (empty) run folder."""

    shards: Path
    run: Path


@dataclass
class Output:
    entry: str  # a key of bad_input_generated.COMMANDS
    kind: str  # file or folder
    argv: Callable[[Inputs, str], list[str]]  # the command line writing to PATH
    earlier: Callable[[Path], None]  # leaves an earlier output of this command at the path


def _earlier_file(path: Path) -> None:
    path.write_bytes(b"an earlier model, not to be lost")


def _earlier_shards(path: Path) -> None:
    path.mkdir()
    (path / "manifest.json").write_text('{"splits": {}}')
    (path / "builtin-train-000000.tar").write_bytes(b"\0" * 1024)


def _earlier_index(path: Path) -> None:
    path.mkdir()
    (path / "index.json").write_text("{}")
    (path / "images.faiss").write_bytes(b"faiss")


def _earlier_run(path: Path) -> None:
    (path / "checkpoints" / "step0000030").mkdir(parents=True)
    (path / "checkpoints" / "step0000030" / "complete.json").write_text('{"step": 30}')
    (path / "checkpoints" / "latest").write_text("step0000030")


def _train_argv(i: Inputs, path: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "builtin.yaml"), f"data.shards={i.shards}", f"run.out_dir={path}",
            *TINY, "train.steps=1", "train.eval_every=0"]


SMALL_BUILD = ("--train-images", "32", "--val-images", "8", "--test-images", "8", "--shard-size", "16",
               "--min-concept-count", "2")
OUTPUTS: dict[str, Output] = {
    "shards build --out": Output("shards", "folder",
                                 lambda i, p: ["build", "--source", "builtin", "--out", p, *SMALL_BUILD],
                                 _earlier_shards),
    "trainer.export --out": Output("trainer.export", "file", lambda i, p: ["--run", str(i.run), "--out", p],
                                   _earlier_file),
    "trainer.retrieve export --out": Output("trainer.retrieve", "folder",
                                            lambda i, p: ["export", "--run", str(i.run), "--out", p], _earlier_index),
    "trainer.extract_features --out": Output("trainer.extract_features", "folder",
                                             lambda i, p: ["--shards", str(i.shards), "--out", p], _earlier_shards),
    "trainer.train run.out_dir": Output("trainer.train", "folder", _train_argv, _earlier_run),
}
# a full disk, each in a child process: (output, RLIMIT_FSIZE bytes)
FULL_DISK = (("shards build --out", 4096), ("trainer.train run.out_dir", 16384))


def output_options() -> set[str]:
    """Every output option of every command's parser (dest in OUTPUT_DESTS) and the output config keys."""
    from bad_input_generated import _subparsers, command_parsers

    found = {f"trainer.train {k}" for k in OUTPUT_KEYS}
    for command, top in command_parsers().items():
        if command == "trainer.train_args":  # the same parser as trainer.train's
            continue
        for path, parser in _subparsers(top):
            for action in parser._actions:
                if action.option_strings and action.dest in OUTPUT_DESTS:
                    found.add(" ".join((command, *path, max(action.option_strings, key=len))))
    return found


# kind -> makes the bad path in the case folder; returns the path as typed (what the line must name)
def _device(d: Path) -> str:
    path = d / "device"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        os.mkfifo(path)
    return str(path)


def _folder(d: Path) -> str:
    (d / "a_folder").mkdir()
    (d / "a_folder" / "kept.txt").write_text("kept")
    return str(d / "a_folder")


def _file(d: Path) -> str:
    (d / "a_file").write_text("a file the user keeps")
    return str(d / "a_file")


def _under_file(d: Path) -> str:
    (d / "blocker").write_text("a regular file")
    return str(d / "blocker" / "out")


KINDS: dict[str, Callable[[Path], str]] = {
    "device": _device,
    "read_only": _under_file,
    "missing_parent": lambda d: str(d / "nowhere" / "deeper" / "out"),
}
FILE_KINDS = {"folder": _folder, "ends_in_slash": lambda d: f"{d}/newdir/"}
FOLDER_KINDS = {"existing_file": _file}


def output_cases() -> list[GenCase]:
    cases = []
    for target, out in OUTPUTS.items():
        kinds = [*KINDS, *(FILE_KINDS if out.kind == "file" else FOLDER_KINDS), "earlier_output"]
        if out.kind == "folder":  # a folder's missing parents are made (mkdir -p): not a refusal
            kinds.remove("missing_parent")
        cases += [GenCase("outputs", f"outputs:{target}:{kind}", target, kind, kind, entry=out.entry)
                  for kind in kinds]
    cases += [GenCase("outputs", f"outputs:{target}:full_disk", target, "full_disk", str(limit),
                      entry=OUTPUTS[target].entry) for target, limit in FULL_DISK]
    return cases


def _make_path(case: GenCase, d: Path) -> str:
    if case.kind == "earlier_output":
        path = d / ("model.pt" if OUTPUTS[case.target].kind == "file" else "earlier")
        OUTPUTS[case.target].earlier(path)
        return str(path)
    if case.kind == "full_disk":
        return str(d / "out")
    return {**KINDS, **FILE_KINDS, **FOLDER_KINDS}[case.kind](d)


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> its kind and, for a file, the hash of its bytes (a device by its numbers)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISREG(mode):
            out[str(path.relative_to(folder))] = "file " + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            out[str(path.relative_to(folder))] = f"device {path.lstat().st_rdev}"
        else:
            out[str(path.relative_to(folder))] = stat.filemode(mode)[0]
    return out


def _changes(before: dict, after: dict) -> list[str]:
    return sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)})


def _stand_in_train(cfg, overwrite: bool = False):
    """What prepare() refuses before any work, in its order: the config's inputs, then the run folder's owner."""
    import torch

    from trainer.distributed import DistInfo
    from trainer.engine.checkpoint import claim_run_folder
    from trainer.training.loop import refuse_before_work

    refuse_before_work(cfg, DistInfo(0, 1, 0, 1, torch.device("cpu")))
    claim_run_folder(Path(cfg.run.out_dir), overwrite, True)
    raise _Accepted(cfg)


def run_output_cases(cases: list[GenCase], shards: Path, scratch: Path) -> list[GenResult]:
    """The in-process cases one after the other, the full-disk ones in child processes beside them."""
    import importlib

    from bad_input_generated import COMMANDS


    scratch.mkdir(parents=True, exist_ok=True)
    run = scratch / "fake_run"
    run.mkdir(parents=True, exist_ok=True)
    inputs = Inputs(shards, run)
    own = [c for c in cases if c.kind == "full_disk"]
    with ThreadPoolExecutor(2) as pool:
        children = [pool.submit(_full_disk, c, inputs, scratch / f"case{n}") for n, c in enumerate(own)]
        results = []
        with train_replaced(_stand_in_train):
            for n, case in enumerate(c for c in cases if c.kind != "full_disk"):
                d = scratch / f"case{len(own) + n}"
                d.mkdir()
                path = _make_path(case, d)
                before = snapshot(d)
                start = time.perf_counter()
                main = importlib.import_module(COMMANDS[case.entry]).main
                code, _out, err, stopped, tb = _call(main, OUTPUTS[case.target].argv(inputs, path))
                results.append(_judge(case, path, code, err, stopped, tb, _changes(before, snapshot(d)),
                                      time.perf_counter() - start))
        results += [f.result() for f in children]
    return results


def _judge(case: GenCase, path: str, code, err: str, stopped, tb: str, changed: list[str],
           seconds: float) -> GenResult:
    if tb:
        outcome, detail = "traceback", tb[-2000:]
    elif stopped is not None:
        outcome, detail = "silently_accepted", f"{case.target} {path} ({case.kind}) accepted"
    else:
        outcome, detail = judge_refusal(code, err, (path,))
    if changed and outcome != "traceback":
        outcome, detail = "half_written", f"changed in the case folder: {changed[:8]}; {detail}"
    return GenResult(case.name, case.family, case.target, case.kind, outcome, detail, round(seconds, 4))


def _full_disk(case: GenCase, inputs: Inputs, d: Path) -> GenResult:
    """The command in a child process whose writes fail past case.value bytes (EFBIG, as ENOSPC would)."""
    import resource
    import signal

    from bad_input_matrix import TEMPORARY_MARKS, child_env

    d.mkdir(parents=True)
    path = _make_path(case, d)
    limit = int(case.value)

    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    start = time.perf_counter()
    entry = {"trainer.train": "trainer.train"}.get(case.entry, case.entry)
    try:
        done = subprocess.run([sys.executable, "-m", entry, *OUTPUTS[case.target].argv(inputs, path)],
                              capture_output=True, text=True, cwd=REPO, env=child_env(), preexec_fn=preexec,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return GenResult(case.name, case.family, case.target, case.kind, "hang", "no answer in 120 s")
    # the work had started: its progress and log lines may come first; the refusal is the last line, alone
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    last = lines[-1] + "\n" if lines and "Traceback (most recent call last)" not in done.stderr else done.stderr
    outcome, detail = judge_refusal(done.returncode, last, (path,))
    resumable = "--resume" in detail
    temporaries = [str(p) for p in d.rglob("*") if any(m in p.name for m in TEMPORARY_MARKS)
                   and not (resumable and ".partial" in p.name)]
    if temporaries:
        outcome, detail = "half_written", f"temporaries left: {temporaries[:5]}; {detail}"
    # bounded by the timeout above (a child process takes its imports' seconds, past CASE_BOUND_S)
    return GenResult(case.name, case.family, case.target, case.kind, outcome,
                     f"{detail} ({time.perf_counter() - start:.1f} s)")

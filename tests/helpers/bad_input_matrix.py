"""The bad-input matrix (issue 17): every entry point fed missing, empty, truncated, corrupt, wrong-type and
wrong-kind files, wrong options, folders where files belong, unwritable outputs, a full disk and an interrupt.

Each case must end with its documented exit code (2: refused; 130: interrupted), exactly ONE line on stderr that
names the file, key or option (`expect`) and no traceback, and leave nothing half-written (`absent`: paths that
must not exist afterwards; temporaries are looked for in every case's scratch folder).

Run by tests/integration/test_bad_inputs.py (one assertion per case) and bench/bad_inputs.py (counts as one JSON line).
Costs are kept low: one tiny shard set and one tiny trained run (and its retrieval index) made once; the
in-process cases run in ONE worker process through each entry point's main(argv) (the 3-4 s torch + DeepSpeed
import paid once, with stdout/stderr captured per case), beside the cases that need a process of their own
(launch scripts, Ctrl-C, a full disk, the noise of a real start), which run in parallel.

Read-only outputs: the tests run as root, which ignores permission bits, so an unwritable output is simulated by
a path under a regular FILE (mkdir and open fail as they would on a read-only folder: ENOTDIR). A full disk is
simulated with RLIMIT_FSIZE in the child (writes past the limit fail with EFBIG, as ENOSPC would).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENTRY_POINTS = {  # module -> its main(argv); `python -m MODULE` in subprocess cases
    "shards": "shards.__main__", "trainer.train": "trainer.train", "trainer.evaluate": "trainer.evaluate",
    "trainer.export": "trainer.export", "trainer.retrieve": "trainer.retrieve",
    "trainer.extract_features": "trainer.extract_features", "trainer.plan": "trainer.plan",
}
TEMPORARY_MARKS = (".tmp", ".partial")


@dataclass
class Fixtures:
    """The shared inputs: a shard set, a trained run (ZeRO 0, 2 steps) and its test-split index."""

    shards: Path
    run: Path
    index: Path
    picture: Path  # a real picture of the test split


@dataclass
class Ctx:
    """What a case builds its inputs from: the fixtures and a scratch folder of its own."""

    fx: Fixtures
    tmp: Path

    def copy_shards(self) -> Path:
        return Path(shutil.copytree(self.fx.shards, self.tmp / "shards"))

    def copy_run(self) -> Path:
        return Path(shutil.copytree(self.fx.run, self.tmp / "run"))

    def file(self, name: str, data: bytes | str = b"") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def config(self, *lines: str) -> Path:
        """A YAML config on the fixture shard set, tiny model, plus `lines`."""
        base = [f"base: {REPO / 'configs' / 'builtin.yaml'}", f"run:\n  out_dir: {self.tmp / 'out'}",
                f"engine:\n  deepspeed_config: {REPO / 'configs' / 'deepspeed' / 'zero0.json'}"]
        return self.file("config.yaml", "\n".join(base + list(lines)) + "\n")

    def good_train(self, *overrides: str) -> list[str]:
        return ["--config", str(REPO / "configs" / "builtin.yaml"), f"data.shards={self.fx.shards}",
                f"run.out_dir={self.tmp / 'out'}", *TINY_MODEL, *overrides]


TINY_MODEL = ("data.batch_size=16", "model.embed_dim=32", "model.cnn_width=16", "model.gru_hidden=32",
              "model.word_dim=16", "data.num_workers=0", "data.shuffle_buffer=64",
              f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero0.json'}")


@dataclass
class Case:
    name: str
    entry: str  # a key of ENTRY_POINTS, or "bash" (args[0] is the script)
    make: Callable[[Ctx], list[str]]  # builds the bad input in ctx.tmp and returns the argv
    expect: tuple[str, ...]  # substrings of the one line: the file/key/option named and the way out
    code: int = 2
    own_process: bool = False  # launch scripts, signals, limits: a real process
    env: Callable[[Ctx], dict] | None = None
    absent: Callable[[Ctx], list[Path]] | None = None  # must not exist afterwards (nothing half-written)
    interrupt_when: Callable[[Ctx], bool] | None = None  # SIGINT once this holds (polled; own_process only)
    file_size_limit: int | None = None  # RLIMIT_FSIZE bytes in the child: a full disk (own_process only)


@dataclass
class Result:
    name: str
    entry: str
    code: int
    stderr: str
    stdout: str
    traceback: bool
    one_line: bool
    named: bool
    half_written: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clear(self) -> bool:
        return self.one_line and self.named and not self.traceback

    def problems(self, case: "Case") -> list[str]:
        out = []
        if self.code != case.code:
            out.append(f"exit code {self.code}, expected {case.code}")
        if self.traceback:
            out.append("traceback")
        if not self.one_line:
            out.append("stderr is not one line")
        if not self.named:
            out.append(f"message lacks {case.expect}")
        if self.half_written:
            out.append(f"half-written: {self.half_written}")
        return out


# ---------------------------------------------------------------------------------------------- judging


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def judge(case: Case, ctx: Ctx, code: int, out: str, err: str, crashed: bool, seconds: float) -> Result:
    lines = _lines(err)
    tb = crashed or "Traceback (most recent call last)" in err + out
    message = lines[0] if len(lines) == 1 else ""
    named = bool(message) and all(e.format(tmp=ctx.tmp, fx=ctx.fx) in message for e in case.expect)
    half = [str(p) for p in (case.absent(ctx) if case.absent else []) if p.exists()]
    half += [str(p) for p in ctx.tmp.rglob("*") if any(mark in p.name for mark in TEMPORARY_MARKS)
             and not _allowed_partial(case, message, p)]
    return Result(case.name, case.entry, code, err, out, tb, len(lines) == 1, named, half, round(seconds, 2))


def _allowed_partial(case: Case, message: str, path: Path) -> bool:
    """An interrupted shard build keeps its finished shards and .partial record for `--resume`, which its
    message names: resumable state, not a half-written result."""
    return "--resume" in message and (path.name.endswith(".partial") or ".partial." in path.name)


# ---------------------------------------------------------------------------------------------- running


def run_in_process(case: Case, ctx: Ctx) -> Result:
    """main(argv) of the entry point with stdout and stderr captured; an escaping exception is a traceback."""
    import importlib

    main = importlib.import_module(ENTRY_POINTS[case.entry]).main
    argv = case.make(ctx)
    out, err = io.StringIO(), io.StringIO()
    crashed = False
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except BaseException:  # noqa: BLE001 (anything else escaping main is what a user would see as a traceback)
            traceback.print_exc()
            code, crashed = 1, True
    return judge(case, ctx, int(code or 0), out.getvalue(), err.getvalue(), crashed, time.perf_counter() - start)


def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    # this interpreter first on PATH: the launch scripts' `python`, torchrun and deepspeed are the project's
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    env.update(extra or {})
    return env


def run_own_process(case: Case, ctx: Ctx) -> Result:
    argv = case.make(ctx)
    cmd = ["bash", *argv] if case.entry == "bash" else [sys.executable, "-m", case.entry, *argv]
    limit = case.file_size_limit

    def preexec() -> None:
        # A command started in the background by a non-interactive shell (`make test &`, some CI runners) inherits
        # SIGINT ignored, and Python then installs no KeyboardInterrupt handler: the child gets Ctrl-C as a user would.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if limit is not None:  # writes past the limit fail with EFBIG instead of killing the process (SIGXFSZ)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=child_env(case.env(ctx) if case.env else None), preexec_fn=preexec)
    if case.interrupt_when is not None:
        while proc.poll() is None and not case.interrupt_when(ctx):
            time.sleep(0.05)
        time.sleep(0.5)  # into the work, past the point the condition marks
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return judge(case, ctx, proc.returncode, out, err, False, time.perf_counter() - start)


def run_cases(cases: list[Case], fx: Fixtures, scratch: Path) -> list[Result]:
    """In-process cases here, one after the other (this process pays the imports once)."""
    results = []
    with _logs_to_current_stderr():
        for case in cases:
            ctx = Ctx(fx, scratch / case.name)
            ctx.tmp.mkdir(parents=True, exist_ok=True)
            results.append(run_in_process(case, ctx))
    return results


@contextlib.contextmanager
def _logs_to_current_stderr():
    """Log records go to whatever sys.stderr is at the time (each case's capture), as a user's terminal shows
    them: a refusal preceded by log lines is not one line."""
    import logging

    class Current(logging.StreamHandler):
        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, _value):
            pass

    root = logging.getLogger()
    handler = Current()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def run_matrix(fx: Fixtures, scratch: Path, cases: list[Case] | None = None, jobs: int = 2) -> list[Result]:
    """Every case: the in-process ones in one worker process, the own-process ones beside it in parallel."""
    from bad_input_cases import all_cases  # noqa: E402 (the cases import this module's helpers)

    cases = cases or all_cases()
    inline = [c for c in cases if not c.own_process]
    own = [c for c in cases if c.own_process]
    scratch.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        worker = pool.submit(_worker, [c.name for c in inline], fx, scratch)
        others = [pool.submit(_own, c, fx, scratch) for c in own]
        results = worker.result() + [f.result() for f in others]
    order = {c.name: i for i, c in enumerate(cases)}
    return sorted(results, key=lambda r: order[r.name])


def _own(case: Case, fx: Fixtures, scratch: Path) -> Result:
    ctx = Ctx(fx, scratch / case.name)
    ctx.tmp.mkdir(parents=True, exist_ok=True)
    return run_own_process(case, ctx)


def _worker(names: list[str], fx: Fixtures, scratch: Path) -> list[Result]:
    """One process runs the in-process cases (named), writing their results as JSON."""
    out = scratch / "inline_results.json"
    args = [sys.executable, str(Path(__file__)), "--worker", json.dumps({k: str(v) for k, v in asdict(fx).items()}),
            str(scratch), str(out), *names]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"the in-process worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return [Result(**r) for r in json.loads(out.read_text())]


def summary(results: list[Result]) -> dict:
    return {"tried": len(results), "clear": sum(r.clear for r in results),
            "traceback": sum(r.traceback for r in results), "half_written": sum(bool(r.half_written) for r in results)}


# ---------------------------------------------------------------------------------------------- fixtures


def make_fixtures(root: Path, shards: Path) -> Fixtures:
    """The tiny trained run and its index on `shards`, made once in a process of their own (kept under root)."""
    run, index = root / "run", root / "index"
    picture = root / "query.png"
    if not (index / "index.json").is_file():
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bad_input_matrix as m; "
                f"m._train_and_index({str(shards)!r}, {str(run)!r}, {str(index)!r}, {str(picture)!r})")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                              env=child_env(), timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"could not train the matrix's run:\n{done.stderr[-4000:]}")
    return Fixtures(shards, run, index, picture)


def _train_and_index(shards: str, run: str, index: str, picture: str) -> None:
    import tarfile

    from trainer.config import load_config
    from trainer.distributed import shutdown
    from trainer.retrieval.commands import export_index
    from trainer.training.loop import train

    train(load_config(REPO / "configs" / "builtin.yaml", [
        f"data.shards={shards}", f"run.out_dir={run}", *TINY_MODEL, "train.steps=2", "train.log_every=1",
        "train.eval_every=0", "train.ckpt_every=0"]))
    export_index(run, index)
    shutdown()
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    with tarfile.open(Path(shards) / manifest["splits"]["test"]["shards"][0]) as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        Path(picture).write_bytes(tar.extractfile(png).read())


def _worker_main(argv: list[str]) -> None:
    fx_json, scratch, out, *names = argv
    sys.path.insert(0, str(Path(__file__).parent))
    from bad_input_cases import all_cases

    fx = Fixtures(**{k: Path(v) for k, v in json.loads(fx_json).items()})
    wanted = set(names)
    results = run_cases([c for c in all_cases() if c.name in wanted], fx, Path(scratch))
    Path(out).write_text(json.dumps([asdict(r) for r in results]))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(sys.argv[2:])

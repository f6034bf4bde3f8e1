"""The CUDA path in minutes on one GPU: NCCL collectives (and their time per step), ZeRO 0/2/3 x fp32/bf16 with
evaluation, save and resume, engine.compile, and the step throughput against a bare PyTorch loop.

    bash bench/gpu_check.sh --kit .gpukit         # the GPU machine of a lease (docs/gpu_check.md: the device call)
    bash bench/gpu_check.sh                       # a GPU machine with the project installed
    python bench/gpu_check.py --steps 2 --train-images 128 --skip-compile --only collectives,zero0/fp32  # CPU

Each part is a command of its own (`python -m trainer.train` with overrides, `bench/step.py`, a probe of
trainer.distributed) under its own timeout, inside one budget for the whole check (8 minutes): a part that hangs
is killed with everything it started and the check goes on; a part that would start with too little budget left
is skipped. Every run is at world size 1: on a GPU the process group is `cpu:gloo,cuda:nccl` and every
collective runs (no world-size-1 shortcut), so a wrong device anywhere in the collective path fails here as it
would on 64 GPUs.

Written AS IT GOES into --out (default $OUT, else runs/gpu_check), three files, so that a command killed from
outside still leaves every part that finished: gpu_check.log (each part's output while it runs, headed by its
command), gpu_check.txt (the table, rewritten after each part) and gpu_check.json (every figure so far, one
line). The table and the JSON line are printed at the end too. Never part of the test suite.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
STAGES = ("zero0", "zero2", "zero3")
PRECISIONS = ("fp32", "bf16")
BUDGET_S = 480
# Each kind of part's own limit in seconds; no part runs past the end of the budget either. On an H200 a train
# run is expected to take 20-40 s (Python, torch and DeepSpeed start, 20 steps, test evaluation, a checkpoint).
CAPS_S = {"collectives": 90, "shards": 300, "train": 90, "resume": 90, "compile": 150, "step": 120}
MIN_START_S = 20  # a part that would have less than this left is skipped: it could only time out
# The shard set the check trains on; bench/gpu_kit.sh builds the same one (--build-shards) so that the GPU machine
# needs no spaCy. 2048 pictures are 16 batches of 128 (the stream starts a new epoch after that).
SHARD_OPTIONS = ("--val-images", "128", "--test-images", "128", "--shard-size", "256", "--pos", "NOUN,ADJ",
                 "--spacy-pipeline", "blank", "--min-concept-count", "2")
TRAIN_IMAGES = 2048
SHARD_STAMP = ".gpu_check-shards"  # in a shard set built by --build-shards: the options it was built with
LOG, TABLE, JSON_FILE = "gpu_check.log", "gpu_check.txt", "gpu_check.json"
NCCL_PROBE = """
import json, time, torch, deepspeed
import torch.distributed as dist
from trainer import distributed as d
info = d.init_distributed()
sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
host = d.all_reduce_sum(torch.tensor([1]))
dev = d.all_reduce_sum(torch.ones(1, device=info.device))
x = torch.ones(4, 3, device=info.device, requires_grad=True)
d.gather_with_grad(x).sum().backward()
rows = d.gather_rows_to_main(torch.zeros(0, 8, device=info.device))
def per_call_ms(fn, calls=50):
    fn(); sync(); start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return round(1000 * (time.perf_counter() - start) / calls, 4)
emb = torch.randn(128, 128, device=info.device, requires_grad=True)  # a step's embeddings: batch 128 x dim 128
flag = torch.zeros(4, device=info.device)  # the per-step all-reduce (update flag, data counts, stop flag)
backend = dist.get_backend_config() if hasattr(dist, "get_backend_config") else dist.get_backend()
print(json.dumps({"backend": str(backend), "device": str(info.device),
                  "device_name": torch.cuda.get_device_name(0) if info.device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if info.device.type == "cuda" else None,
                  "host_sum": host.tolist(), "device_sum": dev.tolist(), "grad_ok": bool((x.grad == 1).all()),
                  "empty_rows": list(rows.shape), "object": d.broadcast_object({"ok": 1}),
                  "gather_ms": per_call_ms(lambda: d.gather_with_grad(emb)),
                  "all_reduce_ms": per_call_ms(lambda: d.all_reduce_sum(flag))}))
d.shutdown()
"""


class Interrupted(Exception):  # noqa: N818 - a request to stop, not an error of the check
    """The check itself was told to stop (SIGTERM, SIGINT): the part running is killed and recorded first."""


@dataclass(frozen=True)
class Part:
    """One command of the check: its table name (also the --only key), kind (for its limit), command, the
    reader of its figures (given the part's own slice of the log) and the part that must have passed first."""
    name: str
    kind: str
    cmd: list[str]
    read: Callable[[str], dict]
    needs: str | None = None


# ------------------------------------------------------------------------------------------ the parts
def shard_command(out: Path, train_images: int) -> list[str]:
    return [sys.executable, "-m", "shards", "build", "--source", "builtin", "--out", str(out), "--train-images",
            str(train_images), *SHARD_OPTIONS]


def train_command(shards: Path, out: Path, zero: str, precision: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "trainer.train", "--config", "configs/builtin.yaml", f"data.shards={shards}",
            f"run.out_dir={out}", f"engine.deepspeed_config=configs/deepspeed/{zero}.json",
            f"engine.precision={precision}", f"data.batch_size={args.batch_size}", f"train.steps={args.steps}",
            f"train.log_every={max(1, args.steps // 4)}", "train.eval_every=0", f"train.ckpt_every={args.steps}",
            f"data.num_workers={args.num_workers}", "data.eval_batch_size=256"]


def read_train(out: Path, _log: str, after_step: int = 0) -> dict:
    """Figures of a train run from its train_log.jsonl (rows past `after_step`: a resumed run appends) and its
    test evaluation."""
    result: dict = {}
    log_path = out / "train_log.jsonl"
    if log_path.is_file():
        rows = [r for r in map(json.loads, log_path.read_text().splitlines()) if r["step"] > after_step]
        if rows:  # the first window holds the start-up (and compilation): left out of the median when possible
            result["samples_per_s"] = round(statistics.median(r["train/samples_per_s"] for r in rows[1:] or rows), 1)
            result["max_mem_gb"] = round(max(r.get("train/max_mem_gb", 0.0) for r in rows), 3)
        result["steps_logged"] = [r["step"] for r in rows]
    test = out / "eval" / "test.json"
    if test.is_file():
        result["test_concat_rsum"] = round(json.loads(test.read_text())["concat"]["rsum"], 1)
    return result


def read_last_json(log: str) -> dict:
    """The last line of the part's output that is a JSON object (the probe's and bench/step.py's summary)."""
    for line in reversed(log.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def read_step(log: str) -> dict:
    summary = read_last_json(log)
    if not summary:
        return {}
    return {"samples_per_s": summary["median_trainer_samples_per_s"],
            "bare_samples_per_s": summary["median_bare_samples_per_s"], "ratio": summary["median_ratio"],
            "parts_ms": summary.get("parts_ms")}


def plan(shards: Path, work: Path, args: argparse.Namespace) -> list[Part]:
    """Every part, in the order they run: the figures a lease is for first (collectives, ZeRO 0, throughput,
    compile), then the ZeRO 2/3 runs and the resume."""
    def train(zero: str, precision: str) -> Part:
        out = work / f"{zero}-{precision}"
        return Part(f"{zero}/{precision}", "train", train_command(shards, out, zero, precision, args),
                    functools.partial(read_train, out))

    def step(precision: str) -> Part:
        cmd = [sys.executable, "bench/step.py", "--shards", str(shards), "--rounds", "3", "--steps", "10",
               f"engine.precision={precision}", f"data.batch_size={args.batch_size}",
               f"data.num_workers={args.num_workers}"]
        return Part(f"step/{precision}", "step", cmd, read_step)

    resumed, compiled = work / "zero2-bf16", work / "compile"
    resume_cmd = [*train_command(shards, resumed, "zero2", "bf16", args), f"train.steps={args.steps + 10}",
                  "--resume", "latest"]
    parts = [Part("collectives", "collectives", [sys.executable, "-c", NCCL_PROBE], read_last_json),
             train("zero0", "fp32"), train("zero0", "bf16"), step("fp32"), step("bf16"),
             Part("compile", "compile", [*train_command(shards, compiled, "zero0", "bf16", args),
                                         "engine.compile=true"], functools.partial(read_train, compiled)),
             train("zero2", "fp32"), train("zero2", "bf16"),
             Part("resume", "resume", resume_cmd, functools.partial(read_train, resumed, after_step=args.steps),
                  needs="zero2/bf16"),
             train("zero3", "fp32"), train("zero3", "bf16")]
    return [p for p in parts if not (args.skip_compile and p.name == "compile")]


# ------------------------------------------------------------------------------------------ running them
def stop_group(proc: subprocess.Popen) -> None:
    """End a part and everything it started (data workers, compile workers): TERM, then KILL after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class Check:
    """Runs the parts one after another inside the budget; after each one, rewrites the table and the JSON."""

    def __init__(self, out_dir: Path, budget_s: float, header: dict):
        self.out_dir = out_dir
        self.deadline = time.monotonic() + budget_s
        self.started = time.monotonic()
        self.results: dict = {**header, "budget_s": budget_s, "parts": {}}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / LOG).write_text("")
        self.write()

    def run(self, part: Part) -> dict:
        left = self.deadline - time.monotonic()
        need = part.needs and self.results["parts"].get(part.needs, {}).get("status")
        if need not in (None, "ok"):
            result = {"status": "skipped", "why": f"needs {part.needs} ({need or 'not run'})"}
        elif left < MIN_START_S:
            result = {"status": "skipped", "why": f"budget ({left:.0f} s left)"}
        else:
            result = self.execute(part, min(CAPS_S[part.kind], left))
        self.record(part.name, result)
        return result

    def execute(self, part: Part, timeout: float) -> dict:
        log_path = self.out_dir / LOG
        with log_path.open("a") as log:
            log.write(f"\n===== {part.name} (timeout {timeout:.0f} s): {shlex.join(part.cmd)}\n")
            log.flush()
            offset, start = log.tell(), time.monotonic()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(part.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # its own group: a timeout ends its workers too
            try:
                code = proc.wait(timeout)
                status = "ok" if code == 0 else "failed"
            except subprocess.TimeoutExpired:
                stop_group(proc)
                code, status = proc.returncode, "timeout"
                log.write(f"\n===== {part.name}: killed at its timeout ({timeout:.0f} s)\n")
            except Interrupted as stop:
                stop_group(proc)
                log.write(f"\n===== {part.name}: killed, the check was stopped ({stop})\n")
                log.flush()
                self.record(part.name, {"status": "killed", "seconds": round(time.monotonic() - start, 1)})
                raise
        result = {"status": status, "exit": code, "seconds": round(time.monotonic() - start, 1),
                  "timeout_s": round(timeout)}
        with log_path.open() as log:
            log.seek(offset)
            own_output = log.read()
        try:
            result.update(part.read(own_output))
        except (OSError, ValueError, KeyError, TypeError, statistics.StatisticsError) as e:
            result["read_error"] = f"{type(e).__name__}: {e}"
        if status == "ok" and part.name == "resume" and not result.get("steps_logged"):
            result["status"] = "failed"  # it exited 0 but trained no step past the checkpoint
        return result

    def record(self, name: str, result: dict) -> None:
        self.results["parts"][name] = result
        self.results["seconds"] = round(time.monotonic() - self.started, 1)
        self.results["summary"] = summarise(self.results["parts"])
        self.write()
        print(table_row(name, result), flush=True)

    def write(self) -> None:
        """Both files replaced whole (write, then rename): a kill in between leaves the previous version."""
        for name, text in ((JSON_FILE, json.dumps(self.results) + "\n"), (TABLE, render_table(self.results))):
            tmp = self.out_dir / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out_dir / name)


# ------------------------------------------------------------------------------------------ the report
def summarise(parts: dict) -> dict:
    """The figures a lease's closing note asks for, from whichever parts have run."""
    runs = [r for name, r in parts.items() if "/" in name or name in ("resume", "compile")]
    steps = {name.split("/")[1]: {k: r[k] for k in ("samples_per_s", "bare_samples_per_s", "ratio")}
             for name, r in parts.items() if name.startswith("step/") and "ratio" in r}
    base, compiled = parts.get("zero0/bf16", {}), parts.get("compile", {})
    speedup = (round(compiled["samples_per_s"] / base["samples_per_s"], 3)
               if compiled.get("samples_per_s") and base.get("samples_per_s") else None)
    mems = [r["max_mem_gb"] for r in runs if r.get("max_mem_gb")]
    return {"step_samples_per_s": steps, "peak_mem_gb": max(mems) if mems else None,
            "gather_ms": parts.get("collectives", {}).get("gather_ms"), "compile_speedup": speedup,
            "failed": [n for n, r in parts.items() if r["status"] in ("failed", "timeout", "killed")],
            "skipped": [n for n, r in parts.items() if r["status"] == "skipped"]}


HEADER = f"{'part':>12} {'status':>8} {'exit':>5} {'s':>6} {'samples/s':>10} {'mem GB':>7} {'rSum':>6}  note"


def table_row(name: str, r: dict) -> str:
    if "ratio" in r:
        note = f"bare {r['bare_samples_per_s']} samples/s, trainer/bare {r['ratio']}"
    elif "gather_ms" in r:
        note = f"{r.get('device_name')}, gather {r['gather_ms']} ms, all-reduce {r.get('all_reduce_ms')} ms"
    else:
        note = r.get("why") or r.get("read_error") or ""
    return (f"{name:>12} {r['status']:>8} {str(r.get('exit', '-')):>5} {r.get('seconds', '-'):>6} "
            f"{r.get('samples_per_s', '-'):>10} {r.get('max_mem_gb', '-'):>7} {r.get('test_concat_rsum', '-'):>6}"
            f"  {note}").rstrip()


def render_table(results: dict) -> str:
    s = results.get("summary", {})
    lines = [HEADER, *(table_row(name, r) for name, r in results["parts"].items()), "",
             f"step samples/s (trainer vs bare): {json.dumps(s.get('step_samples_per_s', {}))}",
             f"peak memory {s.get('peak_mem_gb')} GB; NCCL gather {s.get('gather_ms')} ms per step; "
             f"compile speed-up {s.get('compile_speedup')}; {results.get('seconds', 0)} s of {results['budget_s']}",
             f"failed: {', '.join(s.get('failed', [])) or 'none'}; "
             f"skipped: {', '.join(s.get('skipped', [])) or 'none'}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=4, help="decoding workers of every run")
    parser.add_argument("--train-images", type=int, default=TRAIN_IMAGES, help="when the check builds its shards")
    parser.add_argument("--shards", type=Path, help="a shard set built before (the kit's); default: build one")
    parser.add_argument("--build-shards", type=Path, metavar="DIR",
                        help="only build the check's shard set there (nothing to do when it is up to date)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "runs" / "gpu_check"))
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole check's time")
    parser.add_argument("--only", type=lambda s: set(s.split(",")), help="comma-separated part names")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.shards = args.shards.resolve() if args.shards else None
    args.build_shards = args.build_shards.resolve() if args.build_shards else None
    return args


def build_shards(out: Path, train_images: int) -> int:
    """The check's shard set in `out`, built beside it and renamed into place when complete; nothing is done
    when `out` already holds one built with the same options (its stamp file says so)."""
    options = shlex.join([*SHARD_OPTIONS, "--train-images", str(train_images)])
    stamp = out / SHARD_STAMP
    if stamp.is_file() and stamp.read_text().strip() == options:
        print(f"shard set {out}: up to date")
        return 0
    if out.exists() and not (out / "manifest.json").is_file() and not stamp.is_file():
        print(f"gpu_check: error: {out} exists and holds no shard set; not replacing it", file=sys.stderr)
        return 2
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_name(out.name + ".log")
    with log.open("w") as f:
        code = subprocess.run(shard_command(partial, train_images), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              timeout=CAPS_S["shards"]).returncode
    if code != 0:
        print(f"shard set {out}: FAILED (exit {code}; {log})")
        return code
    (partial / SHARD_STAMP).write_text(options + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    print(f"shard set {out}: built ({options})")
    return 0


def interrupt(signum: int, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.shards is not None and not (args.shards / "manifest.json").is_file():
        print(f"gpu_check: error: no shard set at {args.shards} (no manifest.json); build one with --build-shards DIR",
              file=sys.stderr)
        return 2
    if args.build_shards:
        return build_shards(args.build_shards, args.train_images)
    unknown = sorted((args.only or set()) - {p.name for p in plan(Path("shards"), Path("work"), args)})
    if unknown:
        print(f"gpu_check: error: no part named {', '.join(unknown)} (--only takes the table's part names)",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    check = Check(args.out, args.budget_s, {"work": str(work), "steps": args.steps, "batch_size": args.batch_size})
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    print(HEADER, flush=True)
    try:
        shards = args.shards
        if shards is None:
            shards = work / "shards"
            if check.run(Part("shards", "shards", shard_command(shards, args.train_images),
                              lambda _log: {}))["status"] != "ok":
                print(f"gpu_check: building the shard set failed; see {args.out / LOG}", file=sys.stderr)
                return 1
        for part in plan(shards, work, args):
            if not args.only or part.name in args.only:
                check.run(part)
    except Interrupted as stop:
        print(f"gpu_check: stopped by {stop}; {args.out / JSON_FILE} holds what finished", file=sys.stderr)
        return 143
    print("\n" + render_table(check.results), end="")
    print(json.dumps(check.results), flush=True)
    return 1 if check.results["summary"]["failed"] or not check.results["parts"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""The CUDA path in a few minutes on one GPU: NCCL group, ZeRO 0/2/3 x fp32/bf16, evaluation, save and resume,
torch.compile, and the step throughput against a bare PyTorch loop. Prints a table and one JSON line.

    bash bench/gpu_check.sh                       # on a GPU machine, from the repository root (under 8 minutes)
    python bench/gpu_check.py --steps 2 --train-images 128 --skip-compile   # the same checks on a CPU (smoke)

Every run is the real trainer (`python -m trainer.train --config configs/builtin.yaml`) at world size 1: on a GPU
the process group is `cpu:gloo,cuda:nccl` and every collective runs (no world-size-1 shortcut), so a wrong device
anywhere in the collective path fails here as it would on 64 GPUs. Never part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("zero0", "zero2", "zero3")
PRECISIONS = ("fp32", "bf16")
NCCL_PROBE = """
import torch, json
from trainer import distributed as d
info = d.init_distributed()
import torch.distributed as dist
host = d.all_reduce_sum(torch.tensor([1]))
dev = d.all_reduce_sum(torch.ones(1, device=info.device))
x = torch.ones(4, 3, device=info.device, requires_grad=True)
d.gather_with_grad(x).sum().backward()
rows = d.gather_rows_to_main(torch.zeros(0, 8, device=info.device))
print(json.dumps({"backend": str(dist.get_backend_config()) if hasattr(dist, "get_backend_config") else dist.get_backend(),
                  "device": str(info.device), "host_sum": host.tolist(), "device_sum": dev.tolist(),
                  "grad_ok": bool((x.grad == 1).all()), "empty_rows": list(rows.shape),
                  "object": d.broadcast_object({"ok": 1})}))
d.shutdown()
"""


def run(cmd: list[str], log: Path, timeout: int) -> tuple[int, float]:
    start = time.time()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    return code, time.time() - start


def build_shards(out: Path, args: argparse.Namespace) -> Path:
    cmd = [sys.executable, "-m", "shards", "build", "--source", "builtin", "--out", str(out), "--train-images",
           str(args.train_images), "--val-images", "128", "--test-images", "128", "--shard-size", "256",
           "--pos", "NOUN,ADJ", "--spacy-pipeline", "blank", "--min-concept-count", "2"]
    code, _ = run(cmd, out.parent / "shards.log", 600)
    if code != 0:
        raise SystemExit(f"building shards failed; see {out.parent / 'shards.log'}")
    return out


def train_once(shards: Path, out: Path, zero: str, precision: str, args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "trainer.train", "--config", "configs/builtin.yaml", f"data.shards={shards}",
           f"run.out_dir={out}", f"engine.deepspeed_config=configs/deepspeed/{zero}.json",
           f"engine.precision={precision}", f"data.batch_size={args.batch_size}", f"train.steps={args.steps}",
           f"train.log_every={max(1, args.steps // 4)}", "train.eval_every=0", f"train.ckpt_every={args.steps}",
           "data.num_workers=4", "data.eval_batch_size=256", *extra]
    code, seconds = run(cmd, out.with_suffix(".log"), 600)
    result = {"exit": code, "seconds": round(seconds, 1)}
    log_path = out / "train_log.jsonl"
    if log_path.is_file():
        rows = [json.loads(line) for line in log_path.read_text().splitlines()]
        result["samples_per_s"] = round(statistics.median(r["train/samples_per_s"] for r in rows[1:] or rows), 1)
        result["max_mem_gb"] = max((r.get("train/max_mem_gb", 0.0) for r in rows), default=0.0)
        result["steps_logged"] = [r["step"] for r in rows]
    test = out / "eval" / "test.json"
    if test.is_file():
        result["test_concat_rsum"] = round(json.loads(test.read_text())["concat"]["rsum"], 1)
    return result


def step_bench(shards: Path, work: Path, *extra: str) -> dict:
    log = work / f"step{'-'.join(extra) or ''}.log"
    code, _ = run([sys.executable, "bench/step.py", "--shards", str(shards), "--rounds", "3", "--steps", "10",
                   *extra], log, 600)
    if code != 0:
        return {"exit": code}
    summary = json.loads(log.read_text().strip().splitlines()[-1])
    return {"trainer_samples_per_s": summary["median_trainer_samples_per_s"],
            "bare_samples_per_s": summary["median_bare_samples_per_s"], "ratio": summary["median_ratio"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=4096)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    out: dict = {"device": _device_name()}
    probe = subprocess.run([sys.executable, "-c", NCCL_PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    out["collectives"] = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else \
        {"exit": probe.returncode, "error": probe.stderr[-2000:]}
    shards = build_shards(work / "shards", args)
    out["runs"] = {f"{zero}/{precision}": train_once(shards, work / f"{zero}-{precision}", zero, precision, args)
                   for zero in STAGES for precision in PRECISIONS}
    resumed = train_once(shards, work / "zero2-bf16", "zero2", "bf16", args, f"train.steps={args.steps + 10}",
                         "--resume", "latest")
    out["resume_zero2_bf16"] = resumed
    if not args.skip_compile:
        out["compile_zero0_bf16"] = train_once(shards, work / "compile", "zero0", "bf16", args, "engine.compile=true")
    out["step_fp32"] = step_bench(shards, work)
    out["step_bf16"] = step_bench(shards, work, "engine.precision=bf16")
    failed = [k for k, v in out["runs"].items() if v["exit"] != 0] + \
        [k for k in ("resume_zero2_bf16", "compile_zero0_bf16") if k in out and out[k]["exit"] != 0]
    out.update(failed=failed, seconds=round(time.time() - started, 1), work=str(work))
    print(f"{'run':>20} {'exit':>5} {'s':>6} {'samples/s':>10} {'mem GB':>7} {'rSum':>6}")
    for name, r in {**out["runs"], "resume": resumed, **({"compile": out["compile_zero0_bf16"]}
                                                        if "compile_zero0_bf16" in out else {})}.items():
        print(f"{name:>20} {r['exit']:>5} {r['seconds']:>6} {r.get('samples_per_s', '-'):>10} "
              f"{r.get('max_mem_gb', '-'):>7} {r.get('test_concat_rsum', '-'):>6}")
    print(json.dumps(out))
    return 1 if failed or "error" in out["collectives"] else 0


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())

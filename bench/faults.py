"""Fault injection across the whole trainer: how many faults of each kind were injected, how many runs survived
them, how many good samples were lost (the goal: 0).

    python bench/faults.py                       # ~8 min on 2 busy CPU cores: data faults + 6 runs of 2 ranks
    python bench/faults.py --steps 8 --out runs/faults

Data: a tiny built-in shard set with every kind of bad sample (trainer.data.BAD_KINDS) put into each train
shard between the good ones, and one shard cut off mid-tar; the training stream of one pass must skip and
count each of them, and deliver every intact good sample.
Runs (2 gloo processes, ZeRO-2, deterministic data): an uninterrupted reference, and one run taken through
SIGKILL of both ranks -> --resume latest -> SIGUSR1 to one rank (preemption) -> the newest checkpoint
truncated -> --resume latest through launch/cpu_2proc.sh with SIGTERM sent to the script -> --resume latest to
the end. It survives if it ends with exactly the reference's parameters. Non-finite losses: a one-process run
with NaN gradients injected at 2 steps must finish, with both steps skipped and counted.
The last line printed is a JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402
from corrupt_shards import corrupt_copy  # noqa: E402

from trainer.data.samples import BAD_KINDS  # noqa: E402
from trainer.data.shardset import ShardSet, image_id_hash  # noqa: E402
from trainer.data.stream import StreamSettings, TrainStream  # noqa: E402

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TINY = ("data.batch_size=8", "model.embed_dim=32", "model.cnn_width=16", "model.gru_hidden=32", "model.word_dim=16",
        "data.image_size=32", "data.num_workers=1", "data.shuffle_buffer=64", "engine.threads=1", "train.log_every=1",
        "train.eval_every=0", "train.ckpt_every=2", "train.keep_checkpoints=3", "data.resampled=false")


def env(**extra: str) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    out.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    out.update(extra)
    return out


def build_shards(root: Path) -> Path:
    from shards.__main__ import main as shards_main

    out = root / "builtin"
    shards_main(["build", "--source", "builtin", "--out", str(out), "--train-images", "96", "--val-images", "32",
                 "--test-images", "32", "--shard-size", "16", "--min-concept-count", "2"])
    return out


def data_faults(shards: Path, root: Path, per_shard: int) -> dict:
    injected = corrupt_copy(shards, root / "corrupt", kinds_per_shard=per_shard)
    settings = StreamSettings(batch_size=1, image_size=32, max_words=16, shuffle_buffer=1, resampled=False,
                              batches_per_worker=10**9, seed=0)
    stream = TrainStream(ShardSet.open(root / "corrupt"), "train", settings, rank=0, world_size=1)
    items = list(stream)
    counted = dict(zip(BAD_KINDS, sum(item["bad_counts"] for item in items).tolist()))
    delivered = Counter(int(item["image_ids"][0]) for item in items if "images" in item)
    expected = Counter(image_id_hash(i) for i in injected["good_ids"])
    return {"injected": dict(injected["bad"]), "counted": counted,
            "good_expected": sum(expected.values()), "good_lost": sum((expected - delivered).values()),
            "unpickled": injected["witness"].exists()}


class Run:
    """One training run folder, launched as 2 plain rank processes or through launch/cpu_2proc.sh."""

    def __init__(self, shards: Path, out: Path, steps: int, logs: Path):
        self.shards, self.out, self.steps, self.logs = shards, out, steps, logs
        self.launches = 0

    def args(self) -> list[str]:
        return ["--config", str(REPO / "configs/builtin.yaml"), f"data.shards={self.shards}",
                f"run.out_dir={self.out}", f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero2.json'}",
                *TINY, f"train.steps={self.steps}"]

    def logged(self) -> list[int]:
        path = self.out / "train_log.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []

    def start(self, resume: bool, script: bool = False) -> list[subprocess.Popen]:
        self.launches += 1
        extra = ["--resume", "latest"] if resume else []
        log = (self.logs / f"{self.out.name}-{self.launches}.log").open("w")
        if script:
            return [subprocess.Popen(["bash", str(REPO / "launch/cpu_2proc.sh"), *self.args()[1:], *extra],
                                     env=env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)]
        port = str(_free_port())
        return [subprocess.Popen([sys.executable, "-m", "trainer.train", *self.args(), *extra], cwd=REPO,
                                 env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                                 stdout=log, stderr=subprocess.STDOUT) for r in range(2)]

    def wait_logged(self, count: int, procs: list, timeout: float = 600) -> bool:
        deadline = time.time() + timeout
        while len(self.logged()) < count:
            if any(p.poll() is not None for p in procs) or time.time() > deadline:
                return False
            time.sleep(0.1)
        return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(procs: list, timeout: float = 900) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def run_faults(shards: Path, root: Path, steps: int) -> dict:
    from trainer.tools.export import export

    logs = root / "logs"
    logs.mkdir()
    reference = Run(shards, root / "reference", steps, logs)
    ok_reference = wait(reference.start(resume=False)) == [0, 0]
    run = Run(shards, root / "interrupted", steps, logs)
    injected: Counter = Counter()
    exits: list[int] = []

    procs = run.start(resume=False)  # 1. SIGKILL both ranks mid-run
    if run.wait_logged(3, procs):
        for p in procs:
            p.send_signal(signal.SIGKILL)
        injected["sigkill_both_ranks"] += 1
    wait(procs)

    procs = run.start(resume=True)  # 2. SIGUSR1 to rank 1 only
    if run.wait_logged(len(run.logged()) + 2, procs):
        procs[1].send_signal(signal.SIGUSR1)
        injected["sigusr1_one_rank"] += 1
    exits += wait(procs)

    from trainer.engine import checkpoint  # 3. the newest checkpoint truncated (as by a full disk)
    newest = (run.out / "checkpoints" / "latest").read_text()
    victim = run.out / "checkpoints" / newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    injected["truncated_checkpoint"] += 1
    fallback = checkpoint.find(run.out / "checkpoints", "latest")[0]

    procs = run.start(resume=True, script=True)  # 4. SIGTERM to the launch script (torchrun underneath)
    if run.wait_logged(len(run.logged()) + 2, procs):
        procs[0].send_signal(signal.SIGTERM)
        injected["sigterm_launch_script"] += 1
    exits += wait(procs)

    exits += wait(run.start(resume=True))  # 5. to the end
    finished = run.logged()[-1:] == [steps]
    same = False
    if ok_reference and finished:
        a = export(reference.out, root / "reference.pt")["state_dict"]
        b = export(run.out, root / "interrupted.pt")["state_dict"]
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"injected": dict(injected), "reference_ok": ok_reference, "exit_codes": exits,
            "fell_back_from": newest, "fell_back_to": fallback, "finished": finished,
            "bit_identical_to_reference": same, "survived": int(finished and same and all(c == 0 for c in exits))}


def nonfinite_run(shards: Path, root: Path) -> dict:
    """One process (this one): NaN gradients at 2 separate steps; the run must finish with both skipped."""
    import trainer.training.loop as train_module
    from trainer.config import load_config

    build_loss = train_module.build_loss

    def nan_at_steps(cfg):
        loss_fn = build_loss(cfg)

        def patched(*args, step: int, **kwargs):
            losses = loss_fn(*args, step=step, **kwargs)
            if step in (2, 4):
                losses["loss"] = losses["loss"] * float("nan")
            return losses
        return patched

    train_module.build_loss = nan_at_steps
    out = root / "nonfinite"
    cfg = load_config(REPO / "configs/builtin.yaml", [f"data.shards={shards}", f"run.out_dir={out}", *TINY,
                                                       "train.steps=6", "data.num_workers=0"])
    try:
        train_module.train(cfg)
        survived = 1
    except RuntimeError:
        survived = 0
    finally:
        train_module.build_loss = build_loss
    last = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    return {"injected": {"nonfinite_step": 2}, "counted": last["train/nonfinite_steps"], "survived": survived}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps of each 2-rank run")
    parser.add_argument("--per-shard", type=int, default=2, help="bad samples of each kind per train shard")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="faults-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        shards = build_shards(root)
        data = data_faults(shards, root, args.per_shard)
        print(f"data: injected {data['injected']}\n      counted  {data['counted']}\n"
              f"      good samples lost {data['good_lost']} of {data['good_expected']}, unpickled: {data['unpickled']}",
              flush=True)
        runs = run_faults(shards, root, args.steps)
        print(f"runs: injected {runs['injected']}, exit codes {runs['exit_codes']}, checkpoint fallback "
              f"{runs['fell_back_from']} -> {runs['fell_back_to']}, bit-identical to the uninterrupted run: "
              f"{runs['bit_identical_to_reference']}", flush=True)
        nonfinite = nonfinite_run(shards, root)
        print(f"non-finite: injected {nonfinite['injected']['nonfinite_step']}, skipped and counted "
              f"{nonfinite['counted']}, run finished: {bool(nonfinite['survived'])}", flush=True)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    injected = {**data["injected"], **runs["injected"], **nonfinite["injected"]}
    summary = {"faults_injected": injected, "faults_injected_total": sum(injected.values()),
               "bad_samples_counted": data["counted"], "good_samples_lost": data["good_lost"],
               "runs": 2, "runs_survived": runs["survived"] + nonfinite["survived"],
               "resume_bit_identical": runs["bit_identical_to_reference"], "nonfinite_skipped": nonfinite["counted"],
               "seconds": round(time.time() - start)}
    print(json.dumps(summary))
    return 0 if summary["runs_survived"] == 2 and data["good_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

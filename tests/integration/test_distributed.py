"""The distributed path (docs/design.md section 2) with 2 gloo processes on CPU.

Equivalence: one optimizer step of the real trainer code (build_model, build_loss, build_engine, train_step) in
2 processes, each on its half of a fixed global batch, equals one step of a single process on the whole batch,
for ZeRO stages 0-3 and the CPU-offload configs; OpenCLIP's no-grad gather does not (the negative control shows
that the check can fail). Gradient accumulation: each micro-step's loss uses its own global micro-batch, and the
optimizer steps at the boundary. The workers (tests/helpers/dist_worker.py) run as plain subprocesses with RANK,
WORLD_SIZE, ... set, as a launcher would.

Adam's first update is lr * g / (|g| + eps): about lr * sign(g), blind to the gradient's scale. So the gradients
the optimizer receives are compared too (read just before the step); they are what a wrong scaling would change.
Where |g| is near eps (1e-8), Adam turns float rounding of g into up to ~1% of lr in the update; hence lr = 1e-4
in the workers, which keeps the parameter tolerance at 1e-6.

Slow tests: real launches (deepspeed, torchrun as 2 nodes, the SLURM script, accelerate) that train, save,
resume and evaluate on every rank.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import ACCUM_CONFIGS, BF16_CONFIGS, LR, ZERO_CONFIGS

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "helpers" / "dist_worker.py"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
               "NNODES", "NPROC_PER_NODE", "HOSTFILE", "NUM_PROCESSES", "NUM_MACHINES", "MACHINE_RANK")
# Rounding tolerances between two runs on one machine (1 process vs 2 ranks, the same CPU, one thread each): they
# sum in a different order, not on a different CPU model, so they hold wherever the suite runs as a whole.
PARAM_TOL = 1e-6  # absolute, fp32, after one step at lr = 1e-4
GRAD_TOL = 1e-5  # relative to the largest gradient entry (rounding measured ~1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """This environment without launcher variables, one thread per process (2 processes share 2 cores), and
    this interpreter's bin folder first on PATH (deepspeed, torchrun, accelerate)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A process whose output goes to a file: no pipe can fill up and stall one rank while another waits."""
    with log.open("w") as f:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for code, log in zip(codes, logs):
        assert code == 0, f"{log.name}: exit code {code}\n{log.read_text()[-5000:]}"


def run_workers(mode: str, world: int, out: Path, timeout: float = 300) -> dict:
    """`world` processes of dist_worker.py with the launcher variables set; returns what rank 0 saved."""
    port = str(free_port())
    procs, logs = [], []
    for rank in range(world):
        env = clean_env() if world == 1 else clean_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                                                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                                       MASTER_PORT=port)
        logs.append(out.with_name(f"{out.stem}-rank{rank}.log"))
        procs.append(start([sys.executable, str(WORKER), mode, str(out)], env, logs[-1]))
    wait_all(procs, logs, timeout)
    return torch.load(out)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, dict]:
    """(single-process reference, 2-process results): every scenario runs in one launch of each."""
    folder = tmp_path_factory.mktemp("dist")
    reference = run_workers("reference", 1, folder / "reference.pt")
    distributed = run_workers("distributed", 2, folder / "distributed.pt")
    return reference, distributed


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def max_abs(a: dict[str, torch.Tensor]) -> float:
    return max(float(v.abs().max()) for v in a.values())


@pytest.mark.parametrize("zero", ZERO_CONFIGS)
def test_one_step_on_two_ranks_equals_one_step_on_the_global_batch(results, zero):
    reference, distributed = results
    ref, got = reference["step"], distributed[f"step/{zero}"]
    assert max_abs_diff(got["init"], ref["init"]) == 0.0  # the same model to start from
    assert max_abs_diff(ref["params"], ref["init"]) > 0.5 * LR  # the step moved the parameters
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    grad_scale = max_abs(ref["grads"])
    grad_diff = max_abs_diff(got["grads"], ref["grads"])
    assert grad_diff <= GRAD_TOL * grad_scale, f"{zero}: gradients differ by {grad_diff:.3g}"
    param_diff = max_abs_diff(got["params"], ref["params"])
    assert param_diff <= PARAM_TOL, f"{zero}: parameters differ by {param_diff:.3g} after one step"


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].flatten().double() for k in sorted(tensors)])


def update_mismatch(got: dict, ref: dict) -> float:
    """mean |update_got - update_ref| / mean |update_ref|, the updates being params - init."""
    ref_update = flat(ref["params"]) - flat(ref["init"])
    return float((flat(got["params"]) - flat(got["init"]) - ref_update).abs().mean() / ref_update.abs().mean())


@pytest.mark.parametrize("zero", BF16_CONFIGS)
def test_bf16_step_on_two_ranks_equals_the_bf16_step_on_the_global_batch(results, zero):
    """engine.precision=bf16 (autocast over fp32 master weights): the same equivalence, to bf16's precision.

    Tolerances: bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per operation), and the 2-rank run
    rounds different per-rank batches (other convolution tilings), so the two runs agree to bf16 rounding, not
    bit for bit. Measured on 2 cores (AMD EPYC), ZeRO 0-3: loss 1.6e-4 relative, gradients 0.027 of the largest
    entry (max) with cosine 0.9996, updates 0.011 of their mean size (0.018 bf16 vs fp32). Bounds: 5-10x those.
    Adam's first update is ~lr * sign(g), so single entries whose gradient is near 0 may flip (max 2 * lr): the mean
    is compared."""
    reference, distributed = results
    ref, got = reference["step_bf16"], distributed[f"step_bf16/{zero}"]
    assert all(v.dtype == torch.float32 for v in got["params"].values())  # fp32 master weights
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-3)
    grad_diff = max_abs_diff(got["grads"], ref["grads"]) / max_abs(ref["grads"])
    cosine = float(torch.nn.functional.cosine_similarity(flat(got["grads"]), flat(ref["grads"]), dim=0))
    mismatch = update_mismatch(got, ref)
    assert grad_diff <= 0.15 and cosine >= 0.998, (grad_diff, cosine)
    assert mismatch <= 0.1, mismatch
    # the bf16 step is the fp32 step to bf16 rounding; a wrong gather scale would be off by the world size
    assert update_mismatch(ref, reference["step"]) <= 0.1
    assert update_mismatch(distributed["no_grad_gather"], reference["step"]) > 0.3


def test_no_grad_gather_with_local_slice_put_back_does_not_match(results):
    """Other ranks' columns send no gradient back: a real difference the equivalence test above would catch."""
    reference, distributed = results
    ref, got = reference["step"], distributed["no_grad_gather"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)  # same forward values, different gradients
    assert max_abs_diff(got["grads"], ref["grads"]) > 0.1 * max_abs(ref["grads"])
    assert max_abs_diff(got["params"], ref["params"]) > 100 * PARAM_TOL


@pytest.mark.parametrize("zero", ACCUM_CONFIGS)
def test_grad_accum_steps_at_the_boundary_on_the_mean_of_micro_batch_losses(results, zero):
    """engine.grad_accum=2: no update after the first micro-step; after the second, the update of
    (loss(global micro-batch A) + loss(global micro-batch B)) / 2, each loss with negatives only from its own
    micro-batch of n * world pairs, not from one batch of both."""
    reference, distributed = results
    got = distributed[f"accum/{zero}"]
    assert max_abs_diff(got["after_micro1"], got["init"]) == 0.0
    assert max_abs_diff(got["after_micro2"], got["init"]) > 0.5 * LR
    diff = max_abs_diff(got["after_micro2"], reference["accum"])
    assert diff <= PARAM_TOL, f"{zero}: accumulated step differs from the reference by {diff:.3g}"
    assert max_abs_diff(got["after_micro2"], reference["accum_as_one_batch"]) > 100 * PARAM_TOL


# ---------------------------------------------------------------------------------------------- real launches
# Each launch trains a tiny model for a few steps on a shard set whose val and test splits have one shard each
# (as the built-in corpus's val split), in 2 processes (gloo), saves checkpoints and evaluates on all ranks:
# one rank embeds nothing and still joins every collective. The README's own launch lines, as written, are run
# by tests/integration/test_readme_commands.py. A launch that silently started two worlds of one would still write
# logs, so every check reads the world size and the samples counted into the checkpoint.

RUN_BATCH = 8  # per rank
# engine.threads=1: "nodes" of one process each think they own every core; here they share two.
TINY_RUN = (f"data.batch_size={RUN_BATCH}", "model.embed_dim=32", "model.cnn_width=16", "model.gru_hidden=32",
            "model.word_dim=16", "data.image_size=32", "data.num_workers=1", "data.shuffle_buffer=64",
            "engine.threads=1", "train.log_every=2", "train.eval_every=0", "train.ckpt_every=2")
LAUNCH_TIMEOUT = 240


def train_args(shards: Path, out: Path, steps: int, zero: str = "zero0") -> list[str]:
    return ["--config", str(REPO / "configs" / "builtin.yaml"), f"data.shards={shards}", f"run.out_dir={out}",
            f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / f'{zero}.json'}", f"train.steps={steps}",
            *TINY_RUN]


def launch(cmds: list[tuple[list[str], dict]], logs_dir: Path, name: str) -> None:
    """Start every (command, environment) at once (the nodes of one job) and wait for all of them."""
    logs = [logs_dir / f"{name}-{i}.log" for i in range(len(cmds))]
    wait_all([start(cmd, env, log) for (cmd, env), log in zip(cmds, logs)], logs, LAUNCH_TIMEOUT)


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def check_run(out: Path, last_step: int, world: int = 2) -> None:
    """`latest` names the last step's checkpoint, which was written by `world` ranks that together saw
    last_step * RUN_BATCH * world samples; the test split was embedded on all ranks and gathered."""
    ckpts = out / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    assert tag == f"step{last_step:07d}"
    state = torch.load(ckpts / tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["dp_world_size"] == world
    assert state["run_state"]["step"] == state["global_steps"] == last_step
    assert state["run_state"]["samples"] == last_step * RUN_BATCH * world
    test = json.loads((out / "eval" / "test.json").read_text())
    assert test["step"] == last_step
    assert test["counts"] == {"images": 24, "captions": 120}  # one shard: rank 1 embedded none of it


SCRIPTS = ("cpu_2proc.sh", "deepspeed_hostfile.sh", "torchrun_multinode.sh", "slurm.sbatch", "accelerate.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_without_a_config_prints_its_usage(script):
    done = subprocess.run(["bash", str(REPO / "launch" / script)], env=clean_env(), capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "usage:" in done.stderr, done.stderr


@pytest.mark.slow
def test_deepspeed_launcher_trains_saves_and_resumes(uneven_shards, tmp_path):
    """`deepspeed --num_gpus 2` (the single-machine form that works on CPU) trains 4 steps; the resume goes
    through launch/deepspeed_hostfile.sh as 2 nodes of a hostfile started without ssh (NODE_RANK=0, 1)."""
    out = tmp_path / "run"
    env = clean_env()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "trainer.train",
           *train_args(uneven_shards, out, steps=4)]
    launch([(cmd, env)], tmp_path, "first")
    assert logged_steps(out) == [2, 4]
    check_run(out, 4)

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    script = ["bash", str(REPO / "launch" / "deepspeed_hostfile.sh"), *train_args(uneven_shards, out, steps=6)[1:],
              "--resume", "latest"]
    launch([(script, clean_env(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                               NODE_RANK=str(node))) for node in (0, 1)], tmp_path, "resumed")
    assert logged_steps(out) == [2, 4, 6]  # continued at step 4, not from 0
    check_run(out, 6)
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step0000004", "step0000006"]


@pytest.mark.slow
def test_torchrun_two_nodes_train_save_and_resume(uneven_shards, tmp_path):
    """launch/torchrun_multinode.sh on 2 "nodes" of one process each on 127.0.0.1."""
    out = tmp_path / "run"

    def both_nodes(steps: int, *extra: str) -> list[tuple[list[str], dict]]:
        port = str(free_port())
        cmd = ["bash", str(REPO / "launch" / "torchrun_multinode.sh"),
               *train_args(uneven_shards, out, steps)[1:], *extra]
        return [(cmd, clean_env(NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                NPROC_PER_NODE="1")) for node in (0, 1)]

    launch(both_nodes(4), tmp_path, "first")
    assert logged_steps(out) == [2, 4]
    check_run(out, 4)
    launch(both_nodes(6, "--resume", "latest"), tmp_path, "resumed")
    assert logged_steps(out) == [2, 4, 6]
    check_run(out, 6)


@pytest.mark.slow
def test_slurm_script_starts_one_task_per_rank(uneven_shards, tmp_path):
    """launch/slurm.sbatch run as sbatch would, with stand-ins for srun (SLURM_NTASKS local tasks with
    SLURM_PROCID / SLURM_LOCALID) and scontrol: the trainer builds its world from the SLURM_* variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "while [[ $1 == -* ]]; do shift; done\n"
        "pids=()\n"
        "for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i \"$@\" & pids+=($!); done\n"
        "status=0; for p in \"${pids[@]}\"; do wait \"$p\" || status=$?; done; exit $status\n")
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    out = tmp_path / "run"
    env = clean_env(SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
                    SLURM_CPUS_PER_TASK="1", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO),
                    MASTER_PORT=str(free_port()))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    cmd = ["bash", str(REPO / "launch" / "slurm.sbatch"), *train_args(uneven_shards, out, steps=2)[1:]]
    launch([(cmd, env)], tmp_path, "slurm")
    assert logged_steps(out) == [2]
    check_run(out, 2)


@pytest.mark.slow
def test_accelerate_launch_trains_with_zero2_cpu_offload(uneven_shards, tmp_path):
    """launch/accelerate.sh with 2 processes and configs/deepspeed/zero2_offload.json (torch AdamW on the
    offloaded fp32 weights; nothing is compiled)."""
    out = tmp_path / "run"
    cmd = ["bash", str(REPO / "launch" / "accelerate.sh"),
           *train_args(uneven_shards, out, steps=2, zero="zero2_offload")[1:]]
    launch([(cmd, clean_env(NUM_PROCESSES="2", MAIN_PROCESS_PORT=str(free_port())))], tmp_path, "accelerate")
    assert logged_steps(out) == [2]
    check_run(out, 2)
    assert sorted(p.name for p in (out / "checkpoints" / "step0000002").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

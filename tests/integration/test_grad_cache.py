"""engine.grad_cache is exact: one optimizer step of grad_cache_step on 2 gloo processes x k = 4 micro-batches of n
equals one step of one process on the concatenated batch of 8n, for DeepSpeed ZeRO 0, 1, 2 and 3, with region
dropout on: the loss, the gradients the optimizer receives, the updated parameters and Adam's moments, fp32 to
1e-5 relative. Negative controls show the check can fail: plain accumulation with the same k (each micro-step's
loss sees only its own n x world pairs), and a grad-cache step whose second forwards do not replay the first
forwards' dropout draws. The workers (tests/helpers/grad_cache_worker.py, which says how the reference draws the
ranks' dropout) run as plain subprocesses with RANK, WORLD_SIZE, ... set, as a launcher would.

Adam's first update is about lr * sign(g): the gradients and the moments are what a wrong scale would change, so
they are compared relative to their largest entry; the parameters to 1e-6 absolute at lr = 1e-4, as in
tests/integration/test_distributed.py. Measured on 2 cores: 8e-8 (loss), 2e-7 (gradients), 5e-7 (moments),
8e-8 absolute (parameters); the controls differ by 0.17-0.45 relative and 2e-4 absolute.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from grad_cache_worker import LR, WORLD, ZERO_CONFIGS
from test_distributed import clean_env, free_port, start, wait_all

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "helpers" / "grad_cache_worker.py"
REL_TOL = 1e-5  # loss, gradients and Adam moments, relative (to the largest entry for tensors)
PARAM_TOL = 1e-6  # absolute, after one step at lr = 1e-4
TIMEOUT = 240


def run_workers(mode: str, world: int, out: Path) -> dict:
    """`world` processes of the worker, one thread each, output to files (no pipe can stall a rank)."""
    port = str(free_port())
    procs, logs = [], []
    for rank in range(world):
        env = clean_env()
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        logs.append(out.with_name(f"{out.stem}-rank{rank}.log"))
        procs.append(start([sys.executable, str(WORKER), mode, str(out)], env, logs[-1]))
    wait_all(procs, logs, TIMEOUT)
    return torch.load(out)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, dict]:
    folder = tmp_path_factory.mktemp("grad_cache")
    reference = run_workers("reference", 1, folder / "reference.pt")["step"]
    distributed = run_workers("distributed", WORLD, folder / "distributed.pt")
    return reference, distributed


def relative_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """max |got - ref| over every entry, relative to ref's largest entry."""
    assert got.keys() == ref.keys()
    return max(float((got[k] - ref[k]).abs().max()) for k in ref) / max(float(v.abs().max()) for v in ref.values())


def max_abs_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert got.keys() == ref.keys()
    return max(float((got[k] - ref[k]).abs().max()) for k in ref)


def mismatches(got: dict, ref: dict) -> dict[str, float]:
    return {"loss": abs(got["loss"] - ref["loss"]) / abs(ref["loss"]),
            "grads": relative_diff(got["grads"], ref["grads"]),
            "exp_avg": relative_diff(got["exp_avg"], ref["exp_avg"]),
            "exp_avg_sq": relative_diff(got["exp_avg_sq"], ref["exp_avg_sq"])}


@pytest.mark.parametrize("zero", ZERO_CONFIGS)
def test_grad_cache_step_on_two_ranks_equals_one_step_on_the_whole_batch(results, zero):
    reference, distributed = results
    got = distributed[f"cached/{zero}"]
    assert max_abs_diff(got["init"], reference["init"]) == 0.0  # the same model to start from
    assert max_abs_diff(reference["params"], reference["init"]) > 0.5 * LR  # the step moved the parameters
    assert all(float(v.abs().max()) > 0 for v in reference["exp_avg"].values())  # every parameter got a gradient
    off = mismatches(got, reference)
    assert all(value <= REL_TOL for value in off.values()), f"{zero}: {off}"
    param_diff = max_abs_diff(got["params"], reference["params"])
    assert param_diff <= PARAM_TOL, f"{zero}: parameters differ by {param_diff:.3g} after one step"


@pytest.mark.parametrize("control", ["plain_accum", "no_replay"])
def test_the_check_fails_for_plain_accumulation_and_for_a_step_without_dropout_replay(results, control):
    """plain_accum: k micro-steps whose losses see n x world pairs each; no_replay: the second forwards draw other
    region-dropout masks than the cached embeddings had. Both are beyond the tolerances above by orders."""
    reference, distributed = results
    got = distributed[control]
    off = mismatches(got, reference)
    assert off["grads"] > 1000 * REL_TOL and off["exp_avg"] > 1000 * REL_TOL, f"{control}: {off}"
    assert max_abs_diff(got["params"], reference["params"]) > 100 * PARAM_TOL
    if control == "no_replay":  # the loss is computed on the cached embeddings: right value, wrong gradient
        assert off["loss"] <= REL_TOL

"""engine.grad_cache is exact: one optimizer step of grad_cache_step on 2 gloo processes x k = 4 micro-batches of n
equals one step of one process on the concatenated batch of 8n, for DeepSpeed ZeRO 0, 1, 2 and 3, with region
dropout on: the loss, the gradients the optimizer receives, the updated parameters and Adam's moments, fp32 to
1e-5 relative; and with engine.precision=bf16 the same against the one-process bf16 step, to bf16's rounding
(the bf16 test's docstring says what was measured). Negative controls show the check can fail: plain
accumulation with the same k (each micro-step's loss sees only its own n x world pairs), in fp32 and in bf16,
and a grad-cache step whose second forwards do not replay the first forwards' dropout draws. The workers
(tests/helpers/grad_cache_worker.py, which says how the reference draws the ranks' dropout) run as plain
subprocesses with RANK, WORLD_SIZE, ... set, as a launcher would.

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
# bf16 (see the bf16 test's docstring for what was measured): loss relative; gradients, moments and mean update
# relative to the reference's largest entry / mean size; the gradients' cosine
BF16_LOSS_TOL, BF16_REL_TOL, BF16_COSINE = 1e-3, 0.05, 0.9995
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
    reference = run_workers("reference", 1, folder / "reference.pt")
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
    reference, distributed = results[0]["step"], results[1]
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
    reference, distributed = results[0]["step"], results[1]
    got = distributed[control]
    off = mismatches(got, reference)
    assert off["grads"] > 1000 * REL_TOL and off["exp_avg"] > 1000 * REL_TOL, f"{control}: {off}"
    assert max_abs_diff(got["params"], reference["params"]) > 100 * PARAM_TOL
    if control == "no_replay":  # the loss is computed on the cached embeddings: right value, wrong gradient
        assert off["loss"] <= REL_TOL


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].flatten().double() for k in sorted(tensors)])


def update_mismatch(got: dict, ref: dict) -> float:
    """mean |update_got - update_ref| / mean |update_ref|, the updates being params - init."""
    ref_update = flat(ref["params"]) - flat(ref["init"])
    return float((flat(got["params"]) - flat(got["init"]) - ref_update).abs().mean() / ref_update.abs().mean())


def bf16_mismatches(got: dict, ref: dict) -> dict[str, float]:
    off = mismatches(got, ref)
    off["grad_cosine"] = float(torch.nn.functional.cosine_similarity(flat(got["grads"]), flat(ref["grads"]), dim=0))
    off["update"] = update_mismatch(got, ref)
    return off


def within_bf16_tolerance(off: dict[str, float]) -> bool:
    return (off["loss"] <= BF16_LOSS_TOL and off["grad_cosine"] >= BF16_COSINE
            and all(off[key] <= BF16_REL_TOL for key in ("grads", "exp_avg", "exp_avg_sq", "update")))


@pytest.mark.parametrize("zero", ZERO_CONFIGS)
def test_bf16_grad_cache_step_on_two_ranks_equals_the_bf16_step_on_the_whole_batch(results, zero):
    """engine.precision=bf16 (autocast over fp32 master weights): the same equivalence against the one-process bf16
    step, to bf16's precision, as tests/integration/test_distributed.py reasons for the plain step.

    bf16 keeps 8 mantissa bits (2^-9 = 2e-3 relative rounding per operation), so two runs agree to bf16 rounding
    where they round in another order. Here ZeRO 0-2 round alike (the model treats every sample on its own and
    the CPU's bf16 matmuls round each row alike, in pieces or whole): they agree to fp32 rounding (loss 8e-8,
    gradients 6e-8, moments 2e-7 relative). ZeRO-3 runs every linear layer through DeepSpeed's own autograd
    function (its F.linear patch: bias added after the bf16 matmul, the backward's matmuls in bf16 under autocast),
    other roundings: measured on 2 cores, loss 1.6e-4 relative, gradients and first moments 0.0062 of the largest
    entry (cosine 0.99995), second moments 0.0056, updates 0.0068 of their mean size (bf16 vs fp32 on one process:
    0.0155 of the largest gradient). Bounds 5-10x those. Plain accumulation in bf16 is off by 0.35 (gradients),
    cosine 0.80, updates 0.51: beyond every bound (the control below)."""
    reference, distributed = results
    ref, got = reference["step_bf16"], distributed[f"cached_bf16/{zero}"]
    assert all(v.dtype == torch.float32 for v in got["params"].values())  # fp32 master weights
    assert max_abs_diff(got["init"], ref["init"]) == 0.0
    # bf16 autocast was on: the bf16 reference is not the fp32 one, though within bf16 rounding of it
    assert abs(ref["loss"] - reference["step"]["loss"]) > 10 * REL_TOL * abs(reference["step"]["loss"])
    assert update_mismatch(ref, reference["step"]) <= BF16_REL_TOL
    off = bf16_mismatches(got, ref)
    assert within_bf16_tolerance(off), f"{zero}: {off}"


def test_the_bf16_check_fails_for_plain_accumulation(results):
    """The negative control at bf16's tolerance: plain accumulation in bf16 (each micro-step's loss over n x world
    pairs) against the bf16 whole-batch step fails every bound above by 7x or more."""
    reference, distributed = results
    off = bf16_mismatches(distributed["plain_accum_bf16"], reference["step_bf16"])
    assert not within_bf16_tolerance(off), off
    assert off["grads"] > 5 * BF16_REL_TOL and off["update"] > 5 * BF16_REL_TOL and off["grad_cosine"] < 0.9, off

"""Worker for tests/integration/test_faults.py: the non-finite step skip of trainer.train.train_step in 2 gloo
processes.

    python tests/helpers/fault_worker.py OUT.pt             # with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / ...
    python tests/helpers/fault_worker.py OUT.pt grad_cache  # the same with engine.grad_cache, k = 2 (grad_cache_step)

For each ZeRO stage, one engine takes: a good step; a step whose loss *value* is NaN on rank 1 only (its
gradients stay finite, so rank 0 alone would see nothing wrong); a step whose gradients are NaN (the loss of
rank 0 times NaN); a good step. A second engine takes only the two good steps. Rank 0 writes, per stage, the
skip decisions of both ranks, whether parameters and this rank's Adam state changed in the skipped steps (on
every rank), and the largest difference between the two engines at the end. With grad_cache each step is one
grad_cache_step of GRAD_CACHE_MICRO micro-batches per rank (the NaN put into the one loss over all of them: its
value, or its gradient with respect to the cached embeddings and so every micro-batch's backward), ZeRO 0, 2, 3.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_worker import RANK_BATCH, full_params, make_config, new_engine, rank_part, synthetic_batch  # noqa: E402
from worker_exit import run_and_leave  # noqa: E402 (tests/helpers is on the path by now)

from trainer.distributed import DistInfo, gather_no_grad  # noqa: E402
from trainer.training.step import grad_cache_step, train_step  # noqa: E402

STAGES = ("zero0", "zero2", "zero3")  # ZeRO-1 shares ZeRO-2's optimizer code
BF16_STAGES = ("zero0", "zero1", "zero2", "zero3")
GRAD_CACHE_MICRO = 2  # k of the grad_cache runs


class InjectNaN:
    """The trainer's loss, with a NaN put in on chosen ranks: 'value' (the number only) or 'grad' (through it)."""

    def __init__(self, loss_fn, rank: int, mode: str | None = None, on_rank: int = 0):
        self.loss_fn, self.rank, self.mode, self.on_rank = loss_fn, rank, mode, on_rank

    def __call__(self, *args, **kwargs) -> dict:
        losses = self.loss_fn(*args, **kwargs)
        if self.mode and self.rank == self.on_rank:
            nan = torch.tensor(float("nan"))
            # loss + NaN: the number is NaN, the gradient that flows back (1) is not; loss * NaN: both are.
            losses["loss"] = losses["loss"] + nan if self.mode == "value" else losses["loss"] * nan
        return losses


def optimizer_state(engine) -> list[torch.Tensor]:
    """This rank's Adam moments and step counts (its partition under ZeRO)."""
    return [v.detach().clone() for group in engine.client_optimizer.state.values() for v in group.values()
            if torch.is_tensor(v)]


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def every_rank(flag: bool) -> list[bool]:
    return [bool(x) for x in gather_no_grad(torch.tensor([int(flag)])).tolist()]


def one_step(engine, loss_fn, micro_batches: list[dict], step: int, info, grad_cache: bool) -> dict:
    if grad_cache:
        return grad_cache_step(engine, loss_fn, micro_batches, step, info)
    (batch,) = micro_batches
    return train_step(engine, loss_fn, batch, step, info)


def run_stage(zero: str, info, precision: str = "fp32", grad_cache: bool = False) -> dict:
    micro = GRAD_CACHE_MICRO if grad_cache else 1
    cfg = make_config(zero, RANK_BATCH, grad_accum=micro, precision=precision)
    cfg.engine.grad_cache = grad_cache
    cfg.optim.min_lr_ratio = 1.0  # a constant LR: a skipped step still moves the LR schedule by one
    parts = [rank_part(synthetic_batch(2 * RANK_BATCH, seed=s), info) for s in range(1, 4 * micro + 1)]
    steps = [parts[i * micro:(i + 1) * micro] for i in range(4)]
    engine, loss_fn = new_engine(cfg, info)
    inject = InjectNaN(loss_fn, info.rank)
    out = {"skipped": []}
    for i, (mode, on_rank) in enumerate([(None, 0), ("value", 1), ("grad", 0), (None, 0)]):
        inject.mode, inject.on_rank = mode, on_rank
        before, opt_before = full_params(engine), optimizer_state(engine)
        stats = one_step(engine, inject, steps[i], i, info, grad_cache)
        out["skipped"].append(every_rank(bool(stats["skipped"])))
        if mode:
            out[f"params_unchanged/{mode}"] = all(every_rank(same(before, full_params(engine))))
            out[f"adam_unchanged/{mode}"] = all(every_rank(same(opt_before, optimizer_state(engine))))
    final = full_params(engine)
    reference, ref_loss = new_engine(cfg, info)
    init = full_params(reference)
    for i in (0, 3):
        one_step(reference, ref_loss, steps[i], i, info, grad_cache)
    expected = full_params(reference)
    out["final_vs_reference"] = max(float((final[k] - expected[k]).abs().max()) for k in final)
    out["moved"] = max(float((final[k] - init[k]).abs().max()) for k in final)
    return out


def run_all_stages(info: DistInfo) -> dict:
    results = {zero: run_stage(zero, info) for zero in STAGES}
    # bf16 autocast: the same skip, and the skip still leaves the fp32 master weights and Adam untouched
    results.update({f"{zero}/bf16": run_stage(zero, info, "bf16") for zero in BF16_STAGES})
    return results


def run_grad_cache_stages(info: DistInfo) -> dict:
    return {zero: run_stage(zero, info, grad_cache=True) for zero in STAGES}


def main(argv: list[str]) -> None:
    out_path, *mode = argv
    run_and_leave(run_grad_cache_stages if mode == ["grad_cache"] else run_all_stages, out_path)

if __name__ == "__main__":
    main(sys.argv[1:])

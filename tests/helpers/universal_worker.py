"""Worker for tests/integration/test_universal.py: the real trainer (`python -m trainer.train ...`), which also writes
the whole training state, gathered from every rank, right after each checkpoint it saves and right after it resumed.

    UNIVERSAL_DUMP=DIR python tests/helpers/universal_worker.py --config ... [overrides]   # RANK, WORLD_SIZE, ... set

Rank 0 writes DIR/saved-<step>-w<world>.pt and DIR/restored-<step>-w<world>.pt, each {"params", "exp_avg",
"exp_avg_sq": {name: full fp32 tensor}, "steps": the optimizer's step count of every flat group on every rank,
"groups": each parameter group's settings, "scheduler": the LR scheduler's state}.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trainer.engine.checkpoint as checkpoint  # noqa: E402
import trainer.training.loop as train_module  # noqa: E402
from trainer.distributed import gather_objects_to_main, rank, world_size  # noqa: E402


def full_state(engine) -> dict:
    """Every rank calls this (the ZeRO gathers are collectives); the whole state on rank 0, None elsewhere."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    zero = engine.zero_optimization_stage() > 0
    if getattr(engine.optimizer, "_hp_optimizer_states_linked", None) is not None:
        # ZeRO 1/2 link each parameter to its Adam state fragments once, after the first step, and a flat group
        # that had no Adam state yet then stays unlinked (safe_get_full_optimizer_state raises on that rank):
        # link again now that every group has its state.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if zero:
            out["params"][name] = safe_get_full_fp32_param(p).detach().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[key][name] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
        else:  # no ZeRO: the client optimizer holds the parameters themselves
            out["params"][name] = p.detach().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[key][name] = engine.optimizer.state[p][key].detach().cpu().clone()
    base = engine.optimizer.optimizer if zero else engine.optimizer
    steps = [float(state["step"]) for state in base.state.values() if "step" in state]
    out["steps"] = gather_objects_to_main(steps)
    out["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    out["scheduler"] = engine.lr_scheduler.state_dict()
    return out if rank() == 0 else None


def dump(engine, label: str, step: int) -> None:
    state = full_state(engine)
    if state is not None:
        torch.save(state, Path(os.environ["UNIVERSAL_DUMP"]) / f"{label}-{step}-w{world_size()}.pt")


def main() -> int:
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # a stack of every thread on demand, if it hangs
    save, restore = checkpoint.save, train_module.restore

    def save_and_dump(engine, ckpt_dir, step, *args, **kwargs):
        folder = save(engine, ckpt_dir, step, *args, **kwargs)
        dump(engine, "saved", step)
        return folder

    def restore_and_dump(run):
        state = restore(run)
        if run.resume_tag is not None:
            dump(run.engine, "restored", state.step)
        return state

    checkpoint.save, train_module.restore = save_and_dump, restore_and_dump
    return train_module.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

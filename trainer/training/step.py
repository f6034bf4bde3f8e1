"""One training micro-step: forward on this rank's pairs, gather the global batch, loss of own rows against all
columns, backward; at the accumulation boundary one all-reduce on which every rank agrees to update or skip.
With engine.grad_cache, one optimizer step of k micro-batches whose loss sees all of them (grad_cache_step, over
the mechanics of trainer/training/grad_cache.py).

No host synchronisation happens inside a step except that agreement (docs/design.md section 2): batches reach the
device with non_blocking copies (the loader pins them on GPU machines), caption lengths and region counts stay on
the host where the model checks them, and the non-finite check is a device tensor until the agreement reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import torch

from trainer.data.samples import BAD_KINDS
from trainer.distributed import DistInfo, all_reduce_sum, gather_no_grad, gather_with_grad
from trainer.training.grad_cache import (
    CONCEPT_LOGIT_KEYS,
    embed_without_graph,
    loss_and_output_grads,
    replaying,
    surrogate_loss,
)

EMBEDDING_KEYS = ("img_g", "img_l", "txt_g", "txt_l")
LABEL_KEYS = ("image_ids", "image_concepts", "caption_concepts")


class TrainEngine(Protocol):
    """What the step and the loop use of DeepSpeed's engine (deepspeed.DeepSpeedEngine, which is imported only
    where an engine is built: importing DeepSpeed is slow and loads its accelerator machinery)."""

    module: torch.nn.Module
    optimizer: Any  # DeepSpeed's wrapper (a ZeRO optimizer) or the client optimizer itself
    client_optimizer: torch.optim.Optimizer

    def __call__(self, *inputs: Any) -> dict[str, torch.Tensor]: ...

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> Any: ...

    def step(self) -> None: ...

    def is_gradient_accumulation_boundary(self) -> bool: ...

    def gradient_accumulation_steps(self) -> int: ...

    def zero_optimization_stage(self) -> int: ...

    def get_lr(self) -> list[float]: ...

    def get_global_grad_norm(self) -> float | None: ...


@dataclass
class StepAgreement:
    """What the ranks agree on at an optimizer step through its one all-reduce: each rank packs its own values,
    unpack reads their sums over all ranks, so every rank takes the same branch (update or skip, go on or stop)
    and counts the same totals.

    nonfinite: going in, whether this rank's loss or gradient is not finite (a device tensor: read on the host
    only after the all-reduce, the step's one synchronisation); coming out, how many ranks said so. stop: ranks
    asked to stop (SIGTERM/SIGUSR1). samples_read: samples the loader workers read for this step, bad ones
    included. bad_counts: skipped samples per kind (BAD_KINDS order). set_counts: samples per mixed shard set."""

    stop: int = 0
    samples_read: int = 0
    bad_counts: list[int] = field(default_factory=lambda: [0] * len(BAD_KINDS))
    set_counts: list[int] = field(default_factory=list)
    nonfinite: torch.Tensor | int = 0

    @classmethod
    def zeros(cls, num_sets: int) -> "StepAgreement":
        return cls(set_counts=[0] * num_sets)

    def add_batch(self, batch: dict) -> None:
        """Count a training batch's samples read, bad samples per kind and samples per set."""
        self.samples_read += int(batch["n_read"])
        self.bad_counts = [a + b for a, b in zip(self.bad_counts, batch["bad_counts"].tolist())]
        self.set_counts = [a + b for a, b in zip(self.set_counts, batch["set_counts"].tolist())]

    def pack(self, device: torch.device) -> torch.Tensor:
        """[nonfinite, stop, samples_read, *bad_counts, *set_counts] as one long tensor on `device`."""
        flag = torch.as_tensor(self.nonfinite).to(device=device, dtype=torch.long).view(1)
        host = torch.tensor([self.stop, self.samples_read, *self.bad_counts, *self.set_counts], dtype=torch.long)
        return torch.cat([flag, host.to(device, non_blocking=True)])

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> "StepAgreement":
        """The record of a packed (and summed) tensor; its set count is what is left after the bad kinds."""
        nonfinite, stop, read, *counts = packed.tolist()
        kinds = len(BAD_KINDS)
        return cls(stop=stop, samples_read=read, bad_counts=counts[:kinds], set_counts=counts[kinds:],
                   nonfinite=nonfinite)


def gather_global_batch(out: dict, labels: dict) -> dict:
    """The global batch the loss scores against: embeddings with autograd (cast to fp32: the n x N scores and
    the loss are computed in fp32 whatever the encoders ran in), labels without."""
    gathered = {k: gather_with_grad(out[k].float()) for k in EMBEDDING_KEYS if k in out}
    gathered.update({k: gather_no_grad(labels[k]) for k in LABEL_KEYS})
    return gathered


def local_grads_nonfinite(engine) -> torch.Tensor:
    """Whether this rank's gradients hold inf/NaN (a 0-d bool tensor), after backward at an accumulation
    boundary. Without ZeRO they are whole in p.grad and the check stays on the device; under ZeRO 1-3 they are
    partitioned and the optimizer's own check (a collective over the data-parallel group, so every rank calls
    it) reads its partitions."""
    if engine.zero_optimization_stage() >= 1 and hasattr(engine.optimizer, "has_overflow"):
        return torch.tensor(bool(engine.optimizer.has_overflow(partition_gradients=True)))
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(False)
    return ~torch.stack([torch.isfinite(g).all() for g in grads]).all()


def skip_optimizer_step(engine) -> None:
    """engine.step() with the optimizer's update left out: DeepSpeed still clears the gradients (of whatever
    ZeRO stage), counts the micro-steps and moves the LR schedule, but no parameter and no Adam moment or step
    count changes. The client optimizer (build_engine's torch AdamW) is the one every DeepSpeed wrapper calls."""
    inner = engine.client_optimizer
    own = vars(inner).get("step")  # the LR scheduler wraps step as an instance attribute
    inner.step = lambda *args, **kwargs: None
    try:
        engine.step()
    finally:
        if own is not None:
            inner.step = own
        else:
            del inner.step


def to_device(batch: dict, device: torch.device) -> tuple[dict, dict]:
    """(model inputs, labels) on `device`; lengths and region counts stay on the host (see the module doc)."""
    inputs = {"images": batch["images"].to(device, non_blocking=True),
              "tokens": batch["tokens"].to(device, non_blocking=True), "lengths": batch["lengths"],
              "image_lengths": batch.get("image_lengths")}
    labels = {k: batch[k].to(device, non_blocking=True) for k in LABEL_KEYS}
    return inputs, labels


def agree(bad_here: torch.Tensor, mine: StepAgreement, device: torch.device) -> StepAgreement:
    """The step's one all-reduce: this rank's agreement (with its non-finite flag) summed over all ranks."""
    return StepAgreement.unpack(all_reduce_sum(replace(mine, nonfinite=bad_here).pack(device)))


def _grad_norm(engine) -> torch.Tensor:
    # DeepSpeed reports a grad norm only for its ZeRO optimizers; without ZeRO the grads are whole here.
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def finish_micro_step(engine: TrainEngine, stats: dict, info: DistInfo, want_grad_norm: bool = False,
                      agreement: StepAgreement | None = None) -> dict:
    """After a micro-step's backward: mid-window, engine.step() only counts it; at the accumulation boundary, the
    update, or (any rank's loss or gradient not finite) a skip on every rank, `agreement` riding along in the one
    all-reduce. Adds the boundary stats "skipped" and "agreed" to `stats` (the detached loss terms)."""
    if not engine.is_gradient_accumulation_boundary():
        # Mid-window: a non-finite loss here poisons the accumulated grads, which the boundary check sees.
        engine.step()
        return stats
    bad_here = local_grads_nonfinite(engine).to(info.device) | ~torch.isfinite(stats["loss"])
    agreed = agree(bad_here, agreement if agreement is not None else StepAgreement(), info.device)
    stats["skipped"] = torch.tensor(float(agreed.nonfinite > 0))
    stats["agreed"] = agreed
    if agreed.nonfinite > 0:
        skip_optimizer_step(engine)
        return stats
    if want_grad_norm and engine.zero_optimization_stage() == 0:
        stats["grad_norm"] = _grad_norm(engine)
    engine.step()
    return stats


def concept_logits(out: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The model's (image, caption) concept logits, or None when it has no concept head."""
    return tuple(out[key] for key in CONCEPT_LOGIT_KEYS) if CONCEPT_LOGIT_KEYS[0] in out else None


def forward(engine: TrainEngine, inputs: dict) -> dict[str, torch.Tensor]:
    return engine(inputs["images"], inputs["tokens"], inputs["lengths"], inputs["image_lengths"])


def train_step(engine: TrainEngine, loss_fn: Callable[..., dict[str, torch.Tensor]], batch: dict, step: int,
               info: DistInfo, want_grad_norm: bool = False, agreement: StepAgreement | None = None) -> dict:
    """One micro-step. At the accumulation boundary: the update, or (any rank's loss or gradient not finite) a
    skip on every rank; `agreement` (this rank's counts and stop flag; None: nothing to count) rides along in the
    same all-reduce. Boundary stats: "skipped" (1.0 when the update was skipped) and "agreed" (the StepAgreement
    summed over ranks)."""
    inputs, labels = to_device(batch, info.device)
    out = forward(engine, inputs)
    gathered = gather_global_batch(out, labels)
    n = batch["images"].shape[0]
    losses = loss_fn(gathered, row_offset=info.rank * n, num_rows=n, step=step, concept_logits=concept_logits(out))
    engine.backward(losses["loss"])
    return finish_micro_step(engine, {k: v.detach() for k, v in losses.items()}, info, want_grad_norm, agreement)


def check_window_start(engine: TrainEngine, num_micro: int) -> None:
    """Refuse a grad-cache step that does not fill exactly one accumulation window of the engine."""
    if num_micro != engine.gradient_accumulation_steps():
        raise ValueError(f"grad_cache_step got {num_micro} micro-batches but the engine accumulates "
                         f"{engine.gradient_accumulation_steps()} (engine.grad_accum)")
    if num_micro > 1 and engine.is_gradient_accumulation_boundary():
        raise RuntimeError("grad_cache_step must start at the first micro-step of an accumulation window")


def grad_cache_step(engine: TrainEngine, loss_fn: Callable[..., dict[str, torch.Tensor]], batches: list[dict],
                    step: int, info: DistInfo, want_grad_norm: bool = False,
                    agreement: StepAgreement | None = None) -> dict:
    """One optimizer step with gradient caching (engine.grad_cache; trainer/training/grad_cache.py): the loss of
    all k = engine.grad_accum micro-batches of every rank at once, N = k n world pairs, then k forwards with
    graph and backwards of the cached gradients, then the boundary's agreement and update as in train_step.
    Returns the step's loss terms (one loss over N pairs, not k of them) and the boundary stats.

    DeepSpeed keeps gradient_accumulation_steps = k (deepspeed_config is the same as for plain accumulation), and
    the k backwards go through engine.backward with engine.step() between them, as k plain micro-steps do: so the
    engine's own boundary (micro-step counter) fires at the k-th, ZeRO-2/3 reduce-scatter each micro-step's
    gradient into their partitions and ZeRO 0/1 reduce at the boundary through their usual code paths, and the
    batch sizes, sample counters and LR schedule in DeepSpeed's state are those of plain accumulation (a
    checkpoint does not know which of the two wrote it). The one difference: engine.backward divides each loss
    by k (the mean of k micro-batch losses), but the cached gradient is already that of the whole step's loss,
    so the surrogate backwards run with scale_wrt_gas=False."""
    check_window_start(engine, len(batches))
    cache = embed_without_graph(lambda micro: forward(engine, to_device(batches[micro], info.device)[0]),
                                len(batches), info.device, EMBEDDING_KEYS)
    labels = {key: torch.cat([batch[key] for batch in batches]).to(info.device, non_blocking=True)
              for key in LABEL_KEYS}
    stats = loss_and_output_grads(cache, loss_fn, labels, info.rank, step)
    for micro, batch in enumerate(batches):
        with replaying(cache, micro):
            out = forward(engine, to_device(batch, info.device)[0])
        engine.backward(surrogate_loss(cache, micro, out), scale_wrt_gas=False)
        if micro < len(batches) - 1:
            engine.step()  # mid-window: DeepSpeed counts the micro-step (and ZeRO-2/3 have reduced its gradient)
    return finish_micro_step(engine, stats, info, want_grad_norm, agreement)

"""Gradient caching (GradCache, Gao et al. 2021): the hard-negative loss of one optimizer step over all k
micro-batches of every rank, N = k n world pairs, at the activation memory of one micro-batch.

The mechanics, used by trainer.training.step.grad_cache_step (which drives the engine):
1. `embed_without_graph`: k forwards without autograd, each micro-batch's RNG state (torch CPU and CUDA
   generators) saved first, so dropout and region dropout draw the same numbers when it is run again.
2. `loss_and_output_grads`: one autograd all-gather of this rank's k n embeddings (the four of them side by side
   in one tensor) and one plain all-gather of the labels (concept multi-hots and image ids packed in one float32
   tensor), then the loss of this rank's k n rows against all N columns and its gradient with respect to this
   rank's outputs. The gather's backward sums every rank's gradient of this rank's rows, so the cached gradient
   is that of the sum over ranks of the rank losses, as the autograd gather of a plain step gives.
3. `replaying` + `surrogate_loss`: each micro-batch's forward again, with its graph and its saved RNG state, and
   the backward of sum <output, cached gradient>, whose parameter gradient is the chain rule's second half.

The sum of the k surrogate backwards is the parameter gradient of the one loss over N pairs: exactly (up to
float rounding) the gradient of a single process on the concatenated batch, when the model treats every sample
on its own (GroupNorm, no batch statistics) and the dropout draws are the ones replayed here.

Two gathers rather than one: the labels carry no gradient, and in the autograd gather they would add their
2 K columns to the backward's all-reduce (K concepts, about as wide as the four embeddings together).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainer.distributed import gather_no_grad, gather_with_grad

CONCEPT_LOGIT_KEYS = ("img_concept_logits", "txt_concept_logits")
ID_PIECE_BITS = 16  # an int64 id travels as four 16-bit pieces: each is exact in float32 (24-bit mantissa)
ID_PIECES = 64 // ID_PIECE_BITS


@dataclass(frozen=True)
class RngState:
    """The torch generators a forward draws from: the CPU one, and the current CUDA device's on GPU machines."""

    cpu: Tensor
    cuda: Tensor | None = None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)


@dataclass
class CachedStep:
    """What the pass without autograd leaves for one optimizer step on this rank.

    outputs: the model's outputs of all k micro-batches, rows concatenated in micro-batch order, detached (the
    gathered embeddings in float32, as the loss scores them). rows: each micro-batch's row count. rng_before:
    each micro-batch's RNG state before its forward; rng_after: the state after the last one, which the step
    leaves behind, as k plain forwards would. grads: d loss / d output, filled by `loss_and_output_grads`."""

    outputs: dict[str, Tensor]
    gathered_keys: tuple[str, ...]
    rows: list[int]
    rng_before: list[RngState]
    rng_after: RngState
    device: torch.device
    grads: dict[str, Tensor] = field(default_factory=dict)

    def micro_rows(self, micro: int) -> slice:
        start = sum(self.rows[:micro])
        return slice(start, start + self.rows[micro])


def embed_without_graph(forward: Callable[[int], Mapping[str, Tensor]], num_micro: int, device: torch.device,
                        gathered_keys: tuple[str, ...]) -> CachedStep:
    """forward(i): the model's outputs of micro-batch i. Runs all of them without autograd, RNG states saved.
    Keeps the `gathered_keys` outputs (float32) and the concept logits, when the model has them."""
    parts: dict[str, list[Tensor]] = {}
    rng_before, rows = [], []
    for micro in range(num_micro):
        rng_before.append(RngState.capture(device))
        with torch.no_grad():
            out = forward(micro)
        for key in (*gathered_keys, *CONCEPT_LOGIT_KEYS):
            if key in out:
                value = out[key].detach()
                parts.setdefault(key, []).append(value.float() if key in gathered_keys else value)
        rows.append(next(iter(out.values())).shape[0])
    outputs = {key: torch.cat(values) for key, values in parts.items()}
    kept = tuple(key for key in gathered_keys if key in outputs)
    return CachedStep(outputs, kept, rows, rng_before, RngState.capture(device), device)


def pack_labels(labels: Mapping[str, Tensor]) -> Tensor:
    """The labels as one float32 [rows, width] tensor for one gather: 2-d float labels (concept multi-hots, 0/1)
    as they are, 1-d integer labels (image ids) as four exact 16-bit pieces each."""
    columns = []
    for value in labels.values():
        if value.is_floating_point():
            columns.append(value.float().reshape(value.shape[0], -1))
        else:
            shifts = torch.arange(0, 64, ID_PIECE_BITS, device=value.device)
            columns.append(((value.long().unsqueeze(1) >> shifts) & (2**ID_PIECE_BITS - 1)).float())
    return torch.cat(columns, dim=1)


def unpack_labels(packed: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `pack_labels` for labels shaped like `like` (same keys, dtypes and widths)."""
    out, start = {}, 0
    for key, value in like.items():
        if value.is_floating_point():
            width = math.prod(value.shape[1:])
            out[key] = packed[:, start:start + width].reshape(-1, *value.shape[1:]).to(value.dtype)
        else:
            width = ID_PIECES
            shifts = torch.arange(0, 64, ID_PIECE_BITS, device=packed.device)
            pieces = packed[:, start:start + width].long() << shifts
            out[key] = pieces.sum(dim=1).to(value.dtype)  # int64 sums wrap: negative ids come back too
        start += width
    return out


def loss_and_output_grads(cache: CachedStep, loss_fn: Callable[..., dict[str, Tensor]],
                          labels: Mapping[str, Tensor], rank: int, step: int) -> dict[str, Tensor]:
    """The loss of this rank's rows against every rank's columns (labels: this rank's, all micro-batches
    concatenated); fills cache.grads with its gradient with respect to this rank's outputs. Returns the loss
    terms, detached. Every rank must call it (two all-gathers, and an all-reduce or reduce-scatter in the
    gradient), with the same number of rows."""
    keys = cache.gathered_keys
    widths = [cache.outputs[key].shape[1] for key in keys]
    local = torch.cat([cache.outputs[key] for key in keys], dim=1).requires_grad_()
    gathered = dict(zip(keys, gather_with_grad(local).split(widths, dim=1)))
    gathered.update(unpack_labels(gather_no_grad(pack_labels(labels)), labels))
    logit_leaves = {key: cache.outputs[key].clone().requires_grad_() for key in CONCEPT_LOGIT_KEYS
                    if key in cache.outputs}
    logits = tuple(logit_leaves[key] for key in CONCEPT_LOGIT_KEYS) if logit_leaves else None
    rows = local.shape[0]
    losses = loss_fn(gathered, row_offset=rank * rows, num_rows=rows, step=step, concept_logits=logits)
    grads = torch.autograd.grad(losses["loss"], [local, *logit_leaves.values()])
    cache.grads = dict(zip(keys, grads[0].split(widths, dim=1)))
    cache.grads.update(zip(logit_leaves, grads[1:]))
    return {key: value.detach() for key, value in losses.items()}


@contextmanager
def replaying(cache: CachedStep, micro: int) -> Iterator[None]:
    """Run micro-batch `micro`'s forward again under the RNG state its first forward had. After the last one the
    generators are where the pass without autograd left them."""
    cache.rng_before[micro].restore(cache.device)
    try:
        yield
    finally:
        if micro == len(cache.rows) - 1:
            cache.rng_after.restore(cache.device)


def surrogate_loss(cache: CachedStep, micro: int, out: Mapping[str, Tensor]) -> Tensor:
    """sum over the cached outputs of <output, cached gradient> for micro-batch `micro`: a scalar whose gradient
    with respect to the outputs is the cached one, so its backward gives this micro-batch's share of the
    parameter gradient of the whole step's loss (its value means nothing)."""
    rows = cache.micro_rows(micro)
    total = out[next(iter(cache.grads))].new_zeros((), dtype=torch.float32)
    for key, grad in cache.grads.items():
        total = total + (out[key].float() * grad[rows]).sum()
    return total

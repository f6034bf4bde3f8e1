"""The one owner of communication: process-group set-up from whatever launcher started us, and every
collective the trainer runs (the autograd all-gather of the global batch, the per-step agreement, evaluation's
gathers, checkpoint barriers and broadcasts).

Launchers: `deepspeed`, `torchrun`, SLURM's `srun`, `accelerate launch`, or none (a single process). All of
them end up as RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the environment; SLURM's own
variables are translated when those are missing.

Backend: gloo on CPU machines; on GPU machines one device-mapped group, `cpu:gloo,cuda:nccl`. NCCL refuses CPU
tensors, and much of a run's bookkeeping (counts, flags, ids, the checkpoint's data positions) is born on the
host: with the mapped group a CPU tensor goes over gloo and a CUDA tensor over NCCL, so no helper has to copy
host values to the GPU and back, and the bulk traffic (embeddings, gradients) stays on NCCL. Every helper runs
its collective whenever a process group exists, at world size 1 too, so one GPU exercises the same code as 64.

Why the gather has autograd: each rank scores its own n rows against all N = n * world columns. The columns
from other ranks must carry gradient back to the rank that produced them (the backward sums every rank's
gradient of each piece), so that with the engine's gradient averaging the update equals the single-process
update on the concatenated batch. A no-grad gather with the local slice put back gives 1/world of that update.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment_from_slurm() -> None:
    """srun sets SLURM_* only; translate to the torch.distributed variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])


def backend_for(use_cuda: bool) -> str:
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def init_distributed() -> DistInfo:
    """Initialise the default process group (idempotent) and return this process's place in it."""
    _environment_from_slurm()
    if "RANK" not in os.environ:  # no launcher: a world of one, so DeepSpeed does not go looking for MPI
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before the group: NCCL binds each rank to its current device
    if not dist.is_initialized():
        import deepspeed
        import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch into sys.modules)

        # DeepSpeed compiles a shared-memory comm op on CPU at every fresh machine (23-60 s); gloo does the work.
        comm_torch = sys.modules.get("deepspeed.comm.torch")
        if comm_torch is not None and hasattr(comm_torch, "build_shm_op"):
            comm_torch.build_shm_op = lambda: None
        # Our own group first (device-mapped on GPUs); DeepSpeed then wraps the existing default group.
        dist.init_process_group(backend=backend_for(use_cuda), rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    # torchrun and srun (translated above) set LOCAL_WORLD_SIZE; the deepspeed launcher sets LOCAL_SIZE.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistInfo(rank, world, local_rank, local_world, device)


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def barrier() -> None:
    if is_active():
        dist.barrier()


def shutdown() -> None:
    """Without an explicit destroy, gloo runs abort at interpreter exit now and then."""
    if is_active():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- training

# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor



class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient of this rank's piece (reduce-scatter).

    Written here rather than taken from torch.distributed.nn (deprecated, and it warns on every rank) so the
    backward can use NCCL's reduce_scatter and fall back to an all-reduce where gloo has none."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rows = tensor.shape[0]
        out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        _all_gather_single(out, tensor.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if grad.device.type == "cuda":
            piece = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            _reduce_scatter_single(piece, grad)
            return piece
        total = grad.clone()
        dist.all_reduce(total)
        start = dist.get_rank() * ctx.rows
        return total[start:start + ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` (equal shapes) along dim 0; gradients flow back to each rank's piece."""
    if not is_active():
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` (equal shapes) along dim 0."""
    if not is_active():
        return tensor
    out = torch.empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    _all_gather_single(out, tensor.contiguous())
    return out


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, on the tensor's own device (a copy: `value` is left as it was)."""
    value = value.clone()
    if is_active():
        dist.all_reduce(value)
    return value


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """The largest value over ranks: a flag that any rank raised, seen by all of them."""
    value = value.clone()
    if is_active():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


# ---------------------------------------------------------------------------------------------- objects


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (small things: a checkpoint tag, a refusal, a results dict)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects_to_main(obj) -> list | None:
    """Every rank's object, in rank order, on rank 0; None elsewhere."""
    if not is_active():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_rows_to_main(tensor: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every rank's rows (any count, 0 included; the same trailing shape and dtype everywhere) on
    rank 0, on the tensor's device; None elsewhere. Memory beyond rank 0 stays at one rank's share."""
    if not is_active():
        return tensor
    world = dist.get_world_size()
    counts = gather_no_grad(torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)).tolist()
    longest = max(counts)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    main = dist.get_rank() == 0
    parts = [torch.empty_like(padded) for _ in range(world)] if main else None
    dist.gather(padded, parts, dst=0)
    if not main:
        return None
    return torch.cat([part[:count] for part, count in zip(parts, counts)])

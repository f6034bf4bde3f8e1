"""Process-group set-up from whatever launcher started us, and the autograd all-gather of the global batch.

Launchers: `deepspeed`, `torchrun`, SLURM's `srun`, `accelerate launch`, or none (a single process). All of
them end up as RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the environment; SLURM's own
variables are translated when those are missing. gloo on CPU, NCCL on GPU.

Why the gather has autograd: each rank scores its own n rows against all N = n * world columns. The columns
from other ranks must carry gradient back to the rank that produced them (all_gather's backward sums the
incoming gradients), so that with the engine's gradient averaging the update equals the single-process update
on the concatenated batch. A no-grad gather with the local slice put back gives 1/world of that update.
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


def init_distributed() -> DistInfo:
    """Initialise the default process group (idempotent) and return this process's place in it."""
    _environment_from_slurm()
    if "RANK" not in os.environ:  # no launcher: a world of one, so DeepSpeed does not go looking for MPI
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        import deepspeed
        import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch into sys.modules)

        # DeepSpeed compiles a shared-memory comm op on CPU at every fresh machine (23-60 s); gloo does the work.
        comm_torch = sys.modules.get("deepspeed.comm.torch")
        if comm_torch is not None and hasattr(comm_torch, "build_shm_op"):
            comm_torch.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun and srun (translated above) set LOCAL_WORLD_SIZE; the deepspeed launcher sets LOCAL_SIZE.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, local_world, device)


def shutdown() -> None:
    """Without an explicit destroy, gloo runs abort at interpreter exit now and then."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0; gradients flow back to each rank's own piece."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (equal shapes on every rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """The largest value over ranks: a flag that any rank raised, seen by all of them."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value

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
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

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


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Initialise the default process group (idempotent) and return this process's place in it. timeout_s: how
    long any collective waits for the other ranks (engine.collective_timeout_s; None: torch's default)."""
    _environment_from_slurm()
    if "RANK" not in os.environ:  # no launcher: a world of one, so DeepSpeed does not go looking for MPI
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before the group: NCCL binds each rank to its current device
    if timeout_s is not None:
        # Groups made later (DeepSpeed's data-parallel groups: dist.new_group without a timeout) take the module's
        # default, 30 minutes, not the world group's: a peer missing from the gradient all-reduce would wait that long.
        dist.distributed_c10d.default_pg_timeout = timedelta(seconds=timeout_s)
        if hasattr(dist.distributed_c10d, "default_pg_nccl_timeout"):
            dist.distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        import deepspeed
        import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch into sys.modules)

        # DeepSpeed compiles a shared-memory comm op on CPU at every fresh machine (23-60 s); gloo does the work.
        comm_torch = sys.modules.get("deepspeed.comm.torch")
        if comm_torch is not None and hasattr(comm_torch, "build_shm_op"):
            comm_torch.build_shm_op = lambda: None
        # Our own group first (device-mapped on GPUs); DeepSpeed then wraps the existing default group.
        dist.init_process_group(backend=backend_for(use_cuda), rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=None if timeout_s is None else timedelta(seconds=timeout_s))
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


def shutdown(peers_answer: bool = True) -> None:
    """Without an explicit destroy, gloo runs abort at interpreter exit now and then. peers_answer=False after a
    PeerLost: no closing barrier, which would wait for the missing rank once more."""
    if is_active():
        if peers_answer:
            dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- peers

# How gloo words a collective that a peer did not come to (a timeout) or left (its process or node is gone).
PEER_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "Broken pipe")


class PeerLost(Exception):  # noqa: N818 - named for what happened, like the other one-line stops
    """A collective ended because another rank did not come within engine.collective_timeout_s or went away:
    the run ends with this one line, naming the ranks, and exit code 3 (the last complete checkpoint stays)."""

    exit_code = 3


def is_peer_failure(error: BaseException) -> bool:
    """Whether a collective's error says a peer did not come or went away (not a bug of this rank)."""
    return isinstance(error, RuntimeError) and any(words in str(error) for words in PEER_FAILURES)


class PeerWatch:
    """Each rank's sign of life in the launcher's key-value store (MASTER_ADDR:MASTER_PORT, the store the process
    group was set up through; a client of its own, so the process group's is never touched from another thread).

    A daemon thread writes "<beats> <step>" under trainer/alive/<rank> every `interval_s`; the training loop sets
    the step each rank has begun. When a collective fails (is_peer_failure), `missing()` reads every rank's record
    twice, 2.5 intervals apart: a rank whose beats did not move is frozen or gone (a stopped process, a dead node),
    a rank whose step is behind is alive but has not reached the collective. Costs one small write per interval."""

    PREFIX = "trainer/alive/"

    def __init__(self, rank: int, world: int, interval_s: float = 1.0):
        self.rank, self.world, self.interval_s = rank, world, interval_s
        self.step = 0
        self._stop = threading.Event()
        self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                    timeout=timedelta(seconds=10))
        self._thread = threading.Thread(target=self._beat, name="peer-watch", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        beats = 0
        while not self._stop.is_set():
            beats += 1
            try:
                self._store.set(f"{self.PREFIX}{self.rank}", f"{beats} {self.step}")
            except RuntimeError:  # the store's host (rank 0 or the launcher) is gone: nothing left to tell
                return
            self._stop.wait(self.interval_s)

    def _records(self) -> dict[int, tuple[int, int]] | None:
        """rank -> (beats, step) for every rank that has written one; None when the store does not answer."""
        out = {}
        for r in range(self.world):
            key = f"{self.PREFIX}{r}"
            try:
                if self._store.check([key]):
                    beats, step = self._store.get(key).decode().split()
                    out[r] = (int(beats), int(step))
            except RuntimeError:  # one timeout is enough: the store's host is frozen or gone
                return None
        return out

    def missing(self) -> str:
        """Which ranks did not come, in words: frozen or gone, behind, or none found (then every rank is inside
        the same step and one is stuck there)."""
        first = self._records()
        time.sleep(2.5 * self.interval_s)
        second = self._records() if first is not None else None
        if second is None:
            return (f"the store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} does not answer: "
                    "its host (rank 0, or the launcher of node 0) is frozen or gone")
        others = [r for r in range(self.world) if r != self.rank]
        silent = [r for r in others if r not in second or second[r][0] == first.get(r, (None,))[0]]
        behind = [r for r in others if r not in silent and second[r][1] < self.step]
        said = []
        if silent:
            seen = {r: f" (last seen at step {second[r][1]})" if r in second else " (never seen)" for r in silent}
            said.append("no sign of life from " + ", ".join(f"rank {r}{seen[r]}" for r in silent))
        if behind:
            said.append("alive but behind: " + ", ".join(f"rank {r} at step {second[r][1]}" for r in behind))
        return "; ".join(said) or f"every rank is alive and has begun step {self.step}: one is stuck inside it"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s)


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

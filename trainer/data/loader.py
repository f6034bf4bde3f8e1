"""The run's training loader: one DataLoader whose workers live for the whole run, each reading its endless
stream (trainer.data.stream), with a state_dict that holds every worker's stream position for an exact resume."""
from __future__ import annotations

import functools
import logging
import multiprocessing
import signal
import time
import weakref
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.shardstream import StreamState
from trainer.data.stream import TrainStream

log = logging.getLogger(__name__)


class _EndlessWorkers(IterableDataset):
    """What the DataLoader's workers iterate: loader worker i plays role (i + rotation) % workers, whose stream is
    endless and continues from its saved position when it has one (a fresh one starts at start_epoch)."""

    def __init__(self, stream: TrainStream, start_epoch: int, rotation: int, states: list[StreamState | None]):
        self.stream = stream
        self.start_epoch = start_epoch
        self.rotation = rotation
        self.states = states

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        role = (worker + self.rotation) % num_workers
        yield from self.stream.worker_batches(role, num_workers, self.states[role], endless=True,
                                              start_epoch=self.start_epoch)


def _worker_init(worker_id: int, starts=None) -> None:
    if starts is not None:  # counted across processes: a loader rebuilt per epoch would show here
        with starts.get_lock():
            starts.value += 1
    torch.set_num_threads(1)  # decoding workers must not fight the training threads
    # A preemption signal sent to the whole process group (SLURM, a terminal) is for the training process, which
    # checkpoints at the next step; a loader worker killed by it would crash that process first.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _stop_workers(batches) -> None:
    shutdown = getattr(batches, "_shutdown_workers", None)  # a DataLoader iterator with worker processes
    if shutdown is not None:
        shutdown()


class TrainLoader:
    """Endless (data_epoch, batch) pairs from ONE DataLoader whose workers live for the whole run.

    Each worker's stream never ends: an epoch is only a label, epoch = batches so far // stream.epoch_batches,
    so nothing is rebuilt and no shuffle buffer is refilled at an epoch's end (webdataset's with_epoch, as
    OpenCLIP uses it, starts every worker's pipeline, buffer included, anew each epoch). The DataLoader takes
    batches from its workers in turn, so batch j of the run came from worker role j % workers; `state_dict()`
    holds every role's stream position after its last batch handed out here (batches prefetched but not handed
    out are made again after a resume).

    num_workers: the DataLoader's worker processes (0: decode in this process, as one worker role). start_epoch:
    where fresh streams start (their seeds). `load_state_dict` (before the first batch) continues a saved
    position of the same world size and worker count exactly; its cost (bytes re-read, seconds) is logged and
    kept in `resume_cost`. The workers start at the first batch and stop at close() (or when the loader goes)."""

    def __init__(self, stream: TrainStream, num_workers: int, start_epoch: int = 0):
        self.stream = stream
        self.loader_workers = num_workers
        self.num_workers = max(1, num_workers)  # worker roles: one in-process role without worker processes
        self.epoch_batches = stream.epoch_batches
        self.start_epoch = start_epoch
        self.consumed = start_epoch * self.epoch_batches
        self.states: list[StreamState | None] = [None] * self.num_workers
        self.starts = multiprocessing.Value("i", 0)
        self.started = time.perf_counter()
        self.first_batch_seconds: float | None = None
        self.resume_cost: dict | None = None
        self._to_restore: set[int] = set()
        self._batches: Iterator[dict] | None = None  # the DataLoader's iterator, made at the first batch
        self._finalizer: weakref.finalize | None = None

    def state_dict(self) -> dict:
        """Plain values (torch.save / weights_only load): batches handed out, worker count, the epoch fresh
        streams started at, each worker role's stream position (None: that role has not moved yet)."""
        return {"batches": self.consumed, "num_workers": self.num_workers, "start_epoch": self.start_epoch,
                "workers": [s.to_dict() if s is not None else None for s in self.states]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() of the same world size and worker count; ValueError for another count."""
        if self._batches is not None:
            raise RuntimeError("TrainLoader.load_state_dict: batches were already handed out")
        if state["num_workers"] != self.num_workers:
            raise ValueError(f"the saved data position is of {state['num_workers']} workers per rank, this run has "
                             f"{self.num_workers} (data.num_workers)")
        self.consumed = state["batches"]
        self.start_epoch = state["start_epoch"]
        self.states = [StreamState.from_dict(s) if s else None for s in state["workers"]]
        self._to_restore = {i for i, s in enumerate(self.states) if s is not None}
        self.resume_cost = {"bytes": 0, "seconds": 0.0, "workers": len(self._to_restore)}

    def _start(self) -> Iterator[dict]:
        workers = _EndlessWorkers(self.stream, self.start_epoch, self.consumed % self.num_workers, list(self.states))
        n = self.loader_workers
        loader = DataLoader(workers, batch_size=None, num_workers=n,
                            worker_init_fn=functools.partial(_worker_init, starts=self.starts),
                            persistent_workers=n > 0, prefetch_factor=4 if n else None,
                            pin_memory=torch.cuda.is_available())
        self.started = time.perf_counter()
        batches = iter(loader)
        # Workers ignore SIGTERM (see _worker_init), so multiprocessing's exit hook, which terminates and joins
        # them, would wait forever: they are asked to stop first, at close() or when this object goes (also at exit).
        self._finalizer = weakref.finalize(self, _stop_workers, batches)
        return batches

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    @property
    def worker_starts(self) -> int:
        return self.starts.value

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> tuple[int, dict]:
        if self._batches is None:
            self._batches = self._start()
        batch = next(self._batches)
        if "images" not in batch:
            raise RuntimeError("a training stream ended: its workers' streams must be endless")
        role = int(batch.pop("worker"))
        self.states[role] = batch.pop("stream_state")
        if "restore_bytes" in batch:
            self._restored(role, int(batch.pop("restore_bytes")), float(batch.pop("restore_seconds")))
        if self.first_batch_seconds is None:
            self.first_batch_seconds = time.perf_counter() - self.started
        epoch = self.consumed // self.epoch_batches
        self.consumed += 1
        return epoch, batch

    def _restored(self, role: int, nbytes: int, seconds: float) -> None:
        self.resume_cost["bytes"] += nbytes
        self.resume_cost["seconds"] = max(self.resume_cost["seconds"], seconds)  # workers restore side by side
        self._to_restore.discard(role)
        if not self._to_restore:
            self.resume_cost["first_batch_seconds"] = time.perf_counter() - self.started
            log.info("data stream back in position: %.1f MB re-read by %d workers in %.2f s (first batch after "
                     "%.2f s)", self.resume_cost["bytes"] / 1e6, self.resume_cost["workers"],
                     self.resume_cost["seconds"], self.resume_cost["first_batch_seconds"])

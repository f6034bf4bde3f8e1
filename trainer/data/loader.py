"""The run's training loader: one DataLoader whose workers live for the whole run, each reading its endless
stream (trainer.data.stream), with a state_dict that holds every worker's stream position for an exact resume,
and a bounded wait for each batch (DataWait): a worker that produces nothing ends the run with a line naming it
(DataTimeout), and a stop request is not kept waiting on data (StopWhileWaiting)."""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.samples import NO_BAD_SAMPLE_BOUND, BadSampleLimits, TooManyBadSamples
from trainer.data.shardstream import StreamState
from trainer.data.stream import TrainStream
from usercli import UserError

log = logging.getLogger(__name__)

# How long a stop request (SIGTERM/SIGUSR1) waits for the batch the loader is waiting for: long enough for a slow
# batch to come (then the step checkpoints as usual, on every rank alike), short beside a scheduler's warning time.
STOP_GRACE_S = 10.0
POLL_S = 1.0  # how often the wait looks at the stop request and the clock


class DataTimeout(UserError):  # noqa: N818 - what the user meets, like ConfigError
    """No batch came from a loader worker within data.batch_timeout_s: the message names the worker and its sets."""


class StopWhileWaiting(Exception):  # noqa: N818 - a stop request, not a fault
    """A stop was requested while the loader waited for a batch, and none came within the grace (STOP_GRACE_S)."""

    def __init__(self, waited_s: float):
        super().__init__(f"no batch came in the {waited_s:.0f} s after the stop request")
        self.waited_s = waited_s


def never() -> bool:
    return False


@dataclass(frozen=True)
class DataWait:
    """How the main process waits for a batch from its loader workers. timeout_s: data.batch_timeout_s, the
    longest wait for one batch (the first one included: workers start and fill their shuffle buffers).
    stop_requested: whether a stop was asked for (trainer.training.loop's StopRequest); once it is, the wait
    lasts stop_grace_s more at most. In-process decoding (data.num_workers=0) cannot be waited on: there the
    bad-sample bound (BadSampleLimits) is what ends a stream of bad samples."""

    timeout_s: float = 600.0
    stop_requested: Callable[[], bool] = never
    stop_grace_s: float = STOP_GRACE_S
    poll_s: float = POLL_S


WAIT_DEFAULTS = DataWait()

class _EndlessWorkers(IterableDataset):
    """What the DataLoader's workers iterate: loader worker i plays role (i + rotation) % workers, whose stream is
    endless and continues from its saved position when it has one (a fresh one starts at start_epoch)."""

    def __init__(self, stream: TrainStream, start_epoch: int, rotation: int, states: list[StreamState | None],
                 limits: BadSampleLimits):
        self.stream = stream
        self.start_epoch = start_epoch
        self.rotation = rotation
        self.states = states
        self.limits = limits

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        role = (worker + self.rotation) % num_workers
        yield from self.stream.worker_batches(role, num_workers, self.states[role], endless=True,
                                              start_epoch=self.start_epoch, limits=self.limits)


def _worker_init(worker_id: int, starts=None, stopping=None) -> None:
    if starts is not None:  # counted across processes: a loader rebuilt per epoch would show here
        with starts.get_lock():
            starts.value += 1
    torch.set_num_threads(1)  # decoding workers must not fight the training threads
    # A preemption signal sent to the whole process group (SLURM, a terminal) is for the training process, which
    # checkpoints at the next step; a loader worker killed by it would crash that process first. Once the loader
    # is being closed (`stopping` set), SIGTERM is the DataLoader's own way to end a worker that is busy inside
    # its stream (reading bad samples, a stalled read) and cannot see the request to stop: then it ends it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, functools.partial(_on_sigterm, stopping) if stopping is not None else signal.SIG_IGN)


def _on_sigterm(stopping, _signum: int, _frame) -> None:
    if stopping.value:
        os._exit(0)  # a worker holds nothing to save or flush: its positions travel with the batches


def _stop_workers(batches, stopping=None) -> None:
    shutdown = getattr(batches, "_shutdown_workers", None)  # a DataLoader iterator with worker processes
    if shutdown is None:
        return
    if stopping is not None:
        stopping.value = 1
    shutdown()  # asks each worker to stop, waits a while, then sends SIGTERM to those still running
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():  # multiprocessing's exit hook would wait for it forever
            worker.kill()
            worker.join(timeout=5)


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
    kept in `resume_cost`. The workers start at the first batch and stop at close() (or when the loader goes).
    limits: when a worker's bad samples end the run (TooManyBadSamples, raised here); wait: how long a batch is
    waited for (DataTimeout, StopWhileWaiting)."""

    def __init__(self, stream: TrainStream, num_workers: int, start_epoch: int = 0,
                 limits: BadSampleLimits = NO_BAD_SAMPLE_BOUND, wait: DataWait = WAIT_DEFAULTS):
        self.stream = stream
        self.limits = limits
        self.wait = wait
        self.loader_workers = num_workers
        self.num_workers = max(1, num_workers)  # worker roles: one in-process role without worker processes
        self.epoch_batches = stream.epoch_batches
        self.start_epoch = start_epoch
        self.consumed = start_epoch * self.epoch_batches
        self.states: list[StreamState | None] = [None] * self.num_workers
        self.starts = multiprocessing.Value("i", 0)
        self.stopping = multiprocessing.Value("b", 0)  # set at close(): workers may then end on SIGTERM
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
        workers = _EndlessWorkers(self.stream, self.start_epoch, self.consumed % self.num_workers, list(self.states),
                                  self.limits)
        n = self.loader_workers
        # With workers, each wait for a batch is cut into polls of wait.poll_s (see _next_batch).
        loader = DataLoader(workers, batch_size=None, num_workers=n, timeout=self.wait.poll_s if n else 0,
                            worker_init_fn=functools.partial(_worker_init, starts=self.starts, stopping=self.stopping),
                            persistent_workers=n > 0, prefetch_factor=4 if n else None,
                            pin_memory=torch.cuda.is_available())
        self.started = time.perf_counter()
        batches = iter(loader)
        # Workers ignore SIGTERM (see _worker_init), so multiprocessing's exit hook, which terminates and joins
        # them, would wait forever: they are asked to stop first, at close() or when this object goes (also at exit).
        self._finalizer = weakref.finalize(self, _stop_workers, batches, self.stopping)
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
        batch = self._next_batch()
        if "data_error" in batch:  # a worker's bad samples passed data.max_bad_fraction (trainer.data.stream)
            raise TooManyBadSamples(batch["data_error"])
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

    def _next_batch(self) -> dict:
        """The next batch from the DataLoader, waited for in polls: at most wait.timeout_s (DataTimeout), and at
        most wait.stop_grace_s once a stop is requested (StopWhileWaiting). In-process decoding has no wait."""
        if self.loader_workers == 0:
            return next(self._batches)
        started, stop_seen = time.monotonic(), None
        while True:
            try:
                return next(self._batches)
            except RuntimeError as e:
                # DataLoader(timeout=poll) says that a poll came back empty with this RuntimeError; its iterator
                # stays as it was, so the next call waits on for the same batch. Other RuntimeErrors (a worker that
                # died) are not ours to wait out.
                if "timed out" not in str(e):
                    raise
            now = time.monotonic()
            if self.wait.stop_requested():
                stop_seen = stop_seen or now
                if now - stop_seen >= self.wait.stop_grace_s:
                    raise StopWhileWaiting(now - stop_seen)
            if now - started >= self.wait.timeout_s:
                raise DataTimeout(self._timeout_message(now - started))

    def _timeout_message(self, waited_s: float) -> str:
        role = self.consumed % self.num_workers  # batch j comes from worker role j % workers (see the class doc)
        sets = ", ".join(sorted({str(Path(urls[0]).parent) for urls in self.stream.set_urls if urls}))
        first = " (its first: workers start and fill data.shuffle_buffer first)" if self._first_pending() else ""
        return (f"data.batch_timeout_s: no training batch came from loader worker {role} of rank "
                f"{self.stream.rank} in {waited_s:.0f} s{first}, reading {sets}: its shards may be on a stalled "
                f"file system or hold no usable sample; check them with `python -m shards check {sets}`, or raise "
                f"data.batch_timeout_s (now {self.wait.timeout_s:g})")

    def _first_pending(self) -> bool:
        return self.first_batch_seconds is None

    def _restored(self, role: int, nbytes: int, seconds: float) -> None:
        self.resume_cost["bytes"] += nbytes
        self.resume_cost["seconds"] = max(self.resume_cost["seconds"], seconds)  # workers restore side by side
        self._to_restore.discard(role)
        if not self._to_restore:
            self.resume_cost["first_batch_seconds"] = time.perf_counter() - self.started
            log.info("data stream back in position: %.1f MB re-read by %d workers in %.2f s (first batch after "
                     "%.2f s)", self.resume_cost["bytes"] / 1e6, self.resume_cost["workers"],
                     self.resume_cost["seconds"], self.resume_cost["first_batch_seconds"])

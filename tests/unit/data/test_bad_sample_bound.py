"""Issue 26, no hang: the bad-sample bound judged where samples are read (BadSampleCounter), its warnings
rate-limited, and the loader's bounded wait for a batch (DataTimeout, StopWhileWaiting), each with a hard timeout."""
from __future__ import annotations

import logging
import time

import pytest
import torch

from trainer.data import samples
from trainer.data.loader import DataTimeout, DataWait, StopWhileWaiting, TrainLoader
from trainer.data.samples import BadSample, BadSampleCounter, BadSampleLimits, TooManyBadSamples
from usercli import UserError


def _bad(counter: BadSampleCounter, n: int, url: str = "/sets/broken/shard-000001.tar") -> None:
    for i in range(n):
        counter.read += 1
        error = BadSample(f"key{i}: json has no 'captions' list of strings", "malformed_json")
        error.url = url
        counter(error)


def test_warnings_are_one_line_each_for_the_first_then_counts_per_kind_at_a_rate(caplog, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(samples.time, "monotonic", lambda: clock[0])
    counter = BadSampleCounter(BadSampleLimits(first_reported=3, report_every_s=30), who="worker 2 of rank 1")
    with caplog.at_level(logging.WARNING, logger="trainer.data.samples"):
        _bad(counter, 5000)  # all within one instant: no summary yet
        assert len(caplog.records) == 3
        assert all("skipping bad sample (malformed_json" in r.getMessage() for r in caplog.records)
        assert "worker 2 of rank 1" in caplog.records[0].getMessage()
        clock[0] += 31
        _bad(counter, 1)
    assert len(caplog.records) == 4
    summary = caplog.records[-1].getMessage()
    assert "skipped 4998 more bad samples in worker 2 of rank 1 (malformed_json 4998; 5001 of 5001 read" in summary
    assert "(in /sets/broken/shard-000001.tar)" in summary


def test_past_the_fraction_the_counter_ends_the_stream_naming_the_set_and_the_kinds():
    counter = BadSampleCounter(BadSampleLimits(max_fraction=0.5, min_read=10), who="worker 0 of rank 3")
    counter.read += 20  # good samples
    _bad(counter, 19)  # 19 of 39: below the bound
    with pytest.raises(TooManyBadSamples) as stopped:
        _bad(counter, 5)
    message = str(stopped.value)
    assert message.startswith("/sets/broken: 21 of 41 samples read by worker 0 of rank 3 were bad")
    assert "data.max_bad_fraction=0.5; malformed_json 21" in message
    assert "python -m shards check /sets/broken" in message and "\n" not in message
    assert isinstance(stopped.value, UserError)  # one line, exit 2
    fresh = BadSampleCounter(BadSampleLimits(max_fraction=0.0, min_read=10))
    _bad(fresh, 9)  # too few read to judge, however bad
    with pytest.raises(TooManyBadSamples):
        _bad(fresh, 1)


def test_the_default_bound_never_ends_a_stream():
    counter = BadSampleCounter()
    _bad(counter, 5000)
    assert counter.bad == 5000


# ---------------------------------------------------------------------------------------------- the loader's wait


class _Stalled:
    """A TrainStream stand-in whose one worker sends `batches` batches after `delay_s` each, then nothing."""

    epoch_batches = 10
    rank = 3
    set_urls = [["/sets/stalled/shard-000000.tar"]]

    def __init__(self, batches: int, delay_s: float = 0.0):
        self.batches = batches
        self.delay_s = delay_s

    def worker_batches(self, worker, num_workers, state=None, *, endless=False, start_epoch=0, limits=None):
        for i in range(self.batches):
            time.sleep(self.delay_s)
            yield {"images": torch.zeros(2, 3), "worker": torch.tensor(worker), "stream_state": None, "i": i}
        time.sleep(120)  # stalled: a hung read (killed when the loader closes)


def _next_within(loader: TrainLoader, limit_s: float):
    start = time.monotonic()
    try:
        return next(loader)
    finally:
        assert time.monotonic() - start < limit_s, "the wait was not bounded"


def test_a_worker_that_sends_nothing_ends_the_wait_naming_it():
    loader = TrainLoader(_Stalled(batches=0), num_workers=1, wait=DataWait(timeout_s=2, poll_s=0.2))
    try:
        with pytest.raises(DataTimeout) as stopped:
            _next_within(loader, 30)
    finally:
        loader.close()
    message = str(stopped.value)
    assert "no training batch came from loader worker 0 of rank 3 in 2 s (its first" in message
    assert "/sets/stalled" in message and "data.batch_timeout_s" in message and isinstance(stopped.value, UserError)


def test_a_slow_batch_is_waited_for_across_polls_and_a_stop_request_ends_the_wait_after_its_grace():
    stop = [False]
    loader = TrainLoader(_Stalled(batches=2, delay_s=1.0), num_workers=1,
                         wait=DataWait(timeout_s=60, poll_s=0.1, stop_requested=lambda: stop[0], stop_grace_s=1.5))
    try:
        epoch, first = _next_within(loader, 30)  # about 10 polls came back empty first
        assert first["i"] == 0 and epoch == 0
        stop[0] = True  # asked to stop while the next batch is on its way: it still comes within the grace
        assert _next_within(loader, 30)[1]["i"] == 1
        start = time.monotonic()
        with pytest.raises(StopWhileWaiting):
            _next_within(loader, 30)  # nothing more comes: the grace bounds the wait
        assert 1.5 <= time.monotonic() - start < 10
    finally:
        start = time.monotonic()
        loader.close()
        assert time.monotonic() - start < 20  # the stalled worker is ended, not waited for


def test_the_worker_process_is_gone_after_close():
    loader = TrainLoader(_Stalled(batches=1), num_workers=1, wait=DataWait(timeout_s=60, poll_s=0.1))
    next(loader)
    workers = list(loader._batches._workers)  # noqa: SLF001 - the DataLoader's processes, to see them gone
    loader.close()
    assert workers and not any(w.is_alive() for w in workers)

"""Issue 26: a shard file emptied (0 bytes) or cut shorter after the stream started, or after a stream state was
saved, is counted as a cut-off tar (BAD_KINDS truncated_tar) and skipped, like one cut before the run: never an
exception out of the stream. Every shard emptied ends the stream with one line (TooManyBadSamples), not a
RuntimeError's traceback."""
from __future__ import annotations

import os
import shutil

import pytest

from trainer.data.samples import BAD_KINDS, BadSampleCounter, TooManyBadSamples
from trainer.data.shardset import ShardSet
from trainer.data.stream import StreamSettings, TrainStream

TRUNCATED = BAD_KINDS.index("truncated_tar")


def _raw(root, counter, resampled=False, shuffle_buffer=1):
    stream = TrainStream(ShardSet.open(root), "train", StreamSettings(
        batch_size=2, image_size=32, max_words=32, shuffle_buffer=shuffle_buffer, resampled=resampled, seed=0),
        rank=0, world_size=1)
    return stream.raw_stream(0, 1, counter, False, 0)


@pytest.fixture
def copy(tiny_shards, tmp_path):
    return shutil.copytree(tiny_shards, tmp_path / "set")


@pytest.mark.parametrize("cut", ["zero_bytes", "half", "current_zero_bytes"])
def test_a_shard_emptied_or_cut_while_the_stream_reads_is_counted_and_skipped(copy, cut):
    """One pass of 6 shards of 16: after the first sample, the shards are damaged; the rest is read on."""
    counter = BadSampleCounter()
    raw = _raw(copy, counter)
    samples = raw.samples()
    next(samples)
    urls = raw.set_urls[0]
    current = urls[raw.cursors[0].url]
    damaged = [current] if cut == "current_zero_bytes" else [u for u in urls if u != current][:2]
    for url in damaged:
        os.truncate(url, 0 if cut.endswith("zero_bytes") else os.path.getsize(url) // 2)
    rest = list(samples)  # no exception
    assert counter.by_kind[TRUNCATED] == len(damaged), counter.by_kind
    assert sum(counter.by_kind) == counter.by_kind[TRUNCATED]
    # every other shard read whole; the damaged ones give what was read of them before the cut (the shard being
    # read: the samples already taken from it), the halves what lies before the cut
    assert 96 - 16 * len(damaged) <= len(rest) + 1 < 96, len(rest)


def test_a_shard_emptied_after_a_state_was_saved_is_counted_at_restore(copy):
    counter = BadSampleCounter()
    raw = _raw(copy, counter, shuffle_buffer=8)
    samples = raw.samples()
    for _ in range(4):
        next(samples)
    state = raw.state()
    buffered = {raw.set_urls[0][ref.url] for ref, _ in raw.buffer}
    for url in buffered | {raw.set_urls[0][raw.cursors[0].url]}:
        os.truncate(url, 0)
    resumed_counter = BadSampleCounter()
    resumed = _raw(copy, resumed_counter, shuffle_buffer=8)
    resumed.restore(state)  # no exception: the emptied shards' buffered samples are dropped and counted
    rest = list(resumed.samples())
    assert resumed_counter.by_kind[TRUNCATED] >= 1
    assert sum(resumed_counter.by_kind) == resumed_counter.by_kind[TRUNCATED]
    assert rest  # the shards not emptied are still read


def test_every_shard_emptied_ends_an_endless_stream_with_one_line(copy):
    counter = BadSampleCounter()
    raw = _raw(copy, counter, resampled=True)
    samples = raw.samples()
    next(samples)
    for url in raw.set_urls[0]:
        os.truncate(url, 0)
    with pytest.raises(TooManyBadSamples, match="every shard is empty or unreadable; check the set"):
        for _ in range(10_000):
            next(samples)
    assert counter.by_kind[TRUNCATED] > 0

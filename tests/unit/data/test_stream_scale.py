"""The training stream at scale (issue 13): one loader for the run, epochs as a count, the shuffle buffer filled
once, a global epoch size, exact resume whose cost is bounded by the buffer plus one shard per worker."""
import os

import pytest
import torch

from trainer.data.loader import TrainLoader
from trainer.data.shardset import ShardSet
from trainer.data.stream import StreamSettings, TrainStream


def _stream(shardset, rank=0, world_size=1, mix=(), **kw):
    args = dict(batch_size=8, image_size=32, max_words=16, shuffle_buffer=32, resampled=True, epoch_samples=16,
                seed=0)
    args.update(kw)
    return TrainStream(shardset, "train", StreamSettings(**args), rank=rank, world_size=world_size, mix=mix)


def _resumed(stream, num_workers, state):
    loader = TrainLoader(stream, num_workers)
    loader.load_state_dict(state)
    return loader


def _take(batches, n):
    return [(epoch, batch) for _, (epoch, batch) in zip(range(n), batches)]


@pytest.mark.parametrize("resampled", [True, False])
def test_workers_start_once_for_the_whole_run_across_epochs(tiny_shards, resampled):
    stream = _stream(ShardSet.open(tiny_shards), resampled=resampled, batch_size=4)
    batches = TrainLoader(stream, num_workers=2)
    got = _take(batches, 4 * stream.epoch_batches)
    assert [e for e, _ in got][-1] == 3  # four epochs
    assert batches.worker_starts == 2  # one start per worker, not one per epoch
    resumed = _resumed(_stream(ShardSet.open(tiny_shards), resampled=resampled, batch_size=4), 2,
                       batches.state_dict())
    _take(resumed, 2 * stream.epoch_batches)
    assert resumed.worker_starts == 2  # and once more on resume
    batches.close(), resumed.close()


def test_the_shuffle_buffer_is_filled_once_not_at_every_epoch(tiny_shards):
    """Raw samples read per epoch: the buffer (32) + the epoch's 16 in the first, exactly 16 after."""
    stream = _stream(ShardSet.open(tiny_shards))
    got = _take(TrainLoader(stream, num_workers=0), 8)
    read = {}
    for epoch, batch in got:
        read[epoch] = read.get(epoch, 0) + int(batch["raw_read"])
    assert read == {0: 32 + 16, 1: 16, 2: 16, 3: 16}
    assert sum(int(b["n_bad"]) for _, b in got) == 0


def test_epoch_size_is_global_whatever_the_world_size(tiny_shards):
    shardset = ShardSet.open(tiny_shards)
    for world in (1, 2, 4, 8):
        stream = _stream(shardset, epoch_samples=64, world_size=world, rank=world - 1)
        assert stream.epoch_batches * stream.batch_size * world == 64
        epochs = [e for e, _ in _take(TrainLoader(stream, num_workers=0), 2 * stream.epoch_batches)]
        assert epochs == [0] * stream.epoch_batches + [1] * stream.epoch_batches
    # not a multiple: rounded up to whole global batches
    assert _stream(shardset, epoch_samples=100, world_size=4).epoch_batches == 4


def _buffer_bytes(state: dict) -> int:
    return sum(length for worker in state["workers"] if worker for *_, length in worker["buffer"])


@pytest.mark.parametrize("resampled", [True, False])
def test_resume_is_exact_and_costs_the_buffer_plus_at_most_a_shard_per_worker(tiny_shards, resampled):
    shardset = ShardSet.open(tiny_shards)
    largest_shard = max(os.path.getsize(u) for u in shardset.urls("train"))

    def stream():
        return _stream(shardset, resampled=resampled, world_size=2, rank=1, epoch_samples=48)

    whole = TrainLoader(stream(), num_workers=2)
    reference = [(e, b["image_ids"].tolist()) for e, b in _take(whole, 14)]
    whole.close()
    costs = []
    for stop in (3, 10):  # the cost does not grow with the run's length
        first = TrainLoader(stream(), num_workers=2)
        assert [(e, b["image_ids"].tolist()) for e, b in _take(first, stop)] == reference[:stop]
        state = first.state_dict()
        first.close()
        torch.save(state, "/dev/null")  # plain values: what the checkpoint holds
        resumed = _resumed(stream(), 2, state)
        assert [(e, b["image_ids"].tolist()) for e, b in _take(resumed, 14 - stop)] == reference[stop:]
        cost = resumed.resume_cost
        resumed.close()
        assert cost["workers"] == 2 and cost["seconds"] >= 0
        assert _buffer_bytes(state) <= cost["bytes"] <= _buffer_bytes(state) + 2 * largest_shard
        costs.append(cost["bytes"])
    assert costs[1] <= 1.5 * costs[0]  # after 10 batches about what it was after 3: the buffers' bytes


def test_a_position_of_another_worker_count_is_refused(tiny_shards):
    shardset = ShardSet.open(tiny_shards)
    first = TrainLoader(_stream(shardset), num_workers=0)
    _take(first, 3)
    with pytest.raises(ValueError, match="1 workers per rank, this run has 2"):
        TrainLoader(_stream(shardset), num_workers=2).load_state_dict(first.state_dict())
    with pytest.raises(RuntimeError, match="already handed out"):  # the workers started from another position
        first.load_state_dict(first.state_dict())


def test_mixed_corpora_resume_exactly(tiny_shards, uneven_shards):
    """Two shard sets streamed by sample weight continue exactly too (the per-sample set draw is in the state)."""
    first_set = ShardSet.open(tiny_shards)
    other = ShardSet.open(uneven_shards)
    other.concepts, other.vocab = first_set.concepts, first_set.vocab  # same vocabularies for this test

    def stream():
        return _stream(first_set, mix=[(first_set, 0.5), (other, 0.5)])

    reference = [b["image_ids"].tolist() for _, b in _take(TrainLoader(stream(), num_workers=0), 9)]
    first = TrainLoader(stream(), num_workers=0)
    _take(first, 4)
    resumed = _resumed(stream(), 0, first.state_dict())
    assert [b["image_ids"].tolist() for _, b in _take(resumed, 5)] == reference[4:]

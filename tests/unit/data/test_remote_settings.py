"""The data.shard_* keys reach the training stream, an unreachable shard is counted as its own kind, and a checkpoint
written before that kind existed still restores its bad-sample totals."""
from pathlib import Path

from shards.remote import RemoteReads, ShardUnreachableError
from trainer.config import load_config
from trainer.data.samples import BAD_KINDS, BadSampleCounter, bad_kind
from trainer.data.shardset import ShardSet
from trainer.training.factory import build_train_stream
from trainer.training.loop import restored_state

REPO = Path(__file__).resolve().parents[3]


def test_the_shard_read_keys_reach_the_stream(tiny_shards, tmp_path):
    cfg = load_config(REPO / "configs" / "builtin.yaml", [
        f"data.shards={tiny_shards}", f"run.out_dir={tmp_path / 'run'}", "data.shard_retries=1",
        "data.shard_timeout=7", "data.shard_block_mb=2"])
    stream = build_train_stream(cfg, ShardSet.open(tiny_shards), rank=0, world_size=1)
    assert stream.settings.reads == RemoteReads(block_size=2 * 2**20, timeout=7, retries=1)
    assert stream.raw_stream(0, 1, BadSampleCounter(), endless=True, start_epoch=0).reads == stream.settings.reads


def test_an_unreachable_shard_is_counted_as_its_own_kind():
    assert bad_kind(ShardUnreachableError("http://127.0.0.1:9/a.tar: connection refused")) == "unreachable_shard"
    assert bad_kind(EOFError("cut off")) == "truncated_tar"


def test_a_checkpoint_from_before_a_new_kind_restores_its_totals():
    old_totals = list(range(1, len(BAD_KINDS)))  # one kind fewer than now: written before unreachable_shard
    saved = {"run_state": {"step": 3, "bad_totals": old_totals, "set_samples": [5]}, "data_positions": [[0, 3]]}
    state = restored_state(saved, rank=0, world=1, num_sets=1)
    assert state.bad_totals == old_totals + [0]

"""The training stream and loader on small built shard sets: batches, splits across ranks and workers, epochs."""
import io
import json
import shutil
import tarfile

import pytest
import torch

from trainer.data.eval_samples import iter_eval_samples
from trainer.data.loader import TrainLoader
from trainer.data.shardset import ShardSet, check_shards_for_workers, image_id_hash
from trainer.data.stream import StreamSettings, TrainStream


def _stream(shardset, rank=0, world_size=1, **kw):
    args = dict(batch_size=8, image_size=64, max_words=32, shuffle_buffer=50, resampled=True,
                batches_per_worker=3, seed=0)
    args.update(kw)
    return TrainStream(shardset, "train", StreamSettings(**args), rank=rank, world_size=world_size)


def _samples_by_hash(shardset, split):
    return {image_id_hash(s["image_id"]): s for s in _raw_samples(shardset, split)}


def _raw_samples(shardset, split):
    for url in shardset.urls(split):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    yield json.loads(tar.extractfile(member).read())


def test_batches_carry_a_caption_of_their_picture_with_its_labels(tiny_shards):
    shardset = ShardSet.open(tiny_shards)
    by_hash = _samples_by_hash(shardset, "train")
    batches = list(_stream(shardset))
    assert len(batches) == 3 and all("images" in b for b in batches)  # exactly batches_per_worker per virtual epoch
    for batch in batches:
        assert batch["images"].shape == (8, 3, 64, 64) and batch["images"].dtype == torch.float32
        assert batch["tokens"].shape[0] == 8 and batch["tokens"].shape[1] == int(batch["lengths"].max())
        for row in range(8):
            meta = by_hash[int(batch["image_ids"][row])]
            tokens = batch["tokens"][row, : batch["lengths"][row]].tolist()
            assert (batch["tokens"][row, batch["lengths"][row]:] == 0).all()
            picks = [i for i, c in enumerate(meta["captions"]) if shardset.vocab.encode(c, 32) == tokens]
            assert picks, "the tokens are not one of the picture's own captions"
            caption_ids = torch.nonzero(batch["caption_concepts"][row]).flatten().tolist()
            assert caption_ids in [sorted(meta["caption_concepts"][i]) for i in picks]
            assert torch.nonzero(batch["image_concepts"][row]).flatten().tolist() == sorted(meta["image_concepts"])
        assert int(batch["n_bad"]) == 0


def test_stream_is_deterministic_per_seed_and_epoch(tiny_shards):
    shardset = ShardSet.open(tiny_shards)
    ids = lambda s: [b["image_ids"].tolist() for b in s]  # noqa: E731
    first, again = _stream(shardset), _stream(shardset)
    assert ids(first) == ids(again)
    other_epoch = _stream(shardset)
    other_epoch.set_epoch(1)
    assert ids(other_epoch) != ids(first)
    other_rank = _stream(shardset, rank=1, world_size=2)
    assert ids(other_rank) != ids(first)


def test_one_pass_splits_disjointly_across_ranks_and_workers(tiny_shards):
    shardset = ShardSet.open(tiny_shards)
    seen = []
    for rank in range(2):
        stream = _stream(shardset, resampled=False, batches_per_worker=10**6, rank=rank, world_size=2, batch_size=4)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        seen.append([i for b in loader for i in b["image_ids"].tolist()])
    all_ids = set(_samples_by_hash(shardset, "train"))
    assert len(seen[0]) == len(set(seen[0])) == 48 and len(seen[1]) == len(set(seen[1])) == 48
    assert set(seen[0]).isdisjoint(seen[1])
    assert set(seen[0]) | set(seen[1]) == all_ids


def test_the_loader_moves_through_epochs(tiny_shards):
    shardset = ShardSet.open(tiny_shards)
    stream = _stream(shardset, epoch_samples=16)  # 2 batches of 8 per epoch on one rank
    epochs = [e for _, (e, _) in zip(range(5), TrainLoader(stream, num_workers=0))]
    assert epochs == [0, 0, 1, 1, 2]


def _bad_copy(tiny_shards, tmp_path):
    """The tiny set with one more train shard holding one good and five broken samples."""
    root = tmp_path / "bad"
    shutil.copytree(tiny_shards, root)
    good_url = ShardSet.open(root).urls("train")[0]
    with tarfile.open(good_url) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    good_json = next(v for k, v in members.items() if k.endswith(".json"))
    meta = json.loads(good_json)
    png = members[f"{meta['image_id']}.png"]
    out_of_range = dict(meta, image_concepts=[10**6])
    broken = {
        "good.png": png, "good.json": json.dumps(dict(meta, image_id="good")).encode(),
        "badpng.png": b"\x89PNG not really", "badpng.json": json.dumps(dict(meta, image_id="badpng")).encode(),
        "badjson.png": png, "badjson.json": b"{not json",
        "badids.png": png, "badids.json": json.dumps(out_of_range).encode(),
        "nocaps.png": png, "nocaps.json": json.dumps(dict(meta, captions=[], caption_concepts=[])).encode(),
        "nojson.png": png,
    }
    with tarfile.open(root / "builtin-train-bad.tar", "w") as tar:
        for name, data in broken.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"] = ["builtin-train-bad.tar"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_bad_samples_are_skipped_and_counted(tiny_shards, tmp_path):
    shardset = ShardSet.open(_bad_copy(tiny_shards, tmp_path))
    stream = _stream(shardset, resampled=False, batch_size=1, batches_per_worker=10)
    items = list(stream)
    batches = [b for b in items if "images" in b]
    assert len(batches) == 1  # only the good sample survives
    batches = items
    assert sum(int(b["n_bad"]) for b in batches) == 5
    assert sum(int(b["n_read"]) for b in batches) == 6


def test_too_few_shards_for_ranks_and_workers_is_refused():
    with pytest.raises(ValueError, match="has 3 shards but 2 ranks x 2 workers need at least 4"):
        check_shards_for_workers(3, world_size=2, num_workers=2, split="train")
    check_shards_for_workers(4, world_size=2, num_workers=2, split="train")


def test_eval_samples_cover_the_split_in_order(tiny_shards):
    shardset = ShardSet.open(tiny_shards)
    samples = list(iter_eval_samples(shardset, "test", image_size=64, max_words=32))
    raw = list(_raw_samples(shardset, "test"))
    assert [s["image_id"] for s in samples] == [r["image_id"] for r in raw]
    assert all(s["captions"] == r["captions"] and len(s["tokens"]) == len(r["captions"]) for s, r in zip(samples, raw))
    halves = [list(iter_eval_samples(shardset, "test", 64, 32, rank=r, world_size=2)) for r in range(2)]
    assert sorted(s["image_id"] for h in halves for s in h) == sorted(r["image_id"] for r in raw)

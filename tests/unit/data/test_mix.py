"""Pretraining on several corpora: shard sets built against one vocabulary, streamed together by weight."""
import json
from pathlib import Path

import pytest
import torch
from conftest import build_builtin
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.config import ConfigError, load_config
from trainer.data.shardset import ShardSet, image_id_hash, mix_sets
from trainer.data.stream import StreamSettings, TrainStream
from trainer.observe.tblog import event_dir
from trainer.training.loop import train

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def second_corpus(tiny_shards, tmp_path_factory) -> Path:
    """Other pictures (another seed), labelled with the vocabularies of tiny_shards."""
    return build_builtin(tmp_path_factory.mktemp("mix") / "other", 64, 16, 16, 16, "--seed", "7",
                         "--vocab-from", str(tiny_shards))


def _stream(shardset, mix, batch_size=16, batches=24):
    settings = StreamSettings(batch_size=batch_size, image_size=32, max_words=16, shuffle_buffer=64, resampled=True,
                              batches_per_worker=batches, seed=3)
    return TrainStream(shardset, "train", settings, rank=0, world_size=1, mix=mix)


def test_mixed_stream_draws_each_set_by_its_weight_and_keeps_their_pictures_apart(tiny_shards, second_corpus):
    first = ShardSet.open(tiny_shards)
    mix = mix_sets(first, [str(second_corpus)], [3.0, 1.0], "train")
    assert [round(w, 3) for _, w in mix] == [0.75, 0.25]
    batches = list(_stream(first, mix))
    counts = torch.stack([b["set_counts"] for b in batches if "set_counts" in b]).sum(0)
    assert int(counts.sum()) == 24 * 16
    share = counts[0].item() / counts.sum().item()
    assert 0.68 < share < 0.82, counts  # 384 draws at p=0.75: 3.5 standard deviations either side

    # ids are hashed per set, so equal ids in two corpora stay different pictures for the loss
    ids_first = {image_id_hash(f"0:{e}") for e in _image_ids(tiny_shards)}
    ids_second = {image_id_hash(f"1:{e}") for e in _image_ids(second_corpus)}
    seen = {int(i) for b in batches if "image_ids" in b for i in b["image_ids"]}
    assert seen <= ids_first | ids_second and seen & ids_first and seen & ids_second


def test_default_weights_follow_the_train_split_sizes(tiny_shards, second_corpus):
    mix = mix_sets(ShardSet.open(tiny_shards), [str(second_corpus)], [], "train")
    assert [round(w, 3) for _, w in mix] == [96 / 160, 64 / 160]
    assert mix_sets(ShardSet.open(tiny_shards), [], [], "train") == []


def test_a_set_with_other_vocabularies_is_refused(tiny_shards, tmp_path):
    other = build_builtin(tmp_path / "own_vocab", 32, 8, 8, 16, "--seed", "9")
    with pytest.raises(ValueError, match=r"concepts.json.*--vocab-from"):
        mix_sets(ShardSet.open(tiny_shards), [str(other)], [], "train")


@pytest.mark.parametrize("overrides, key", [
    (["data.mix_shards=[X]", "data.resampled=false"], "data.mix_shards"),
    (["data.mix_shards=[X]", "data.mix_weights=[1.0]"], "data.mix_weights"),
    (["data.mix_shards=[X]", "data.mix_weights=[1.0, -1.0]"], "data.mix_weights"),
])
def test_bad_mix_configs_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides, check_paths=False)


def test_a_missing_mix_set_is_refused_before_work(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"data.mix_shards\[0\]"):
        load_config(REPO / "configs" / "builtin.yaml", [f"data.shards={tiny_shards}",
                                                        f"data.mix_shards=[{tmp_path / 'nothing'}]"])


@pytest.mark.slow  # a DeepSpeed training run
def test_training_on_a_mix_logs_what_each_set_contributed(tiny_shards, second_corpus, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "builtin.yaml", [
        f"data.shards={tiny_shards}", f"data.mix_shards=[{second_corpus}]", "data.mix_weights=[1.0, 1.0]",
        f"run.out_dir={out}", "data.num_workers=1", "data.shuffle_buffer=64", "data.batch_size=16",
        "data.image_size=32", "model.embed_dim=16", "model.cnn_width=8", "model.gru_hidden=16", "model.word_dim=8",
        "train.steps=4", "train.log_every=2", "train.eval_every=0", "train.ckpt_every=0",
        f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero0.json'}", "engine.threads=1"])
    train(cfg)
    events = EventAccumulator(str(event_dir(out / "tb"))).Reload()
    names = [tiny_shards.name, second_corpus.name]
    final = {name: events.Scalars(f"data/samples/{name}")[-1] for name in names}
    assert all(e.step == 4 for e in final.values())
    assert sum(e.value for e in final.values()) == 4 * 16
    assert all(e.value > 0 for e in final.values())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sum(log[-1][f"data/samples/{name}"] for name in names) == 4 * 16


def _image_ids(root: Path) -> list[str]:
    import webdataset as wds
    shardset = ShardSet.open(root)
    return [json.loads(s["json"])["image_id"] for s in wds.tarfile_to_samples()(
        [{"url": u} for u in shardset.urls("train")])]

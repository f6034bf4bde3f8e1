"""Tests of trainer.config: defaults, YAML files and overrides, base-file chains, the refusals that name their key,
saved configs, and the DeepSpeed batch sizes and warmup-cosine schedule built from a config."""
import json
from pathlib import Path

import pytest

from trainer.config import ConfigError, load_config, save_config
from trainer.engine.build import deepspeed_config, warmup_cosine

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def shard_dir(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    splits = {s: {"images": 10, "captions": 50, "shards": []} for s in ("train", "val", "test")}
    (root / "manifest.json").write_text(json.dumps({"format": "hier-shards", "splits": splits}))
    return root


def _load(shard_dir, *overrides, path=REPO / "configs" / "builtin.yaml"):
    return load_config(path, [f"data.shards={shard_dir}",
                              f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero0.json'}", *overrides])


def test_defaults_yaml_and_overrides(shard_dir):
    cfg = _load(shard_dir, "train.steps=7", "loss.labels=shuffled", "optim.betas=[0.8, 0.9]", "optim.lr=1e-3")
    assert cfg.train.steps == 7
    assert cfg.loss.labels == "shuffled"
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.optim.lr == 1e-3
    assert cfg.data.batch_size == 128  # from configs/builtin.yaml
    assert cfg.model.cnn_width == 64  # a default not in the YAML
    assert isinstance(cfg.loss.margin, float)


@pytest.mark.parametrize("override, key", [
    ("model.embd_dim=3", "model.embd_dim: unknown key"),
    ("trian.steps=3", "trian: unknown key"),
    ("train.steps=ten", "train.steps: expected an integer"),
    ("train.steps=2.5", "train.steps: expected an integer"),
    ("data.resampled=maybe", "data.resampled: expected true or false"),
    ("loss.labels=random", "loss.labels: 'random' is not one of"),
    ("data.batch_size=0", "data.batch_size: must be at least 2"),
    ("optim.lr=-1", "optim.lr: must be positive"),
    ("loss.temperature=0", "loss.temperature: must be positive"),
    ("data.image_size=30", "data.image_size: must be a positive multiple of 8"),
    ("optim.betas=[0.9]", "optim.betas: must be two numbers"),
    ("train.steps", "expected section.key=value"),
    ("data.test_split=nosuch", "data.test_split: split 'nosuch' not in"),
])
def test_refusals_name_the_key(shard_dir, override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        _load(shard_dir, override)


def test_missing_shard_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data.shards: .*nowhere is not a shard set"):
        load_config(REPO / "configs" / "builtin.yaml", [f"data.shards={tmp_path / 'nowhere'}"])


def test_concept_bce_needs_labels(shard_dir):
    with pytest.raises(ConfigError, match="loss.concept_bce_weight"):
        _load(shard_dir, "loss.concept_bce_weight=0.5", "loss.labels=none")


@pytest.mark.parametrize("overrides, key", [
    (("loss.global_label_margin=true", "loss.labels=none", "loss.global_loss=hinge"),
     "loss.global_label_margin: needs labels"),
    (("loss.global_exclude_above=1.0", "loss.labels=none"), "loss.global_exclude_above: needs labels"),
    (("loss.global_exclude_above=0",), "loss.global_exclude_above: must be null or in"),
    (("loss.global_label_margin=true", "loss.global_loss=infonce"), "loss.global_label_margin: scales"),
    (("loss.global_loss=softmax",), "loss.global_loss: 'softmax' is not one of"),
    (("loss.global_temperature=0",), "loss.global_temperature: must be positive"),
    (("loss.global_hardest_temperature=0", "loss.global_loss=hinge"), "loss.global_hardest_temperature: must be"),
    (("loss.global_hardest_temperature=0.05",), "loss.global_hardest_temperature: softens the hinge"),
])
def test_global_label_options_are_checked(shard_dir, overrides, key):
    with pytest.raises(ConfigError, match=key):
        _load(shard_dir, *overrides)
    cfg = _load(shard_dir, "loss.global_exclude_above=1.0", "loss.global_label_margin=true", "loss.global_loss=hinge",
                "loss.global_hardest_temperature=0.05")
    assert cfg.loss.global_exclude_above == 1.0 and cfg.loss.global_hardest_temperature == 0.05


def test_unknown_key_in_yaml_file(tmp_path, shard_dir):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  embed_dim: 64\n  colour: red\n")
    with pytest.raises(ConfigError, match="model.colour: unknown key"):
        _load(shard_dir, path=path)


def test_base_files_chain_and_deep_merge(tmp_path, shard_dir):
    (tmp_path / "family").mkdir()
    (tmp_path / "family" / "root.yaml").write_text("model:\n  embed_dim: 64\n  word_dim: 32\ntrain:\n  steps: 5\n")
    (tmp_path / "family" / "middle.yaml").write_text("base: root.yaml\nmodel:\n  word_dim: 48\n")
    (tmp_path / "leaf.yaml").write_text("base: family/middle.yaml\ntrain:\n  log_every: 3\n")
    cfg = _load(shard_dir, "train.steps=9", path=tmp_path / "leaf.yaml")
    assert (cfg.model.embed_dim, cfg.model.word_dim) == (64, 48)  # root's key kept beside middle's override
    assert (cfg.train.steps, cfg.train.log_every) == (9, 3)  # the command line wins over every file


def test_base_cycles_and_unknown_keys_name_their_files(tmp_path, shard_dir):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        _load(shard_dir, path=tmp_path / "a.yaml")
    (tmp_path / "base.yaml").write_text("model:\n  colour: red\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"config file .*base\.yaml: model\.colour: unknown key"):
        _load(shard_dir, path=tmp_path / "child.yaml")
    (tmp_path / "lost.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml does not exist"):
        _load(shard_dir, path=tmp_path / "lost.yaml")


def test_recipes_inherit_their_family_base():
    for name in ("flickr30k_butd_bigru", "coco_butd_bigru", "coco_butd_bert"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml", check_paths=False)
        assert (cfg.model.image_encoder, cfg.model.embed_dim, cfg.optim.grad_clip) == ("regions", 1024, 2.0), name
        assert cfg.run.out_dir == f"runs/{name}"
    assert load_config(REPO / "configs" / "coco_butd_bert.yaml", check_paths=False).model.text_encoder == "hf"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_trains_into_its_own_folder(path):
    cfg = load_config(path, check_paths=False)
    assert cfg.run.out_dir == f"runs/{path.stem}", "a config's runs go to runs/<its name>"


def test_the_finetuning_config_starts_from_the_pretraining_export():
    pretrain = load_config(REPO / "configs" / "pretrain_union.yaml", check_paths=False)
    finetune = load_config(REPO / "configs" / "openmoji_finetune.yaml", check_paths=False)
    assert finetune.model.init_from == f"{pretrain.run.out_dir}/model.pt"
    assert finetune.model == pretrain.model.__class__(**{**vars(pretrain.model), "init_from": finetune.model.init_from})


def test_print_config_prints_the_resolved_tree_and_starts_nothing(capsys, tmp_path):
    from trainer.training.loop import main

    out = tmp_path / "never"
    assert main(["--config", str(REPO / "configs" / "coco_butd_bigru.yaml"), "--print-config",
                 f"run.out_dir={out}", "train.steps=3"]) == 0
    printed = load_config_text(capsys.readouterr().out, tmp_path)
    assert printed == load_config(REPO / "configs" / "coco_butd_bigru.yaml", [f"run.out_dir={out}", "train.steps=3"],
                                  check_paths=False)
    assert not out.exists()


def load_config_text(text: str, folder: Path):
    path = folder / "printed.yaml"
    path.write_text(text)
    return load_config(path, check_paths=False)


def test_saved_config_round_trips(tmp_path, shard_dir):
    cfg = _load(shard_dir, "train.steps=11", "run.resume=latest")
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_deepspeed_batch_sizes_must_agree(tmp_path, shard_dir):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 64, "zero_optimization": {"stage": 2}}))
    cfg = _load(shard_dir, f"engine.deepspeed_config={ds}", "data.batch_size=128")
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=64 but the YAML gives 128"):
        deepspeed_config(cfg, world_size=2)
    cfg = _load(shard_dir, f"engine.deepspeed_config={ds}", "data.batch_size=64", "engine.grad_accum=2",
                "engine.precision=bf16", "optim.grad_clip=0.5")
    filled = deepspeed_config(cfg, world_size=2)
    assert filled["train_batch_size"] == 64 * 2 * 2
    assert filled["gradient_accumulation_steps"] == 2
    assert filled["gradient_clipping"] == 0.5
    # bf16 is the model's autocast: DeepSpeed keeps fp32 parameters (the master weights) and fp32 gradients
    assert filled["bf16"] == {"enabled": False}
    ds.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="enables bf16; set engine.precision=bf16"):
        deepspeed_config(cfg, world_size=2)
    assert filled["zero_optimization"] == {"stage": 2}


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)

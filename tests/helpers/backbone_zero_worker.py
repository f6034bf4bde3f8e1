"""Worker for tests/unit/models/test_backbones.py: the pretrained EfficientNet-Lite0 encoder under DeepSpeed, one
process, gloo.

    python tests/helpers/backbone_zero_worker.py OUT.pt

For each ZeRO config it builds the model as the trainer does (build_model, then build_engine: the ImageNet
weights are loaded before deepspeed.initialize partitions them), and also builds the image encoder inside
`deepspeed.zero.Init` (parameters partitioned as they are created: the weights go in through GatheredParameters).
It records image embeddings, the gathered backbone weights, and the weights after optimizer steps with the
backbone frozen for the first step (optim.backbone_freeze_steps=1), then trained. The test compares them with
the same model built without DeepSpeed.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from worker_exit import leave  # noqa: E402 (tests/helpers is on the path by now)

from trainer.config import Config, load_config  # noqa: E402
from trainer.distributed import init_distributed, shutdown  # noqa: E402
from trainer.engine.build import backbone_lr, build_engine, deepspeed_config  # noqa: E402
from trainer.models.image_towers import EfficientNetLite0Grid  # noqa: E402
from trainer.training.factory import build_loss, build_model  # noqa: E402
from trainer.training.step import train_step  # noqa: E402

IMAGE_SIZE = 64
BATCH = 4
VOCAB_SIZE = 30
NUM_CONCEPTS = 5
ZERO_CONFIGS = ("zero0", "zero2", "zero3")


def make_config(zero: str) -> Config:
    return load_config(None, [
        f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / f'{zero}.json'}", "engine.precision=fp32",
        f"data.batch_size={BATCH}", f"data.image_size={IMAGE_SIZE}", "data.max_words=6",
        "model.image_encoder=efficientnet_lite0", "model.backbone_trainable=partial",
        "model.backbone_trainable_blocks=1", "model.embed_dim=16", "model.gru_hidden=16", "model.word_dim=8",
        "optim.lr=1e-3", "optim.backbone_lr_mult=1.0", "optim.backbone_freeze_steps=1", "optim.warmup_steps=0",
        "loss.hinge_warmup_steps=0", "run.seed=0"], check_paths=False)


def fixed_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 7, (BATCH,), generator=g)
    tokens = torch.randint(2, VOCAB_SIZE, (BATCH, 6), generator=g)
    tokens[torch.arange(6).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return {"images": torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), "tokens": tokens,
            "lengths": lengths, "image_ids": torch.arange(BATCH),
            "image_concepts": torch.zeros(BATCH, NUM_CONCEPTS), "caption_concepts": torch.zeros(BATCH, NUM_CONCEPTS)}


def gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    named = list(module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {name: p.detach().clone() for name, p in named}


def run(zero: str, info) -> dict:
    import deepspeed

    cfg = make_config(zero)
    ds_config = deepspeed_config(cfg, info.world_size)
    torch.manual_seed(0)
    model = build_model(cfg, SimpleNamespace(vocab=[None] * VOCAB_SIZE, num_concepts=NUM_CONCEPTS))
    engine = build_engine(cfg, model, ds_config)
    batch = fixed_batch()
    engine.module.eval()
    with torch.no_grad():
        img_g, img_l = engine.module.encode_image(batch["images"])
    engine.module.train()
    out = {"img_g": img_g, "img_l": img_l, "init": gathered(engine.module.image_encoder.backbone)}
    loss_fn = build_loss(cfg)
    out["backbone_lr_at_start"] = backbone_lr(engine)
    for step in range(2):  # step 0 frozen, step 1 trained (as trainer.train's loop sets it)
        engine.module.set_backbone_grad(step >= cfg.optim.backbone_freeze_steps)
        train_step(engine, loss_fn, batch, step, info)
        out[f"backbone_lr_after_step{step}"] = backbone_lr(engine)
        out[f"after_step{step}"] = gathered(engine.module.image_encoder.backbone)
        out[f"heads_after_step{step}"] = gathered(engine.module.image_global)

    if zero == "zero3":  # parameters partitioned at construction, weights loaded through GatheredParameters
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            encoder = EfficientNetLite0Grid(IMAGE_SIZE, trainable="full")
        assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in encoder.parameters()), "not partitioned"
        out["zero_init_weights"] = gathered(encoder.backbone)
        with deepspeed.zero.GatheredParameters(list(encoder.parameters())), torch.no_grad():
            out["zero_init_parts"] = encoder.eval()(batch["images"])
    return out


def main(out_path: str) -> int:
    info = init_distributed()
    torch.set_num_threads(1)
    try:
        torch.save({zero: run(zero, info) for zero in ZERO_CONFIGS}, out_path)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    leave(main(sys.argv[1]))  # results saved, group destroyed: see worker_exit

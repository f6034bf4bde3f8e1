"""One place that turns a config into the run's parts: model, loss, tokenizer and training stream.

Every entry point builds through here (train, evaluate, retrieve, export, plan, extract_features, the
benchmarks), so a new model option is wired once and cannot drift between copies.

    from trainer.training.factory import build_model, build_loss, build_train_stream
    model = build_model(cfg, shardset)           # pretrained weights loaded, before DeepSpeed partitions anything
    loss_fn = build_loss(cfg)
"""
from __future__ import annotations

import torch

from trainer.config import Config, ConfigError
from trainer.data.decode import RegionSpec
from trainer.data.pictures import RandomCrop
from trainer.data.shardset import ShardSet
from trainer.data.stream import StreamSettings, TrainStream
from trainer.data.text import CaptionTokenizer, Vocab
from trainer.loss.hierarchical import HierarchicalLoss
from trainer.models.configs import EmbedderConfig, ImageTowerConfig, TextTowerConfig
from trainer.models.embedder import HierarchicalEmbedder
from trainer.models.image_towers import build_image_tower
from trainer.models.text_encoders import build_text_tower, caption_tokenizer


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    """The encoders' autocast dtype: bf16 compute over fp32 master weights, or None (plain fp32)."""
    return torch.bfloat16 if cfg.engine.precision == "bf16" else None


def build_model(cfg: Config, shardset) -> HierarchicalEmbedder:
    """The model as configured: each tower from its own typed config, the heads from the embedder's
    (trainer.models.configs). `shardset` needs only `.vocab` and `.num_concepts` (a ShardSet, or a stand-in when
    the shards are not at hand, as trainer.plan's)."""
    # The image tower first, then the text tower, then the heads: the order a seed has always initialised them in.
    image_tower = build_image_tower(ImageTowerConfig.from_config(cfg))
    text_tower = build_text_tower(TextTowerConfig.from_config(cfg, len(shardset.vocab)), shardset.vocab)
    return HierarchicalEmbedder(EmbedderConfig.from_config(cfg, shardset.num_concepts), image_tower, text_tower,
                                autocast_dtype(cfg))


def check_compile_backend(backend: str) -> None:
    """engine.compile_backend names a backend torch.compile knows: an unknown one would pass until the first
    step, which would then end in torch's traceback."""
    import torch._dynamo  # noqa: PLC0415 - torch's compiler stack, loaded only for engine.compile=true

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"engine.compile_backend: {backend!r} is not a torch.compile backend; choose one of "
                          f"{', '.join(b for b in known if 'TESTING' not in b)} (inductor on GPUs, eager anywhere)")


def compile_encoders(model: HierarchicalEmbedder, backend: str) -> None:
    """engine.compile: torch.compile the image and text encoders in place (parameter names and the state dict
    stay as they are, so checkpoints do not depend on it). The heads, pooling and loss stay eager: they are
    small, and GPO's per-length table is data-dependent indexing that would recompile for new lengths."""
    for encoder in (model.image_encoder, model.text_encoder):
        encoder.compile(backend=backend, dynamic=True)


def build_loss(cfg: Config) -> HierarchicalLoss:
    """The loss of the config's loss section; run.seed drives the shuffled-label control."""
    return HierarchicalLoss(cfg.loss, seed=cfg.run.seed)


def build_tokenizer(cfg: Config, vocab: Vocab) -> CaptionTokenizer:
    """The caption tokenizer that matches the configured text encoder (words for the GRU, the folder's own for a
    transformer)."""
    return caption_tokenizer(cfg, vocab)


def build_train_stream(cfg: Config, shardset: ShardSet, *, rank: int, world_size: int,
                       mix: list | None = None, num_workers: int | None = None) -> TrainStream:
    """This rank's training stream as configured. The epoch is a global number of samples (data.samples_per_epoch,
    default the training split's pictures), whatever the world size; TrainLoader reads the stream for the whole
    run. num_workers: kept for callers that size a loader here (the stream itself does not depend on it)."""
    d = cfg.data
    settings = StreamSettings(batch_size=d.batch_size, image_size=d.image_size, max_words=d.max_words,
                              shuffle_buffer=d.shuffle_buffer, resampled=d.resampled, seed=cfg.run.seed,
                              epoch_samples=d.samples_per_epoch, max_image_pixels=d.max_image_pixels,
                              crop=RandomCrop(d.random_crop_min_area) if d.random_crop else None,
                              reads=d.remote_reads())
    return TrainStream(shardset, d.train_split, settings, rank=rank, world_size=world_size,
                       tokenizer=build_tokenizer(cfg, shardset.vocab), regions=RegionSpec.from_config(cfg),
                       mix=mix or [])

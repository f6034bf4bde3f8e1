"""One place that turns a config into the run's parts: model, loss, tokenizer and training stream.

Every entry point builds through here (train, evaluate, retrieve, export, plan, extract_features, the
benchmarks), so a new model option is wired once and cannot drift between copies.

    from trainer.training.factory import build_model, build_loss, build_train_stream
    model = build_model(cfg, shardset)           # pretrained weights loaded, before DeepSpeed partitions anything
    loss_fn = build_loss(cfg)
"""
from __future__ import annotations

import torch

from trainer.config import Config
from trainer.data.shardset import ShardSet
from trainer.data.decode import RegionSpec
from trainer.data.stream import StreamSettings, TrainStream
from trainer.loss.hierarchical import HierarchicalLoss
from trainer.models.embedder import HierarchicalEmbedder
from trainer.data.pictures import RandomCrop
from trainer.data.text import CaptionTokenizer, Vocab
from trainer.models.text_encoders import caption_tokenizer, init_word_embeddings, pretrained_text_encoder


def image_encoder_options(cfg: Config) -> dict:
    """The chosen image encoder's own settings from the model section."""
    m = cfg.model
    if m.image_encoder == "regions":
        return {"region_dim": m.region_dim, "max_regions": m.max_regions, "region_dropout": m.region_dropout}
    if m.image_encoder == "efficientnet_lite0":
        return {"trainable": m.backbone_trainable, "trainable_blocks": m.backbone_trainable_blocks,
                "weights": m.backbone_weights}
    return {}


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    """The encoders' autocast dtype: bf16 compute over fp32 master weights, or None (plain fp32)."""
    return torch.bfloat16 if cfg.engine.precision == "bf16" else None


def build_model(cfg: Config, shardset) -> HierarchicalEmbedder:
    """The model as configured. `shardset` needs only `.vocab` and `.num_concepts` (a ShardSet, or a stand-in
    when the shards are not at hand, as trainer.plan's)."""
    m = cfg.model
    model = HierarchicalEmbedder(
        vocab_size=len(shardset.vocab), num_concepts=shardset.num_concepts, embed_dim=m.embed_dim,
        image_encoder=m.image_encoder, cnn_width=m.cnn_width, image_size=cfg.data.image_size,
        word_dim=m.word_dim, gru_hidden=m.gru_hidden, gru_layers=m.gru_layers, max_words=cfg.data.max_words,
        pooling=m.pooling, local_space=cfg.loss.local != "none", local_score_weight=m.local_score_weight,
        concept_head=cfg.loss.concept_bce_weight > 0,
        text_encoder=pretrained_text_encoder(cfg), image_encoder_options=image_encoder_options(cfg),
        autocast_dtype=autocast_dtype(cfg))
    if m.word_vectors is not None:
        init_word_embeddings(model.text_encoder.embed, shardset.vocab, m.word_vectors)
    return model



def compile_encoders(model: HierarchicalEmbedder, backend: str) -> None:
    """engine.compile: torch.compile the image and text encoders in place (parameter names and the state dict
    stay as they are, so checkpoints do not depend on it). The heads, pooling and loss stay eager: they are
    small, and GPO's per-length table is data-dependent indexing that would recompile for new lengths."""
    for encoder in (model.image_encoder, model.text_encoder):
        encoder.compile(backend=backend, dynamic=True)


def build_loss(cfg: Config) -> HierarchicalLoss:
    lo = cfg.loss
    return HierarchicalLoss(margin=lo.margin, warmup_steps=lo.warmup_steps, local=lo.local,
                            local_weight=lo.local_weight, temperature=lo.temperature, local_margin=lo.local_margin,
                            concept_bce_weight=lo.concept_bce_weight, labels=lo.labels, seed=cfg.run.seed,
                            label_mass=lo.label_mass, global_loss=lo.global_loss,
                            global_temperature=lo.global_temperature, global_label_margin=lo.global_label_margin,
                            global_exclude_above=lo.global_exclude_above)


def build_tokenizer(cfg: Config, vocab: Vocab) -> CaptionTokenizer:
    """The caption tokenizer that matches the configured text encoder (words for the GRU, the folder's own for a transformer)."""
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
                              crop=RandomCrop(d.random_crop_min_area) if d.random_crop else None)
    return TrainStream(shardset, d.train_split, settings, rank=rank, world_size=world_size,
                       tokenizer=build_tokenizer(cfg, shardset.vocab), regions=RegionSpec.from_config(cfg),
                       mix=mix or [])

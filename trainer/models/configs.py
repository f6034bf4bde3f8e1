"""The model's typed configs, one per part: `ImageTowerConfig` (the image encoder), `TextTowerConfig` (the caption
encoder) and `EmbedderConfig` (the shared spaces: heads, pooling, concepts), each derived from the run's config by
its `from_config`.

The YAML keys stay flat (`model.image_encoder`, `model.cnn_width`, `model.gru_hidden`, ... and `data.image_size`,
`data.max_words`): users' configs and saved run folders keep working. The rules on those keys are checked once,
by the config sections (trainer/config/schema.py); these classes only carry the values to the one part that
uses them, so a tower sees only its own options.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from trainer.config import Config, ConfigError

AUTO_WEIGHT = "auto"  # model.local_score_weight=auto: the share is chosen on the validation split
DEFAULT_SHARE = 0.5  # w = 1: the paper's plain concatenation


def share_of_weight(weight: float) -> float:
    """The local share a = w / (1 + w) of a weight w >= 0 in <g, g> + w <l, l> (same ranking as
    (1 - a) <g, g> + a <l, l>); an infinite w is 1, the local space alone."""
    if not weight >= 0:  # also nan
        raise ValueError(f"a local score weight must be >= 0, got {weight}")
    return 1.0 if math.isinf(weight) else weight / (1.0 + weight)


def start_share(local_score_weight: float | str) -> float:
    """The share a model starts with: a fixed weight's, or DEFAULT_SHARE under auto (until validation chooses)."""
    return DEFAULT_SHARE if local_score_weight == AUTO_WEIGHT else share_of_weight(float(local_score_weight))


@dataclass(frozen=True)
class ImageTowerConfig:
    """What the image encoders read; each registered encoder takes the fields it uses (trainer.models.image_towers).
    Defaults are the config's."""

    kind: str = "small_cnn"  # model.image_encoder: a name registered in trainer.models.image_towers
    image_size: int = 64  # data.image_size: pictures are image_size x image_size
    cnn_width: int = 64  # small_cnn: channels of the last stage (the parts' width)
    region_dim: int = 2048  # regions: channels per region
    max_regions: int = 36  # regions: most regions per picture
    region_dropout: float = 0.2  # regions: share of regions dropped per picture in training
    backbone_trainable: Literal["frozen", "partial", "full"] = "frozen"  # efficientnet_lite0: which weights train
    backbone_trainable_blocks: int = 2  # efficientnet_lite0, partial: the last MBConv blocks that train
    backbone_weights: Optional[str] = None  # efficientnet_lite0: a .pth state dict; None = the pip package's

    @classmethod
    def from_config(cls, cfg: Config) -> ImageTowerConfig:
        m = cfg.model
        return cls(kind=m.image_encoder, image_size=cfg.data.image_size, cnn_width=m.cnn_width,
                   region_dim=m.region_dim, max_regions=m.max_regions, region_dropout=m.region_dropout,
                   backbone_trainable=m.backbone_trainable, backbone_trainable_blocks=m.backbone_trainable_blocks,
                   backbone_weights=m.backbone_weights)


@dataclass(frozen=True)
class TextTowerConfig:
    """What the caption encoders read (trainer.models.text_encoders.build_text_tower). Defaults are the config's."""

    kind: Literal["gru", "minilm", "hf"] = "gru"  # model.text_encoder
    vocab_size: int = 0  # gru: rows of the word embedding, the shard set's vocabulary
    max_words: int = 32  # data.max_words: most ids per caption (a transformer's tokenizer cuts there)
    word_dim: int = 128  # gru: word embedding width
    gru_hidden: int = 256  # gru: hidden units per direction (the parts' width)
    gru_layers: int = 1
    word_vectors: Optional[str] = None  # gru: "glove6b50d" or a GloVe text file; None = random word embeddings
    model_path: Optional[str] = None  # minilm, hf: model.text_model_path, a local Hugging Face model folder
    grad_checkpointing: bool = False  # minilm, hf: model.text_grad_checkpointing
    lr_mult: float = 1.0  # minilm, hf: optim.text_lr_mult, carried by the transformer's parameters

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> TextTowerConfig:
        m = cfg.model
        return cls(kind=m.text_encoder, vocab_size=vocab_size, max_words=cfg.data.max_words, word_dim=m.word_dim,
                   gru_hidden=m.gru_hidden, gru_layers=m.gru_layers, word_vectors=m.word_vectors,
                   model_path=m.text_model_path, grad_checkpointing=m.text_grad_checkpointing,
                   lr_mult=cfg.optim.text_lr_mult)


@dataclass(frozen=True)
class EmbedderConfig:
    """The shared spaces over the two towers (trainer.models.embedder.HierarchicalEmbedder)."""

    embed_dim: int = 256  # model.embed_dim: width of the global and the local space
    max_words: int = 32  # data.max_words: most parts per caption (the text heads' GPO table)
    pooling: Literal["gpo", "mean"] = "gpo"  # model.pooling
    local_space: bool = True  # loss.local != none
    # The concatenation's local share a in s = (1 - a) <g, g> + a <l, l>: model.local_score_weight w gives
    # a = w / (1 + w); auto starts at 0.5 (w = 1) until the validation split chooses (trainer.eval.concat_weight).
    local_share: float = 0.5
    num_concepts: int = 0  # concept logits per local vector (loss.concept_bce_weight > 0); 0 = no concept head

    @classmethod
    def from_config(cls, cfg: Config, num_concepts: int) -> EmbedderConfig:
        """`num_concepts`: the shard set's (concepts.json); the concept head is built when the loss uses it."""
        concept_head = cfg.loss.concept_bce_weight > 0
        if concept_head and num_concepts < 1:
            raise ConfigError("loss.concept_bce_weight: the shard set lists no concepts (concepts.json) to predict; "
                              "set loss.concept_bce_weight=0")
        return cls(embed_dim=cfg.model.embed_dim, max_words=cfg.data.max_words, pooling=cfg.model.pooling,
                   local_space=cfg.loss.local != "none", local_share=start_share(cfg.model.local_score_weight),
                   num_concepts=num_concepts if concept_head else 0)

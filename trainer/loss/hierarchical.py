"""Hierarchical hard-negative loss: a global term, a label-supervised local term and an optional concept BCE.

Built for the all-gathered large batch: a process scores only its own n rows against all N columns, in both
directions, so memory is O(n * N). Every term is a mean over the local rows, hence
sum_r term_r * n_r / N over ranks equals the single-process term on the whole batch (values and gradients).

HierarchicalLoss is built from the loss section of the config (LossConfig, which checks its own values) and is
composed of one global term (global_terms.py), one local term (local_terms.py) and one label source
(labels.py), each picked from its config string in registry.py.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.config import LossConfig
from trainer.loss.pairs import PairBatch
from trainer.loss.registry import build_global_term, build_label_source, build_local_term

EMBEDDING_KEYS = ("img_g", "txt_g")


def concept_bce(logits: Tensor, targets: Tensor, name: str) -> Tensor:
    """BCE of one side's concept logits [n, K] against its concept multi-hots, computed in at least float32."""
    if logits.shape != targets.shape:
        raise ValueError(f"concept_logits {name} must have shape {tuple(targets.shape)} (local rows x K); "
                         f"got {tuple(logits.shape)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.binary_cross_entropy_with_logits(logits.to(dtype), targets.to(dtype))


class ConceptBCE(torch.nn.Module):
    """The model's concept heads (loss.concept_bce_weight > 0) predict each side's concepts of the local rows:
    the label source's, so the shuffled control's heads learn shuffled targets. With weight 0 there is no term,
    and logits passed anyway mean the model and the loss were built from different configs."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, concept_logits: tuple[Tensor, Tensor] | None, concepts: tuple[Tensor, Tensor] | None,
                rows: slice) -> dict[str, Tensor]:
        if self.weight == 0:
            if concept_logits is not None:
                raise ValueError("concept_logits given but concept_bce_weight is 0: the model and loss configs "
                                 "disagree")
            return {}
        if concept_logits is None:
            raise ValueError("concept_logits (image_logits, caption_logits) are required: concept_bce_weight > 0")
        img_c, cap_c = concepts
        return {"concept_bce": (concept_bce(concept_logits[0], img_c[rows], "image_logits")
                                + concept_bce(concept_logits[1], cap_c[rows], "caption_logits"))}


class HierarchicalLoss(torch.nn.Module):
    """L = global + local_weight * local + concept_bce_weight * concept_bce, see docs/design.md section 1.

    `seed` (run.seed) is the shuffled control's: the one input that is not in the loss section."""

    def __init__(self, cfg: LossConfig, *, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.global_term = build_global_term(cfg)
        self.local_term = build_local_term(cfg)
        self.label_source = build_label_source(cfg, seed)
        self.concept_bce = ConceptBCE(cfg.concept_bce_weight)

    def forward(self, batch: Mapping[str, Tensor], *, row_offset: int = 0, num_rows: int | None = None,
                step: int = 0, concept_logits: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """The terms of this rank's rows [row_offset, row_offset + num_rows) of the gathered batch (all rows by
        default) at optimizer step `step`; "loss" is their weighted sum."""
        num_rows = self._check_batch(batch, row_offset, num_rows)
        rows = slice(row_offset, row_offset + num_rows)
        dtype = torch.promote_types(batch["img_g"].dtype, torch.float32)
        concepts = self.label_source.concepts(batch, step)
        pairs = PairBatch.build(batch["image_ids"], rows, step, concepts, dtype)
        out = {"label_mean": pairs.label_mean(), **self.global_term(batch, pairs),
               **self.local_term(batch, pairs), **self.concept_bce(concept_logits, concepts, rows)}
        loss = out["global"]
        for name, weight in (("local", self.cfg.local_weight), ("concept_bce", self.cfg.concept_bce_weight)):
            if name in out:  # the terms that are off report nothing
                loss = loss + weight * out[name]
        out["loss"] = loss
        return out

    def _check_batch(self, batch: Mapping[str, Tensor], row_offset: int, num_rows: int | None) -> int:
        """Refuse a malformed batch or row range; return the number of local rows."""
        needed = [*EMBEDDING_KEYS, "image_ids", *self.local_term.batch_keys, *self.label_source.batch_keys]
        missing = [key for key in needed if key not in batch]
        if missing:
            raise ValueError(f"loss batch is missing keys {missing} (local={self.cfg.local!r}, "
                             f"labels={self.cfg.labels!r})")
        ids = batch["image_ids"]
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"batch['image_ids'] must be an integer [N] tensor; got {ids.dtype} {tuple(ids.shape)}")
        total = ids.shape[0]
        for pair, width in ((EMBEDDING_KEYS, "D"), (self.local_term.batch_keys, "D"),
                            (self.label_source.batch_keys, "K")):
            shapes = [tuple(batch[key].shape) for key in pair]
            if shapes and (any(len(s) != 2 or s[0] != total for s in shapes) or shapes[0] != shapes[1]):
                raise ValueError(f"batch[{pair[0]!r}] and batch[{pair[1]!r}] must both be [N={total}, {width}]; "
                                 f"got {shapes[0]} and {shapes[1]}")
        num_rows = total - row_offset if num_rows is None else num_rows
        if not (0 <= row_offset and 1 <= num_rows and row_offset + num_rows <= total):
            raise ValueError(f"row_offset={row_offset}, num_rows={num_rows} do not select rows of a batch of {total}")
        return num_rows

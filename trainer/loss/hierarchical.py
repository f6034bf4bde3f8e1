"""Hierarchical hard-negative loss: a VSE++ hinge on the global space plus a label-supervised local term.

Built for the all-gathered large batch: a process scores only its own n rows against all N columns, in both
directions, so memory is O(n * N). Every term is a mean over the local rows, hence
sum_r term_r * n_r / N over ranks equals the single-process term on the whole batch (values and gradients).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

LOCAL_KINDS = ("contrastive", "adaptive_hinge", "none")
LABEL_KINDS = ("concepts", "shuffled", "none")
GLOBAL_KINDS = ("hinge", "infonce")


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Jaccard index of concept sets: [n, K] x [m, K] multi-hot -> [n, m]; 0 where both sets are empty."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"jaccard needs [n, K] and [m, K] tensors; got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return jaccard_of_sets(*concept_sets(a, dtype), *concept_sets(b, dtype))


def concept_sets(multi_hot: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """([N, K] 0/1 indicator in `dtype`, [N] set sizes): computed once per batch and shared by both directions."""
    indicator = (multi_hot > 0).to(dtype)
    return indicator, indicator.sum(1)


def jaccard_of_sets(a: Tensor, a_size: Tensor, b: Tensor, b_size: Tensor) -> Tensor:
    """[n, m] Jaccard index from indicators and set sizes: one matmul, then in-place ops (no n x m temporaries
    beyond the union)."""
    inter = a @ b.T
    union = (a_size.unsqueeze(1) + b_size.unsqueeze(0)).sub_(inter)
    # union is a whole count; where it is 0 the intersection is 0 too, so clamping gives J = 0 there.
    return inter.div_(union.clamp_(min=1))


def caption_containment(caption: Tensor, caption_size: Tensor, image: Tensor, *, caption_rows: bool) -> Tensor:
    """Share of each caption's concepts that the picture has: |C(c) & C(x)| / |C(c)|, 0 for a caption without
    concepts. caption_rows=True: [n captions] x [m pictures]; False: [n pictures] x [m captions] (caption is
    then the columns' side). 1 means the caption names nothing the picture lacks: a plausible match.

    Why not the Jaccard Y: a picture's set is the union of its five captions, so a short caption that fits it
    fully ("a red star") still has a small Jaccard index (2 of ~8 concepts); containment reads 1 there."""
    if caption_rows:
        return (caption @ image.T).div_(caption_size.clamp(min=1).unsqueeze(1))
    return (image @ caption.T).div_(caption_size.clamp(min=1).unsqueeze(0))


def shuffle_permutation(num_items: int, seed: int, step: int) -> Tensor:
    """The permutation of label rows used by labels="shuffled": a pure function of (seed, step), so every
    rank computes the same one without communicating."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randperm(num_items, generator=generator)


def _hinge(scores: Tensor, positive: Tensor, not_negative: Tensor, margin: Tensor | float, use_sum: bool) -> Tensor:
    """Mean over rows of the hardest (or summed) hinge [margin - s_pos + s_ij]_+ over the negative columns
    (those not masked by not_negative: the row's own picture, and any column the labels call a match)."""
    cost = (margin - positive.unsqueeze(1) + scores).clamp(min=0).masked_fill(not_negative, 0.0)
    per_row = cost.sum(1) if use_sum else cost.max(1).values
    return per_row.mean()


def _info_nce(scores: Tensor, same_image: Tensor, excluded: Tensor, temperature: float) -> Tensor:
    """InfoNCE: cross-entropy of softmax(scores / t) against a target spread evenly over the own picture's
    columns; `excluded` columns (label matches that are not the own picture) are left out of the softmax, so
    a duplicate caption of another picture is neither a positive nor a negative."""
    logits = (scores / temperature).masked_fill(excluded & ~same_image, float("-inf"))
    target = same_image.to(scores.dtype)
    target = target / target.sum(1, keepdim=True)
    # -inf logits times a 0 target would be nan: only the target's columns enter the sum
    log_prob = F.log_softmax(logits, dim=1).masked_fill(~same_image, 0.0)
    return -(target * log_prob).sum(1).mean()


def _soft_contrastive(scores: Tensor, same_image: Tensor, labels: Tensor, temperature: float,
                      label_mass: float | None = None) -> Tensor:
    """Cross-entropy between softmax(scores / t) and a soft target per row.

    label_mass None (DESIGN.md): 1 on every column of the row's own picture, the label elsewhere, normalised per
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


class HierarchicalLoss(torch.nn.Module):
    """L = global + local_weight * local + concept_bce_weight * concept_bce, see DESIGN.md section 1.

    global_loss "hinge" (VSE++, DESIGN.md) or "infonce" (softmax over the batch at global_temperature). Labels
    can also steer the global term (off by default): global_label_margin scales the hinge margin by
    1 - containment (the share of a caption's concepts the picture has), global_exclude_above leaves columns
    whose containment reaches it out of the hardest-negative max / the softmax. On a corpus with duplicate
    captions the hardest "negative" is often a true match; without this the hinge can collapse (every score
    equal, loss = 2 x margin, a point where the max-hinge gradient cancels)."""

    def __init__(self, *, margin: float = 0.2, warmup_steps: int = 0, local: str = "contrastive",
                 local_weight: float = 1.0, temperature: float = 0.05, local_margin: float = 0.2,
                 concept_bce_weight: float = 0.0, labels: str = "concepts", seed: int = 0,
                 label_mass: float | None = None, global_loss: str = "hinge", global_temperature: float = 0.05,
                 global_label_margin: bool = False, global_exclude_above: float | None = None):
        super().__init__()
        self._check_global_options(global_loss, global_temperature, global_label_margin, global_exclude_above,
                                   labels)
        if label_mass is not None and not 0 <= label_mass < 1:
            raise ValueError(f"label_mass must be None or in [0, 1); got {label_mass}")
        if local not in LOCAL_KINDS:
            raise ValueError(f"local must be one of {LOCAL_KINDS}; got {local!r}")
        if labels not in LABEL_KINDS:
            raise ValueError(f"labels must be one of {LABEL_KINDS}; got {labels!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive; got {temperature}")
        for name, value in (("margin", margin), ("local_margin", local_margin), ("local_weight", local_weight),
                            ("concept_bce_weight", concept_bce_weight), ("warmup_steps", warmup_steps)):
            if not value >= 0:
                raise ValueError(f"{name} must be non-negative; got {value}")
        if concept_bce_weight > 0 and labels == "none":
            raise ValueError("concept_bce_weight > 0 needs concept labels; labels='none' has none")
        self.margin = margin
        self.warmup_steps = warmup_steps
        self.local = local
        self.local_weight = local_weight
        self.temperature = temperature
        self.local_margin = local_margin
        self.concept_bce_weight = concept_bce_weight
        self.labels = labels
        self.seed = seed
        self.label_mass = label_mass
        self.global_loss = global_loss
        self.global_temperature = global_temperature
        self.global_label_margin = global_label_margin
        self.global_exclude_above = global_exclude_above

    @staticmethod
    def _check_global_options(global_loss: str, global_temperature: float, global_label_margin: bool,
                              global_exclude_above: float | None, labels: str) -> None:
        if global_loss not in GLOBAL_KINDS:
            raise ValueError(f"global_loss must be one of {GLOBAL_KINDS}; got {global_loss!r}")
        if not global_temperature > 0:
            raise ValueError(f"global_temperature must be positive; got {global_temperature}")
        if global_exclude_above is not None and not 0 < global_exclude_above <= 1:
            raise ValueError(f"global_exclude_above must be None or in (0, 1]; got {global_exclude_above}")
        if global_label_margin and global_loss != "hinge":
            raise ValueError("global_label_margin scales the hinge's margin; global_loss='infonce' has none")
        if (global_label_margin or global_exclude_above is not None) and labels == "none":
            raise ValueError("global_label_margin and global_exclude_above need labels; labels='none' has none")

    @property
    def _global_uses_labels(self) -> bool:
        return self.global_label_margin or self.global_exclude_above is not None

    def forward(self, batch: Mapping[str, Tensor], *, row_offset: int = 0, num_rows: int | None = None,
                step: int = 0, concept_logits: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        num_rows = self._check_batch(batch, row_offset, num_rows)
        rows = slice(row_offset, row_offset + num_rows)
        dtype = torch.promote_types(batch["img_g"].dtype, torch.float32)
        ids = batch["image_ids"]
        same_image = ids[rows].unsqueeze(1) == ids.unsqueeze(0)  # [n, N]; the positive column is in it
        positive_col = torch.arange(row_offset, row_offset + num_rows, device=ids.device).unsqueeze(1)
        use_sum = step < self.warmup_steps

        def both_directions(key: str) -> tuple[Tensor, Tensor]:
            img, txt = batch[f"img_{key}"].to(dtype), batch[f"txt_{key}"].to(dtype)
            i2t = img[rows] @ txt.T
            t2i = txt[rows] @ img.T
            return i2t, t2i

        out: dict[str, Tensor] = {}
        concepts = self._concepts(batch, step)
        sets = None if concepts is None else (concept_sets(concepts[0], dtype), concept_sets(concepts[1], dtype))
        if sets is None:
            y_i2t = y_t2i = torch.zeros(same_image.shape, dtype=dtype, device=same_image.device)
        else:
            (img_ind, img_size), (cap_ind, cap_size) = sets
            y_i2t = jaccard_of_sets(img_ind[rows], img_size[rows], cap_ind, cap_size)
            y_t2i = jaccard_of_sets(cap_ind[rows], cap_size[rows], img_ind, img_size)
        num_negatives = (same_image.numel() - same_image.sum()).clamp(min=1)
        # Labels carry no gradient: the masked sums need no n x N product kept for autograd.
        label_sum = y_i2t.masked_fill(same_image, 0.0).sum() + y_t2i.masked_fill(same_image, 0.0).sum()
        out["label_mean"] = label_sum / (2 * num_negatives)

        self._global_terms(out, both_directions("g"), same_image, positive_col, sets, rows, use_sum)
        loss = out["global"]

        if self.local != "none":
            l_i2t, l_t2i = both_directions("l")
            if self.local == "contrastive":
                out["local_i2t"] = _soft_contrastive(l_i2t, same_image, y_i2t, self.temperature, self.label_mass)
                out["local_t2i"] = _soft_contrastive(l_t2i, same_image, y_t2i, self.temperature, self.label_mass)
            else:
                out["local_i2t"] = _hinge(l_i2t, l_i2t.gather(1, positive_col).squeeze(1), same_image,
                                          self.local_margin * (1 - y_i2t), use_sum)
                out["local_t2i"] = _hinge(l_t2i, l_t2i.gather(1, positive_col).squeeze(1), same_image,
                                          self.local_margin * (1 - y_t2i), use_sum)
            out["local"] = out["local_i2t"] + out["local_t2i"]
            loss = loss + self.local_weight * out["local"]

        if self.concept_bce_weight > 0:
            if concept_logits is None:
                raise ValueError("concept_logits (image_logits, caption_logits) are required: concept_bce_weight > 0")
            img_c, cap_c = concepts
            out["concept_bce"] = (self._bce(concept_logits[0], img_c[rows], "image_logits")
                                  + self._bce(concept_logits[1], cap_c[rows], "caption_logits"))
            loss = loss + self.concept_bce_weight * out["concept_bce"]
        elif concept_logits is not None:
            raise ValueError("concept_logits given but concept_bce_weight is 0: the model and loss configs disagree")

        out["loss"] = loss
        return out

    def _global_terms(self, out: dict[str, Tensor], scores: tuple[Tensor, Tensor], same_image: Tensor,
                      positive_col: Tensor, sets, rows: slice, use_sum: bool) -> None:
        """out["global_i2t"], out["global_t2i"], out["global"]: the hinge (margin a, or a * (1 - containment)
        with global_label_margin) or InfoNCE, each without the columns whose caption containment reaches
        global_exclude_above (label matches: a duplicate caption of another picture is not a negative)."""
        margins: list[Tensor | float] = [self.margin, self.margin]
        excluded = [same_image, same_image]
        if self._global_uses_labels:
            (img_ind, _), (cap_ind, cap_size) = sets
            match = [caption_containment(cap_ind, cap_size, img_ind[rows], caption_rows=False),
                     caption_containment(cap_ind[rows], cap_size[rows], img_ind, caption_rows=True)]
            if self.global_label_margin:
                margins = [self.margin * (1 - m) for m in match]
            if self.global_exclude_above is not None:
                # the threshold is compared with a small tolerance: 1.0 must catch 3/3 computed as 0.99999994
                excluded = [same_image | (m >= self.global_exclude_above - 1e-6) for m in match]
        for name, s, margin, not_negative in zip(("global_i2t", "global_t2i"), scores, margins, excluded):
            if self.global_loss == "infonce":
                out[name] = _info_nce(s, same_image, not_negative, self.global_temperature)
            else:
                out[name] = _hinge(s, s.gather(1, positive_col).squeeze(1), not_negative, margin, use_sum)
        out["global"] = out["global_i2t"] + out["global_t2i"]

    def _concepts(self, batch: Mapping[str, Tensor], step: int) -> tuple[Tensor, Tensor] | None:
        """All N rows of (image_concepts, caption_concepts), permuted together for labels="shuffled"."""
        if self.labels == "none":
            return None
        img_c, cap_c = batch["image_concepts"], batch["caption_concepts"]
        if self.labels == "shuffled":
            perm = shuffle_permutation(img_c.shape[0], self.seed, step).to(img_c.device)
            img_c, cap_c = img_c[perm], cap_c[perm]
        return img_c, cap_c

    @staticmethod
    def _bce(logits: Tensor, targets: Tensor, name: str) -> Tensor:
        if logits.shape != targets.shape:
            raise ValueError(f"concept_logits {name} must have shape {tuple(targets.shape)} (local rows x K); "
                             f"got {tuple(logits.shape)}")
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return F.binary_cross_entropy_with_logits(logits.to(dtype), targets.to(dtype))

    def _check_batch(self, batch: Mapping[str, Tensor], row_offset: int, num_rows: int | None) -> int:
        """Refuse a malformed batch or row range; return the number of local rows."""
        needed = ["img_g", "txt_g", "image_ids"]
        if self.local != "none":
            needed += ["img_l", "txt_l"]
        if self.labels != "none":
            needed += ["image_concepts", "caption_concepts"]
        missing = [key for key in needed if key not in batch]
        if missing:
            raise ValueError(f"loss batch is missing keys {missing} (local={self.local!r}, labels={self.labels!r})")
        ids = batch["image_ids"]
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"batch['image_ids'] must be an integer [N] tensor; got {ids.dtype} {tuple(ids.shape)}")
        total = ids.shape[0]
        for pair in (("img_g", "txt_g"), ("img_l", "txt_l")) if self.local != "none" else (("img_g", "txt_g"),):
            shapes = [tuple(batch[key].shape) for key in pair]
            if any(len(s) != 2 or s[0] != total for s in shapes) or shapes[0] != shapes[1]:
                raise ValueError(f"batch[{pair[0]!r}] and batch[{pair[1]!r}] must both be [N={total}, D]; "
                                 f"got {shapes[0]} and {shapes[1]}")
        if self.labels != "none":
            shapes = [tuple(batch[key].shape) for key in ("image_concepts", "caption_concepts")]
            if any(len(s) != 2 or s[0] != total for s in shapes) or shapes[0] != shapes[1]:
                raise ValueError(f"batch['image_concepts'] and batch['caption_concepts'] must both be "
                                 f"[N={total}, K]; got {shapes[0]} and {shapes[1]}")
        num_rows = total - row_offset if num_rows is None else num_rows
        if not (0 <= row_offset and 1 <= num_rows and row_offset + num_rows <= total):
            raise ValueError(f"row_offset={row_offset}, num_rows={num_rows} do not select rows of a batch of {total}")
        return num_rows

"""Where the loss's lexical labels come from, and what they measure.

A label source gives the concept multi-hots of all N rows of a gathered batch: the concepts themselves, the same
rows under a permutation that depends only on (seed, step) (the shuffled control: every rank draws the same one
without communicating), or none. ConceptSets turns them, once per batch, into what the terms read: the Jaccard
index of a picture's and a caption's sets (the local term's soft labels) and the share of a caption's concepts
that a picture has (the global term's label options).

Each source has `batch_keys` (what it reads of the batch) and `concepts(batch, step)`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

CONCEPT_KEYS = ("image_concepts", "caption_concepts")


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


@dataclass(frozen=True)
class ConceptSets:
    """Both sides' concept indicators [N, K] and set sizes [N] of a gathered batch, in the scores' dtype."""

    image: Tensor
    image_size: Tensor
    caption: Tensor
    caption_size: Tensor

    @classmethod
    def of(cls, image_concepts: Tensor, caption_concepts: Tensor, dtype: torch.dtype) -> ConceptSets:
        return cls(*concept_sets(image_concepts, dtype), *concept_sets(caption_concepts, dtype))

    def jaccard(self, rows: slice) -> tuple[Tensor, Tensor]:
        """Jaccard labels [n, N] of the local rows: (image rows x all captions, caption rows x all pictures)."""
        return (jaccard_of_sets(self.image[rows], self.image_size[rows], self.caption, self.caption_size),
                jaccard_of_sets(self.caption[rows], self.caption_size[rows], self.image, self.image_size))

    def containment(self, rows: slice) -> tuple[Tensor, Tensor]:
        """Caption containment [n, N] of the local rows, in the same two directions as jaccard()."""
        return (caption_containment(self.caption, self.caption_size, self.image[rows], caption_rows=False),
                caption_containment(self.caption[rows], self.caption_size[rows], self.image, caption_rows=True))


class ConceptLabels:
    """labels=concepts: the batch's own concept multi-hots."""

    batch_keys = CONCEPT_KEYS

    def concepts(self, batch: Mapping[str, Tensor], step: int) -> tuple[Tensor, Tensor] | None:
        """All N rows of (image_concepts, caption_concepts)."""
        return batch["image_concepts"], batch["caption_concepts"]


class ShuffledLabels(ConceptLabels):
    """labels=shuffled, the control: the concepts with their rows permuted together by shuffle_permutation(seed,
    step), so labels keep their statistics but no longer describe their own pair."""

    def __init__(self, seed: int):
        self.seed = seed

    def concepts(self, batch: Mapping[str, Tensor], step: int) -> tuple[Tensor, Tensor] | None:
        img_c, cap_c = super().concepts(batch, step)
        perm = shuffle_permutation(img_c.shape[0], self.seed, step).to(img_c.device)
        return img_c[perm], cap_c[perm]


class NoLabels:
    """labels=none: every label is 0 (the local term's targets are the own picture's columns only)."""

    batch_keys: tuple[str, ...] = ()

    def concepts(self, batch: Mapping[str, Tensor], step: int) -> tuple[Tensor, Tensor] | None:
        return None

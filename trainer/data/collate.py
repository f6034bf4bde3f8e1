"""Collation: per-sample tensors -> one batch's right-padded tensors (caption tokens, region features) with their
lengths, and the image inputs of a batch in the form the image encoder reads."""
from __future__ import annotations

import torch

from trainer.data.decode import RegionSpec


def pad_tokens(token_lists: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T] and lengths [B]."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    tokens = torch.full((len(token_lists), int(lengths.max())), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens, lengths


def pad_regions(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[R_i, D] tensors -> right-padded [B, max R_i, D] (zeros) and counts [B]."""
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    out = features[0].new_zeros(len(features), int(lengths.max()), features[0].shape[1])
    for row, f in enumerate(features):
        out[row, : f.shape[0]] = f
    return out, lengths


def stack_image_inputs(inputs: list[torch.Tensor], regions: RegionSpec | None) -> dict[str, torch.Tensor]:
    """A batch's image inputs: {"images"} for pictures, {"images", "image_lengths"} for region features."""
    if regions is None:
        return {"images": torch.stack(inputs)}
    features, lengths = pad_regions(inputs)
    return {"images": features, "image_lengths": lengths}

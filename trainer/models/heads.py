"""The heads over a tower's parts: the part projection (PartHead), the pooled and L2-normalised embedding of one
space (EmbeddingHead), and the concept logits of local vectors (ConceptHead)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.pooling import build_pooling


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
        self.pool = build_pooling(pooling, max_parts, variable_length)

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

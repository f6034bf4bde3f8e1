"""Pooling a set of right-padded parts [B, T, D] with lengths [B] into one vector [B, D]: VSE-infinity's
Generalized Pooling Operator (GPO) and the plain mean, by name in `POOLINGS` (model.pooling)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def prefix_mask(lengths: Tensor, width: int) -> Tensor:
    """[B, width] bool, True on the first lengths[b] positions (parts are right-padded)."""
    return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """[length, dim] Transformer positional encodings of positions 0..length-1 (as VSE-infinity's GPO)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding


class GPOPool(nn.Module):
    """VSE-infinity's Generalized Pooling Operator over right-padded parts [B, T, D] with lengths [B].

    Per feature dimension the valid values are sorted in descending order and summed with weights over sorted
    positions; the weights of a set of L parts come from a BiGRU run over the positional encodings of its L
    sorted positions, a linear score and a softmax with temperature 0.1. Unlike VSE-infinity, the GRU runs
    once per forward on a fixed batch holding every length 1..max_len (a table of weight rows), and each
    sample picks its row: the module calls never depend on the data, which ZeRO-3 requires.
    """

    def __init__(self, max_len: int, pe_dim: int = 32, hidden: int = 32, temperature: float = 0.1,
                 variable_length: bool = True):
        super().__init__()
        if pe_dim % 2:  # sine and cosine columns come in pairs (not a config key: a caller's mistake)
            raise ValueError(f"pe_dim must be even, got {pe_dim}")
        self.max_len = max_len
        self.temperature = temperature
        self.gru = nn.GRU(pe_dim, hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden, 1, bias=False)  # a bias would cancel in the softmax
        # An image grid always has max_len valid parts: then only the full-length row of the table is needed,
        # which saves the GRU max_len - 1 sequences per forward.
        self.variable_length = variable_length
        rows = max_len if variable_length else 1
        positions = sinusoidal_positions(max_len, pe_dim).expand(rows, max_len, pe_dim).contiguous()
        self.register_buffer("positions", positions, persistent=False)
        # stays on the CPU, where packing wants it
        self.table_lengths = torch.arange(1, max_len + 1) if variable_length else torch.tensor([max_len])

    def weight_table(self) -> Tensor:
        """[rows, max_len]: row L-1 holds the weights over sorted positions of a set of L parts (with
        variable_length=False a single row, for max_len parts)."""
        positions = self.positions.to(self.score.weight.dtype)  # the GRU takes its own weights' dtype
        if self.variable_length:
            packed = pack_padded_sequence(positions, self.table_lengths, batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=self.max_len)
        else:
            out = self.gru(positions)[0]
        hidden = self.gru.hidden_size
        out = (out[..., :hidden] + out[..., hidden:]) / 2
        scores = self.score(out).squeeze(-1)
        valid = prefix_mask(self.table_lengths.to(scores.device), self.max_len)
        scores = scores.masked_fill(~valid, float("-inf"))
        return torch.softmax(scores / self.temperature, dim=1)

    def forward(self, parts: Tensor, lengths: Tensor) -> Tensor:
        width = parts.size(1)
        table = self.weight_table()
        if not self.variable_length:
            if width != self.max_len:
                raise ValueError(f"this pooling takes exactly {self.max_len} parts per sample, got {width}")
            weights = table.expand(parts.size(0), -1)
            return (parts.sort(dim=1, descending=True).values * weights.unsqueeze(-1).to(parts.dtype)).sum(dim=1)
        weights = table[lengths - 1]  # [B, max_len]; zero past each length
        if width <= self.max_len:
            weights = weights[:, :width]
        else:  # parts padded past max_len: the padding weighs nothing
            weights = F.pad(weights, (0, width - self.max_len))
        valid = prefix_mask(lengths, width).unsqueeze(-1)
        # Padding sorts last (-inf), then becomes 0 so that 0 weight * padding never yields NaN.
        ordered = parts.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True).values
        ordered = ordered.masked_fill(~valid, 0.0)
        return (ordered * weights.unsqueeze(-1).to(parts.dtype)).sum(dim=1)


class MeanPool(nn.Module):
    """Mean over the valid (first lengths[b]) parts."""

    def forward(self, parts: Tensor, lengths: Tensor) -> Tensor:
        valid = prefix_mask(lengths, parts.size(1)).unsqueeze(-1)
        # masked_fill, not a product: padding that holds inf or NaN must not leak into the mean
        return parts.masked_fill(~valid, 0.0).sum(dim=1) / lengths.unsqueeze(-1).to(parts.dtype)


POOLINGS = ("gpo", "mean")  # the values of model.pooling


def build_pooling(kind: str, max_len: int, variable_length: bool = True) -> nn.Module:
    """The pooling named `kind` over at most max_len parts; variable_length=False when every sample has exactly
    max_len valid parts (an image grid)."""
    if kind == "gpo":
        return GPOPool(max_len, variable_length=variable_length)
    if kind == "mean":
        return MeanPool()
    # model.pooling is checked by the config; this names a caller's typo instead of building the wrong pooling
    raise ValueError(f"pooling must be one of {POOLINGS}, got {kind!r}")

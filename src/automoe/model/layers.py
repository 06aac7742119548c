"""Elastic building blocks: each holds its largest weight and uses a front slice.

A SubTransformer uses W[:out, :in], b[:out], LayerNorm's first d entries and the first
d columns of the embedding. The input width always comes from the input tensor; only
output widths are passed in. A compact model is built from the same blocks at exactly
its own sizes, where every slice is the whole tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ElasticLinear(nn.Module):
    def __init__(self, *, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        out = self.weight.shape[0] if out_features is None else out_features
        bias = None if self.bias is None else self.bias[:out]
        return F.linear(x, self.weight[:out, : x.shape[-1]], bias)


class ElasticLayerNorm(nn.Module):
    def __init__(self, *, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        return F.layer_norm(x, (d,), self.weight[:d], self.bias[:d], self.eps)


class SharedEmbedding(nn.Module):
    """One table over the joint vocabulary for source, target and output projection.

    Encoder and decoder may use different widths; each takes the first d columns.
    """

    def __init__(self, *, vocab_size: int, dim: int, pad_id: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.normal_(self.weight, mean=0.0, std=dim**-0.5)
        with torch.no_grad():
            self.weight[pad_id].zero_()
        self.pad_id = pad_id

    def forward(self, tokens: torch.Tensor, dim: int) -> torch.Tensor:
        """Token ids (B, T) -> scaled embeddings plus sinusoidal positions (B, T, dim)."""
        return self.embed(tokens, dim, start=0)

    def embed(self, tokens: torch.Tensor, dim: int, start: int) -> torch.Tensor:
        x = F.embedding(tokens, self.weight[:, :dim], padding_idx=self.pad_id) * math.sqrt(dim)
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        return x + sinusoid(positions, dim, x.dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Output projection tied to the embedding: (B, T, d) -> (B, T, V)."""
        return F.linear(x, self.weight[:, : x.shape[-1]])


def sinusoid(positions: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal position encodings (T, dim): sin on the first half, cos on the second."""
    half = dim // 2
    freq = torch.exp(
        torch.arange(half, device=positions.device, dtype=torch.float32) * -(math.log(10000.0) / (half - 1))
    )
    angles = positions.float()[:, None] * freq[None, :]  # (T, half)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    return table.to(dtype)


def scaled_dropout(p: float, dim: int, max_dim: int) -> float:
    """Dropout scaled with the sampled width: p * d / d_max (HAT)."""
    return p * dim / max_dim

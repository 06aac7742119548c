"""Multi-head attention with a fixed q/k/v width (HAT): the head count only changes the
head dimension (qkv_dim / heads); the embedding width slices the projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from automoe.model.layers import ElasticLinear

KV = tuple[torch.Tensor, torch.Tensor]  # (B, H, S, Dh) keys and values


class Attention(nn.Module):
    def __init__(self, *, query_dim: int, kv_dim: int, qkv_dim: int):
        super().__init__()
        self.q_proj = ElasticLinear(in_features=query_dim, out_features=qkv_dim)
        self.k_proj = ElasticLinear(in_features=kv_dim, out_features=qkv_dim)
        self.v_proj = ElasticLinear(in_features=kv_dim, out_features=qkv_dim)
        self.out_proj = ElasticLinear(in_features=qkv_dim, out_features=query_dim)

    def project_kv(self, kv_input: torch.Tensor, heads: int) -> KV:
        """(B, S, d_kv) -> keys and values (B, H, S, Dh)."""
        return split_heads(self.k_proj(kv_input), heads), split_heads(self.v_proj(kv_input), heads)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention: (B, T, d) -> queries, keys and values, each (B, T, qkv), heads not split."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        x: torch.Tensor,
        kv: KV,
        heads: int,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        dropout: float = 0.0,
    ) -> torch.Tensor:
        """x (B, T, d) attends to projected keys/values; mask (B, 1, 1, S) is True where allowed."""
        q = split_heads(self.q_proj(x), heads)  # (B, H, T, Dh)
        return self.attend(q, kv, x.shape[-1], mask, causal, dropout)

    def attend(
        self,
        q: torch.Tensor,
        kv: KV,
        out_dim: int,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        dropout: float = 0.0,
    ) -> torch.Tensor:
        """Projected queries (B, H, T, Dh) and keys/values -> (B, T, out_dim)."""
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, dropout_p=dropout, is_causal=causal)
        return self.out_proj(merge_heads(out), out_dim)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, width = x.shape
    return x.view(b, t, heads, width // heads).transpose(1, 2)  # (B, H, T, Dh)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)  # (B, T, H * Dh)


def padding_mask(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, S) ids -> (B, 1, 1, S) boolean mask, True on real tokens."""
    return (tokens != pad_id)[:, None, None, :]

"""Mixture-of-Experts FFN with heterogeneous expert sizes.

Routing, as a sequence of named steps: logits -> fp32 softmax over the n sampled
experts -> top-k -> group token assignments by expert (stable sort + bincount) -> run
each expert on its contiguous slice -> index_add_ back, scaled by the gate. With one
expert the layer is exactly the dense FFN (softmax over one logit is 1). The layer
returns its router statistics; the auxiliary losses are free functions over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from automoe.model.layers import ElasticLinear


class Expert(nn.Module):
    """A ReLU FFN: d -> hidden -> d; the hidden width is a front slice."""

    def __init__(self, *, embed_dim: int, ffn_dim: int):
        super().__init__()
        self.fc1 = ElasticLinear(in_features=embed_dim, out_features=ffn_dim)
        self.fc2 = ElasticLinear(in_features=ffn_dim, out_features=embed_dim)

    def forward(self, x: torch.Tensor, hidden: int, dropout: float = 0.0) -> torch.Tensor:
        h = F.relu(self.fc1(x, hidden))
        h = F.dropout(h, dropout, self.training) if dropout else h
        return self.fc2(h, x.shape[-1])


class Router(nn.Module):
    def __init__(self, *, embed_dim: int, max_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_experts, embed_dim))
        nn.init.normal_(self.weight, std=embed_dim**-0.5)

    def forward(self, x: torch.Tensor, n_experts: int) -> torch.Tensor:
        """Router logits in fp32, (N, n), whatever the autocast dtype."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight[:n_experts, : x.shape[-1]].float())


@dataclass(frozen=True)
class RouterStats:
    logits: torch.Tensor  # (N, n) fp32
    probs: torch.Tensor  # (N, n) fp32
    expert_index: torch.Tensor  # (N, k) chosen experts per token
    tokens_per_expert: torch.Tensor  # (n,) assignments each expert received (before dropping)
    dropped: int  # assignments dropped by the capacity limit


class MoE(nn.Module):
    def __init__(self, *, embed_dim: int, ffn_dims: tuple[int, ...]):
        super().__init__()
        # a dense layer (one expert) has no router: softmax over one logit is always 1
        self.router = Router(embed_dim=embed_dim, max_experts=len(ffn_dims)) if len(ffn_dims) > 1 else None
        self.experts = nn.ModuleList(Expert(embed_dim=embed_dim, ffn_dim=h) for h in ffn_dims)

    def forward(
        self,
        x: torch.Tensor,
        expert_dims: tuple[int, ...],
        top_k: int = 1,
        dropout: float = 0.0,
        capacity_factor: float | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterStats | None]:
        """x (..., d) -> (..., d) and the router statistics (None for a dense layer).

        `keep` (...,) marks the real tokens: padding is not routed, takes no expert capacity,
        counts in no router statistic and comes out as zeros."""
        n = len(expert_dims)
        if n == 1:
            return self.experts[0](x, expert_dims[0], dropout), None
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, d)
        rows = None
        if keep is not None and not bool(keep.all()):
            rows = keep.reshape(-1).nonzero().squeeze(1)  # (N_real,)
        tokens = flat if rows is None else flat.index_select(0, rows)  # (N_real, d)
        logits = self.router(tokens, n)  # (N_real, n) fp32
        probs = logits.softmax(dim=-1)
        k = min(top_k, n)
        gates, chosen = probs.topk(k, dim=-1)  # (N_real, k)

        # group assignments by expert: one sort, one bincount, one host sync for the counts
        expert_of = chosen.reshape(-1)  # (N_real * k,)
        order = torch.argsort(expert_of, stable=True)
        token_of = torch.div(order, k, rounding_mode="floor")
        counts = torch.bincount(expert_of, minlength=n)
        gate_of = gates.reshape(-1)[order].to(x.dtype)
        capacity = math.ceil(capacity_factor * tokens.shape[0] * k / n) if capacity_factor else None

        out = torch.zeros_like(tokens)
        start, dropped = 0, 0
        for e, count in enumerate(counts.tolist()):
            end, kept = start + count, count if capacity is None else min(count, capacity)
            dropped += count - kept
            if kept:
                idx = token_of[start : start + kept]
                y = self.experts[e](tokens[idx], expert_dims[e], dropout)
                out.index_add_(0, idx, y * gate_of[start : start + kept, None])
            start = end
        if rows is not None:
            out = torch.zeros_like(flat).index_copy(0, rows, out)  # padding rows stay zero
        return out.view(shape), RouterStats(logits, probs, chosen, counts, dropped)


def load_balancing_loss(stats: RouterStats, alpha: float = 0.01) -> torch.Tensor:
    """Switch Transformer loss for one layer: alpha * n * sum_i f_i * P_i, where f_i is the
    share of assignments routed to expert i and P_i its mean router probability."""
    n = stats.probs.shape[-1]
    f = stats.tokens_per_expert.float() / stats.tokens_per_expert.sum().clamp(min=1)
    p = stats.probs.mean(dim=0)
    return alpha * n * torch.sum(f * p)


def router_z_loss(stats: RouterStats) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition of the router logits."""
    return torch.logsumexp(stats.logits, dim=-1).square().mean()

"""CPU inference layout for compact models: linear layers on oneDNN with packed weights.

Incremental decoding multiplies a few rows (beam x batch) by every weight matrix at every
step. For such small products PyTorch's default CPU GEMM (MKL in the official wheels)
is slow on these AMD CPUs: oneDNN with the weight reordered once into its blocked layout
ran the same products 2-5x faster here (bench/profile_decode.py shows the effect on whole
decoding). `for_inference(model)` returns a copy of a compact SubTransformer whose linear
layers and tied output projection run that way, with the expert's ReLU fused into its
first layer; outputs equal the original's to fp32 rounding (tests/test_inference.py).

Inference only: the copy has no gradients and is not for saving. Where oneDNN is not
available or the model is not on the CPU, the model comes back as it is.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from automoe.model.attention import KV, Attention, split_heads
from automoe.model.layers import ElasticLinear, SharedEmbedding, sinusoid
from automoe.model.moe import Expert


def available(model: nn.Module) -> bool:
    device = next(model.parameters()).device
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return device.type == "cpu" and onednn


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), None)


class PackedLinear(nn.Module):
    """An ElasticLinear at its full size, weight packed for oneDNN; `activation` fused."""

    def __init__(self, linear: ElasticLinear, activation: str = "none"):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.packed = _pack(linear.weight)  # a plain attribute: an opaque layout, not state
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.activation = activation

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        if out_features not in (None, self.out_features) or x.shape[-1] != self.in_features:
            raise ValueError("a packed linear layer runs at its full size only (compact models)")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.activation, [], "")


class PackedExpert(nn.Module):
    """Expert FFN: ReLU fused into fc1."""

    def __init__(self, expert: Expert):
        super().__init__()
        self.fc1 = PackedLinear(expert.fc1, activation="relu")
        self.fc2 = PackedLinear(expert.fc2)

    def forward(self, x: torch.Tensor, hidden: int, dropout: float = 0.0) -> torch.Tensor:
        return self.fc2(self.fc1(x, hidden), x.shape[-1])


class PackedAttention(nn.Module):
    """Self-attention with q/k/v fused into one packed product; encoder-decoder attention
    with its query and its k/v (fused) packed."""

    def __init__(self, attn: Attention, self_attention: bool):
        super().__init__()
        self.out_proj = PackedLinear(attn.out_proj)
        if self_attention:
            self.qkv = _fused(attn.q_proj, attn.k_proj, attn.v_proj)
        else:
            self.q_proj, self.kv = PackedLinear(attn.q_proj), _fused(attn.k_proj, attn.v_proj)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv(x).chunk(3, dim=-1)  # (B, T, 3 * qkv) -> 3 x (B, T, qkv)

    def project_kv(self, kv_input: torch.Tensor, heads: int) -> KV:
        k, v = self.kv(kv_input).chunk(2, dim=-1)  # (B, S, 2 * qkv) -> 2 x (B, S, qkv)
        return split_heads(k, heads), split_heads(v, heads)

    forward = Attention.forward  # encoder-decoder attention: project the query, attend
    attend = Attention.attend


def _fused(*linears: ElasticLinear) -> PackedLinear:
    fused = ElasticLinear(in_features=linears[0].weight.shape[1], out_features=sum(x.weight.shape[0] for x in linears))
    fused.weight.data = torch.cat([x.weight.detach() for x in linears])
    fused.bias.data = torch.cat([x.bias.detach() for x in linears])
    return PackedLinear(fused)


class PackedEmbedding(nn.Module):
    """The shared table for lookups; a packed copy of its used columns for the logits."""

    def __init__(self, embed: SharedEmbedding, dim: int, positions: int = 1024):
        super().__init__()
        self.table = embed
        self.dim = dim
        self.packed = _pack(embed.weight[:, :dim])
        self.positions = sinusoid(torch.arange(positions), dim)  # (P, d): not recomputed every step

    def forward(self, tokens: torch.Tensor, dim: int) -> torch.Tensor:
        return self.embed(tokens, dim, 0)

    def embed(self, tokens: torch.Tensor, dim: int, start: int) -> torch.Tensor:
        end = start + tokens.shape[1]
        if dim != self.dim or end > len(self.positions):
            return self.table.embed(tokens, dim, start)
        x = F.embedding(tokens, self.table.weight[:, :dim], padding_idx=self.table.pad_id) * math.sqrt(dim)
        return x + self.positions[start:end]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            return F.linear(x, self.table.weight[:, : x.shape[-1]])
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def for_inference(model: nn.Module) -> nn.Module:
    """A packed copy of a compact SubTransformer for CPU decoding (see the module doc)."""
    if getattr(model, "packed_for_inference", False) or not available(model):
        return model.eval()
    out = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for parent in list(out.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Attention):
                    setattr(parent, name, PackedAttention(child, self_attention=name == "self_attn"))
                elif isinstance(child, Expert):
                    setattr(parent, name, PackedExpert(child))
                elif isinstance(child, ElasticLinear):
                    setattr(parent, name, PackedLinear(child))
                elif isinstance(child, SharedEmbedding):
                    setattr(parent, name, PackedEmbedding(child, out.arch.decoder_embed_dim))
    out.packed_for_inference = True
    return out

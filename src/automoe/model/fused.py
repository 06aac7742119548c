"""The fused serving decoder step: one incremental decoding step of a compact model in
its serving layout (model/inference.py), as direct operator calls.

`Transformer.decode` runs a step through the modules: per layer a dozen module calls,
each slicing its weights to the arch's widths, checking shapes and reshaping 3-D
activations. For a compact model in the serving layout every slice is the whole tensor
and every shape is known once the model is built, so `FusedStep` resolves all of it at
build time: per layer the packed (fp32) or quantized (int8) products as bound kernel
calls, the layer norms' weights, the head splits; the token embedding table is
pre-scaled and the position table precomputed. A step then reads top-down:

    x = E'[token] + P[t]                                   (N, d)     N = batch x beam rows
    per decoder layer (post-LN; pre-LN normalises each sublayer's input instead):
        q, k, v = W_qkv x;  cache[t] = k, v                one key/value write per layer
        x = LN(x + W_o attend(q, cache[:t + 1]))
        x = LN(x + W_o' attend(W_q' x, encoder keys/values))
        x = LN(x + FFN(x))                                 dense: fc2(relu(fc1 x)); MoE: the layer's router
    logits = W_emb x

on 2-D (N, d) activations, with the keys/values in the cache's preallocated buffer (the
same `DecoderCache`, so beam search reorders it as before). Outputs equal the module
path's (tests/test_inference.py: logits at every step, beam search results). The first
step (no cache yet: it projects the encoder keys/values and allocates the buffer) and
teacher forcing keep the module path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from automoe.model.moe import MoE
from automoe.model.transformer import DecoderCache, EncoderOut, Transformer
from automoe.space import ArchConfig

Linear = Callable[[torch.Tensor], torch.Tensor]
Norm = tuple[torch.Tensor, torch.Tensor, float]  # weight, bias, eps


def bound(layer) -> Linear:
    """A serving-layout linear layer (PackedLinear or Int8Linear) as one kernel call: the
    layer's own (its GEMM choice stays in one place)."""
    return layer.kernel()


def norm(ln) -> Norm:
    return ln.weight.detach(), ln.bias.detach(), ln.eps


@dataclass(frozen=True)
class LayerPlan:
    qkv: Linear  # (N, d) -> (N, 3 * qkv): self-attention queries, keys, values
    self_out: Linear
    self_heads: int
    ende_q: Linear
    ende_out: Linear
    ende_heads: int
    norms: tuple[Norm, Norm, Norm]  # self-attention, encoder-decoder attention, FFN
    ffn: tuple[Linear, Linear] | None  # dense: fc1 (ReLU fused), fc2; None: MoE
    moe: MoE | None
    experts: tuple[int, ...]


class FusedStep:
    """`step(tokens, enc, cache) -> (logits, cache)` for one new token per row (see the module doc)."""

    def __init__(self, core: Transformer, arch: ArchConfig):
        d, args = arch.decoder_embed_dim, core.args
        self.qkv_dim, self.pre_norm, self.pad_id, self.top_k = args.qkv_dim, args.pre_norm, args.pad_id, arch.top_k
        embed = core.embed  # PackedEmbedding
        self.table = (embed.table.weight.detach()[:, :d] * math.sqrt(d)).contiguous()  # (V, d), as embed() scales
        self.positions = embed.positions  # (P, d)
        self.logits = embed.logits
        self.final_norm = None if core.decoder_norm is None else norm(core.decoder_norm)
        self.layers = tuple(self._plan(core.decoder[i], arch, i) for i in range(arch.decoder_layers))

    @staticmethod
    def _plan(layer, arch: ArchConfig, i: int) -> LayerPlan:
        experts = arch.decoder_ffn[i]
        dense = len(experts) == 1
        return LayerPlan(
            qkv=bound(layer.self_attn.qkv),
            self_out=bound(layer.self_attn.out_proj),
            self_heads=arch.decoder_self_heads[i],
            ende_q=bound(layer.ende_attn.q_proj),
            ende_out=bound(layer.ende_attn.out_proj),
            ende_heads=arch.decoder_ende_heads[i],
            norms=(norm(layer.self_attn_norm), norm(layer.ende_attn_norm), norm(layer.ffn_norm)),
            ffn=(bound(layer.moe.experts[0].fc1), bound(layer.moe.experts[0].fc2)) if dense else None,
            moe=None if dense else layer.moe,
            experts=experts,
        )

    def usable(self, tokens: torch.Tensor, cache: DecoderCache | None) -> bool:
        return cache is not None and tokens.shape[1] == 1 and cache.length < len(self.positions)

    def __call__(self, tokens: torch.Tensor, enc: EncoderOut, cache: DecoderCache) -> tuple[torch.Tensor, DecoderCache]:
        t, qkv_dim, pre = cache.length, self.qkv_dim, self.pre_norm
        cache = cache.with_room(1)
        n = tokens.shape[0]
        ids = tokens.view(n)
        x = F.embedding(ids, self.table) + self.positions[t]  # (N, d)
        keep = (ids != self.pad_id).view(n, 1) if any(p.moe is not None for p in self.layers) else None
        for i, p in enumerate(self.layers):
            buf = cache.self_kv[i]  # (2, N, T_cap, qkv)
            # self-attention over the cached positions and this one
            h = _ln(x, p.norms[0]) if pre else x
            qkv = p.qkv(h)  # (N, 3 * qkv)
            buf[:, :, t].copy_(qkv[:, qkv_dim:].view(n, 2, qkv_dim).transpose(0, 1))  # (N, 2, qkv) -> (2, N, qkv)
            heads = p.self_heads
            q = qkv[:, :qkv_dim].view(n, heads, 1, qkv_dim // heads)  # (N, H, 1, Dh)
            k = buf[0, :, : t + 1].view(n, t + 1, heads, qkv_dim // heads).transpose(1, 2)  # (N, H, t + 1, Dh)
            v = buf[1, :, : t + 1].view(n, t + 1, heads, qkv_dim // heads).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v)  # (N, H, 1, Dh)
            x = x + p.self_out(a.reshape(n, qkv_dim))
            x = x if pre else _ln(x, p.norms[0])
            # encoder-decoder attention over the cached encoder keys/values
            h = _ln(x, p.norms[1]) if pre else x
            heads = p.ende_heads
            q = p.ende_q(h).view(n, heads, 1, qkv_dim // heads)  # (N, H, 1, Dh)
            ke, ve = cache.ende_kv[i]  # (N, H, span * S, Dh)
            a = F.scaled_dot_product_attention(q, ke, ve, attn_mask=cache.ende_mask[i])  # (N, H, 1, Dh)
            x = x + p.ende_out(a.reshape(n, qkv_dim))
            x = x if pre else _ln(x, p.norms[1])
            # FFN: the dense expert, or the MoE layer with its router
            h = _ln(x, p.norms[2]) if pre else x
            if p.ffn is not None:
                y = p.ffn[1](p.ffn[0](h))
            else:
                y, _ = p.moe(h.view(n, 1, -1), p.experts, self.top_k, keep=keep)
                y = y.view(n, -1)
            x = x + y
            x = x if pre else _ln(x, p.norms[2])
        if self.final_norm is not None:
            x = _ln(x, self.final_norm)
        logits = self.logits(x)  # (N, V)
        return logits.view(n, 1, -1), DecoderCache(cache.self_kv, cache.ende_kv, cache.ende_mask, t + 1, cache.spare)


def _ln(x: torch.Tensor, p: Norm) -> torch.Tensor:
    return torch.layer_norm(x, (x.shape[-1],), p[0], p[1], p[2])

"""The encoder-decoder core shared by the SuperTransformer and the compact SubTransformer.

Post-LayerNorm Transformer (Vaswani et al.) with sinusoidal positions, ReLU experts, one
embedding table for source, target and output, arbitrary encoder-decoder attention
(each decoder layer attends to the last 1, 2 or 3 encoder layers, concatenated along
time) and a Mixture-of-Experts FFN in every layer. The core is built at a `shape` (an
ArchConfig: the space's largest for the supernet, the arch itself for a compact model)
and runs any `arch` that fits inside it; the arch is an argument of every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from automoe.model.attention import KV, Attention, padding_mask
from automoe.model.layers import ElasticLayerNorm, SharedEmbedding, scaled_dropout
from automoe.model.moe import MoE, RouterStats
from automoe.space import ArchConfig


@dataclass(frozen=True)
class ModelArgs:
    """What, besides the arch, rebuilds a model: vocabulary, widths, regularisation."""

    vocab_size: int
    qkv_dim: int
    max_embed_dim: int  # the space's largest width: dropout scales with d / max_embed_dim
    dropout: float = 0.3
    attention_dropout: float = 0.1
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3


@dataclass(frozen=True)
class EncoderOut:
    states: tuple[torch.Tensor, ...]  # output of every encoder layer, each (B, S, d_enc)
    mask: torch.Tensor  # (B, 1, 1, S) True on real source tokens
    stats: tuple[RouterStats | None, ...]

    def repeat_interleave(self, n: int) -> EncoderOut:
        """Each sentence n times (beam search): (B, ...) -> (B * n, ...)."""
        return EncoderOut(
            tuple(s.repeat_interleave(n, 0) for s in self.states), self.mask.repeat_interleave(n, 0), self.stats
        )


@dataclass(frozen=True)
class DecoderCache:
    """Keys/values of past target tokens and of the encoder memory, per decoder layer."""

    self_kv: tuple[KV, ...]
    ende_kv: tuple[KV, ...]
    length: int  # target tokens already decoded

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> DecoderCache:
        """Row i continues row index[i]. With `same_sources` (beam search: every row moves
        within its own sentence's beams) the encoder keys/values are already right."""

        def pick(kv: KV) -> KV:
            return kv[0].index_select(0, index), kv[1].index_select(0, index)

        ende = self.ende_kv if same_sources else tuple(map(pick, self.ende_kv))
        return DecoderCache(tuple(map(pick, self.self_kv)), ende, self.length)


def _drop(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout that costs nothing at inference (decoding runs this per layer per step)."""
    return F.dropout(x, p, training) if training and p > 0 else x


class EncoderLayer(nn.Module):
    def __init__(self, *, embed_dim: int, qkv_dim: int, ffn_dims: tuple[int, ...]):
        super().__init__()
        self.self_attn = Attention(query_dim=embed_dim, kv_dim=embed_dim, qkv_dim=qkv_dim)
        self.self_attn_norm = ElasticLayerNorm(dim=embed_dim)
        self.moe = MoE(embed_dim=embed_dim, ffn_dims=ffn_dims)
        self.ffn_norm = ElasticLayerNorm(dim=embed_dim)

    def forward(self, x, mask, heads, experts, top_k, p, p_attn, capacity_factor=None):
        q, k, v = self.self_attn.project_qkv(x, heads)
        h = self.self_attn.attend(q, (k, v), x.shape[-1], mask, dropout=p_attn)
        x = self.self_attn_norm(x + _drop(h, p, self.training))
        h, stats = self.moe(x, experts, top_k, capacity_factor=capacity_factor)
        return self.ffn_norm(x + _drop(h, p, self.training)), stats


class DecoderLayer(nn.Module):
    def __init__(self, *, embed_dim: int, encoder_dim: int, qkv_dim: int, ffn_dims: tuple[int, ...]):
        super().__init__()
        self.self_attn = Attention(query_dim=embed_dim, kv_dim=embed_dim, qkv_dim=qkv_dim)
        self.self_attn_norm = ElasticLayerNorm(dim=embed_dim)
        self.ende_attn = Attention(query_dim=embed_dim, kv_dim=encoder_dim, qkv_dim=qkv_dim)
        self.ende_attn_norm = ElasticLayerNorm(dim=embed_dim)
        self.moe = MoE(embed_dim=embed_dim, ffn_dims=ffn_dims)
        self.ffn_norm = ElasticLayerNorm(dim=embed_dim)

    def forward(
        self, x, past_kv, ende_kv, ende_mask, heads, ende_heads, experts, top_k, p, p_attn, capacity_factor=None
    ):
        """x (B, t, d) new target positions; past_kv the cached keys/values of earlier ones."""
        q, k, v = self.self_attn.project_qkv(x, heads)
        if past_kv is not None:
            if x.shape[1] != 1:
                raise ValueError("incremental decoding takes one new token per step")
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)  # (B, H, T, Dh)
        causal = past_kv is None and x.shape[1] > 1  # a single new token sees every cached one
        h = self.self_attn.attend(q, (k, v), x.shape[-1], causal=causal, dropout=p_attn)
        x = self.self_attn_norm(x + _drop(h, p, self.training))
        h = self.ende_attn(x, ende_kv, ende_heads, ende_mask, dropout=p_attn)
        x = self.ende_attn_norm(x + _drop(h, p, self.training))
        h, stats = self.moe(x, experts, top_k, capacity_factor=capacity_factor)
        return self.ffn_norm(x + _drop(h, p, self.training)), (k, v), stats


class Transformer(nn.Module):
    def __init__(self, *, shape: ArchConfig, args: ModelArgs):
        super().__init__()
        self.shape, self.args = shape, args
        enc_d, dec_d = shape.encoder_embed_dim, shape.decoder_embed_dim
        self.embed = SharedEmbedding(vocab_size=args.vocab_size, dim=max(enc_d, dec_d), pad_id=args.pad_id)
        self.encoder = nn.ModuleList(
            EncoderLayer(embed_dim=enc_d, qkv_dim=args.qkv_dim, ffn_dims=ffn) for ffn in shape.encoder_ffn
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(embed_dim=dec_d, encoder_dim=enc_d, qkv_dim=args.qkv_dim, ffn_dims=ffn)
            for ffn in shape.decoder_ffn
        )

    def _dropouts(self, dim: int) -> tuple[float, float]:
        if not self.training:
            return 0.0, 0.0
        ref = self.args.max_embed_dim
        return scaled_dropout(self.args.dropout, dim, ref), scaled_dropout(self.args.attention_dropout, dim, ref)

    def encode(self, src: torch.Tensor, arch: ArchConfig, capacity_factor: float | None = None) -> EncoderOut:
        """Source ids (B, S) -> the output of every encoder layer."""
        d = arch.encoder_embed_dim
        p, p_attn = self._dropouts(d)
        mask = padding_mask(src, self.args.pad_id)
        x = _drop(self.embed(src, d), p, self.training)
        states, stats = [], []
        for i in range(arch.encoder_layers):
            x, s = self.encoder[i](
                x, mask, arch.encoder_self_heads[i], arch.encoder_ffn[i], arch.top_k, p, p_attn, capacity_factor
            )
            states.append(x)
            stats.append(s)
        return EncoderOut(tuple(states), mask, tuple(stats))

    def decode(
        self,
        tgt: torch.Tensor,
        enc: EncoderOut,
        arch: ArchConfig,
        cache: DecoderCache | None = None,
        capacity_factor: float | None = None,
    ) -> tuple[torch.Tensor, DecoderCache, tuple[RouterStats | None, ...]]:
        """Target ids (B, t) -> logits (B, t, V). With a cache, `tgt` holds only new tokens."""
        d = arch.decoder_embed_dim
        p, p_attn = self._dropouts(d)
        start = 0 if cache is None else cache.length
        x = _drop(self.embed.embed(tgt, d, start), p, self.training)
        self_kv, ende_kv, stats = [], [], []
        for i in range(arch.decoder_layers):
            span, heads = arch.decoder_ende_span[i], arch.decoder_ende_heads[i]
            if cache is None:
                memory = torch.cat(enc.states[-span:], dim=1)  # (B, span * S, d_enc)
                kv = self.decoder[i].ende_attn.project_kv(memory, heads)
            else:
                kv = cache.ende_kv[i]
            ende_mask = enc.mask if span == 1 else enc.mask.repeat(1, 1, 1, span)  # (B, 1, 1, span * S)
            past = None if cache is None else cache.self_kv[i]
            x, new_kv, s = self.decoder[i](
                x,
                past,
                kv,
                ende_mask,
                arch.decoder_self_heads[i],
                heads,
                arch.decoder_ffn[i],
                arch.top_k,
                p,
                p_attn,
                capacity_factor,
            )
            self_kv.append(new_kv)
            ende_kv.append(kv)
            stats.append(s)
        logits = self.embed.logits(x)
        return logits, DecoderCache(tuple(self_kv), tuple(ende_kv), start + tgt.shape[1]), tuple(stats)

    def forward(self, src, tgt, arch: ArchConfig, capacity_factor: float | None = None):
        """Teacher-forced pass: logits (B, T, V) and the router stats of every layer."""
        enc = self.encode(src, arch, capacity_factor)
        logits, _, dec_stats = self.decode(tgt, enc, arch, capacity_factor=capacity_factor)
        return logits, enc.stats + dec_stats

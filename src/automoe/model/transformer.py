"""The encoder-decoder core shared by the SuperTransformer and the compact SubTransformer.

Post-LayerNorm Transformer (Vaswani et al.; `ModelArgs.pre_norm`: pre-LN with final
encoder and decoder norms) with sinusoidal positions, ReLU experts, one embedding table
for source, target and output, arbitrary encoder-decoder attention (each decoder layer
attends to the last 1, 2 or 3 encoder layers, concatenated along time) and a
Mixture-of-Experts FFN in every layer. The core is built at a `shape` (an ArchConfig:
the space's largest for the supernet, the arch itself for a compact model) and runs
any `arch` that fits inside it; the arch is an argument of every call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from automoe.model.attention import KV, Attention, padding_mask, split_heads
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
    pre_norm: bool = False  # False: post-LN (the paper's); True: pre-LN with final encoder/decoder norms
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
    """What incremental decoding keeps between steps: the keys/values of past target tokens
    (one buffer for all decoder layers, written in place and grown by doubling, so a step
    neither concatenates nor reallocates) and the encoder-decoder keys/values and masks.

    A cache is used once: `decode` and `reorder` write into its buffer and return the cache
    to use next (the old value must not be decoded from again)."""

    self_kv: torch.Tensor  # (L, 2, B, T_cap, qkv): keys, values of the first `length` positions
    ende_kv: tuple[KV, ...]
    ende_mask: tuple[torch.Tensor | None, ...]  # (B, 1, 1, span * S) per layer; None: no padding
    length: int  # target tokens already decoded
    spare: torch.Tensor | None = None  # a second buffer of self_kv's shape: reorder gathers into it

    @staticmethod
    def allocate(layers: int, batch: int, positions: int, qkv_dim: int, like: torch.Tensor) -> torch.Tensor:
        capacity = max(16, 1 << (positions - 1).bit_length())  # a power of two: few regrowths
        return like.new_empty(layers, 2, batch, capacity, qkv_dim)

    def with_room(self, new: int) -> DecoderCache:
        """This cache with room in its buffer for `new` more positions (grown if needed)."""
        kv, end = self.self_kv, self.length + new
        if end <= kv.shape[3]:
            return self
        grown = self.allocate(kv.shape[0], kv.shape[2], end, kv.shape[4], kv)
        grown[:, :, :, : self.length] = kv[:, :, :, : self.length]
        return dataclasses.replace(self, self_kv=grown, spare=None)

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> DecoderCache:
        """Row i continues row index[i]: one gather for every layer's keys and values, into
        the spare buffer (which then becomes the cache's). With `same_sources` (beam search:
        every row moves within its own sentence's beams) the encoder keys/values are already
        right."""
        t, kv = self.length, self.self_kv
        if same_sources and len(index) == kv.shape[2] and not kv.requires_grad:  # (out= does no autograd)
            spare = torch.empty_like(kv) if self.spare is None else self.spare
            torch.index_select(kv[:, :, :, :t], 2, index, out=spare[:, :, :, :t])  # (L, 2, B, t, qkv)
            return dataclasses.replace(self, self_kv=spare, spare=kv)
        if same_sources:
            return dataclasses.replace(self, self_kv=kv.index_select(2, index), spare=None)
        ende = tuple((k.index_select(0, index), v.index_select(0, index)) for k, v in self.ende_kv)
        masks = tuple(None if m is None else m.index_select(0, index) for m in self.ende_mask)
        return DecoderCache(kv.index_select(2, index), ende, masks, t)


def _drop(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout that costs nothing at inference (decoding runs this per layer per step)."""
    return F.dropout(x, p, training) if training and p > 0 else x


class EncoderLayer(nn.Module):
    def __init__(self, *, embed_dim: int, qkv_dim: int, ffn_dims: tuple[int, ...], pre_norm: bool = False):
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = Attention(query_dim=embed_dim, kv_dim=embed_dim, qkv_dim=qkv_dim)
        self.self_attn_norm = ElasticLayerNorm(dim=embed_dim)
        self.moe = MoE(embed_dim=embed_dim, ffn_dims=ffn_dims)
        self.ffn_norm = ElasticLayerNorm(dim=embed_dim)

    def forward(self, x, mask, heads, experts, top_k, p, p_attn, capacity_factor=None):
        pre = self.pre_norm  # pre-LN: normalise each sublayer's input; post-LN: its residual sum
        r = self.self_attn_norm(x) if pre else x
        q, k, v = (split_heads(t, heads) for t in self.self_attn.project_qkv(r))  # (B, H, T, Dh)
        h = self.self_attn.attend(q, (k, v), x.shape[-1], mask, dropout=p_attn)
        x = x + _drop(h, p, self.training)
        x = x if pre else self.self_attn_norm(x)
        keep = mask.reshape(x.shape[:2])  # (B, 1, 1, S) -> (B, S): padding is not routed
        h, stats = self.moe(self.ffn_norm(x) if pre else x, experts, top_k, capacity_factor=capacity_factor, keep=keep)
        x = x + _drop(h, p, self.training)
        return (x if pre else self.ffn_norm(x)), stats


class DecoderLayer(nn.Module):
    def __init__(
        self, *, embed_dim: int, encoder_dim: int, qkv_dim: int, ffn_dims: tuple[int, ...], pre_norm: bool = False
    ):
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = Attention(query_dim=embed_dim, kv_dim=embed_dim, qkv_dim=qkv_dim)
        self.self_attn_norm = ElasticLayerNorm(dim=embed_dim)
        self.ende_attn = Attention(query_dim=embed_dim, kv_dim=encoder_dim, qkv_dim=qkv_dim)
        self.ende_attn_norm = ElasticLayerNorm(dim=embed_dim)
        self.moe = MoE(embed_dim=embed_dim, ffn_dims=ffn_dims)
        self.ffn_norm = ElasticLayerNorm(dim=embed_dim)

    def forward(
        self,
        x,
        kv_buffer,
        start,
        ende_kv,
        ende_mask,
        heads,
        ende_heads,
        experts,
        top_k,
        p,
        p_attn,
        capacity_factor,
        keep,
    ):
        """x (B, t, d) target positions start..start+t-1. kv_buffer (2, B, T_cap, qkv), if
        given, holds the keys/values of the `start` earlier positions; this call adds its own.
        keep (B, t): the real (non-padding) target tokens, the only ones routed."""
        pre = self.pre_norm  # pre-LN: normalise each sublayer's input; post-LN: its residual sum
        q, k, v = self.self_attn.project_qkv(self.self_attn_norm(x) if pre else x)  # (B, t, qkv) each
        if kv_buffer is not None:
            if start and x.shape[1] != 1:
                raise ValueError("incremental decoding takes one new token per step")
            end = start + x.shape[1]
            kv_buffer[0, :, start:end], kv_buffer[1, :, start:end] = k, v
            k, v = kv_buffer[0, :, :end], kv_buffer[1, :, :end]  # views (B, end, qkv)
        causal = x.shape[1] > 1  # a single new token sees every cached one
        q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)  # (B, H, T, Dh)
        h = self.self_attn.attend(q, (k, v), x.shape[-1], causal=causal, dropout=p_attn)
        x = x + _drop(h, p, self.training)
        x = x if pre else self.self_attn_norm(x)
        h = self.ende_attn(self.ende_attn_norm(x) if pre else x, ende_kv, ende_heads, ende_mask, dropout=p_attn)
        x = x + _drop(h, p, self.training)
        x = x if pre else self.ende_attn_norm(x)
        h, stats = self.moe(self.ffn_norm(x) if pre else x, experts, top_k, capacity_factor=capacity_factor, keep=keep)
        x = x + _drop(h, p, self.training)
        return (x if pre else self.ffn_norm(x)), stats


class Transformer(nn.Module):
    def __init__(self, *, shape: ArchConfig, args: ModelArgs):
        super().__init__()
        self.shape, self.args = shape, args
        enc_d, dec_d = shape.encoder_embed_dim, shape.decoder_embed_dim
        self.embed = SharedEmbedding(vocab_size=args.vocab_size, dim=max(enc_d, dec_d), pad_id=args.pad_id)
        pre = args.pre_norm
        self.encoder = nn.ModuleList(
            EncoderLayer(embed_dim=enc_d, qkv_dim=args.qkv_dim, ffn_dims=ffn, pre_norm=pre) for ffn in shape.encoder_ffn
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(embed_dim=dec_d, encoder_dim=enc_d, qkv_dim=args.qkv_dim, ffn_dims=ffn, pre_norm=pre)
            for ffn in shape.decoder_ffn
        )
        # pre-LN: the final norms (every encoder state the decoder attends to goes through the encoder's)
        self.encoder_norm = ElasticLayerNorm(dim=enc_d) if pre else None
        self.decoder_norm = ElasticLayerNorm(dim=dec_d) if pre else None

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
            states.append(x if self.encoder_norm is None else self.encoder_norm(x))
            stats.append(s)
        return EncoderOut(tuple(states), mask, tuple(stats))

    def decode(
        self,
        tgt: torch.Tensor,
        enc: EncoderOut,
        arch: ArchConfig,
        cache: DecoderCache | None = None,
        capacity_factor: float | None = None,
        keep_cache: bool = True,
    ) -> tuple[torch.Tensor, DecoderCache | None, tuple[RouterStats | None, ...]]:
        """Target ids (B, t) -> logits (B, t, V) and the cache to continue from (None without
        `keep_cache`: teacher forcing). With a cache, `tgt` holds only the new token."""
        d, n_layers = arch.decoder_embed_dim, arch.decoder_layers
        p, p_attn = self._dropouts(d)
        start = 0 if cache is None else cache.length
        x = _drop(self.embed.embed(tgt, d, start), p, self.training)
        if cache is not None:
            cache = cache.with_room(tgt.shape[1])
            kv_buffer, ende_kv, ende_masks = cache.self_kv, cache.ende_kv, cache.ende_mask
        else:
            ende_kv, ende_masks = [], []
            for i in range(n_layers):
                span = arch.decoder_ende_span[i]
                memory = torch.cat(enc.states[-span:], dim=1)  # (B, span * S, d_enc)
                ende_kv.append(self.decoder[i].ende_attn.project_kv(memory, arch.decoder_ende_heads[i]))
                ende_masks.append(enc.mask if span == 1 else enc.mask.repeat(1, 1, 1, span))  # (B, 1, 1, span * S)
            if keep_cache and bool(enc.mask.all()):
                ende_masks = [None] * n_layers  # no padding: attention needs no mask
            shape = (n_layers, tgt.shape[0], tgt.shape[1], self.args.qkv_dim)
            kv_buffer = DecoderCache.allocate(*shape, like=x) if keep_cache else None
        keep = tgt != self.args.pad_id  # (B, t)
        stats = []
        for i in range(n_layers):
            x, s = self.decoder[i](
                x,
                None if kv_buffer is None else kv_buffer[i],
                start,
                ende_kv[i],
                ende_masks[i],
                arch.decoder_self_heads[i],
                arch.decoder_ende_heads[i],
                arch.decoder_ffn[i],
                arch.top_k,
                p,
                p_attn,
                capacity_factor,
                keep,
            )
            stats.append(s)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        logits = self.embed.logits(x)
        if keep_cache:
            spare = None if cache is None else cache.spare
            cache = DecoderCache(kv_buffer, tuple(ende_kv), tuple(ende_masks), start + tgt.shape[1], spare)
        return logits, cache, tuple(stats)

    def forward(self, src, tgt, arch: ArchConfig, capacity_factor: float | None = None):
        """Teacher-forced pass: logits (B, T, V) and the router stats of every layer."""
        enc = self.encode(src, arch, capacity_factor)
        logits, _, dec_stats = self.decode(tgt, enc, arch, None, capacity_factor, keep_cache=False)
        return logits, enc.stats + dec_stats

"""Analytic parameter and FLOP counts of a SubTransformer.

FLOPs count matrix products only (2 * M * N * K), like torch's FlopCounterMode, for one
sentence: a teacher-forced pass over `src_len` source and `tgt_len` target tokens (the
paper's 30 + 30). MoE FLOPs are *active* FLOPs: each token pays for the experts it is
routed to, from the actual routing when router statistics (one sentence) or expert loads
(a corpus) are given, else the expectation under uniform routing (top-k of equally likely
experts); active parameters likewise. Units: GFLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from automoe.model.moe import RouterStats
from automoe.space import ArchConfig


@dataclass(frozen=True)
class Counts:
    params_total: int  # every tensor of the compact model
    params_active: int  # used by one token (expected under the given loads, else uniform routing)
    params_total_no_embed: int
    params_active_no_embed: int
    gflops: float  # active, embeddings/output projection included
    gflops_no_embed: float  # without the output projection
    gflops_all_experts: float  # as if every token ran through every expert

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _attention(query_dim: int, kv_dim: int, qkv: int) -> int:
    return _linear(query_dim, qkv) + 2 * _linear(kv_dim, qkv) + _linear(qkv, query_dim)


def _expert(d: int, h: int) -> int:
    return _linear(d, h) + _linear(h, d)


def expert_shares(tokens_per_expert) -> np.ndarray:
    """Token-expert assignment counts -> each expert's share of them (sums to 1)."""
    counts = np.asarray(tokens_per_expert, dtype=np.float64)
    return counts / counts.sum()


def layer_name(i: int, encoder_layers: int) -> str:
    """`enc<i>` / `dec<j>` of the i-th layer in router-stats order (encoder layers first)."""
    return f"enc{i}" if i < encoder_layers else f"dec{i - encoder_layers}"


def _moe_params(d: int, experts: tuple[int, ...], top_k: int, load: np.ndarray | None = None) -> tuple[int, float]:
    """(all parameters, parameters one token uses in expectation: each of its top-k
    assignments goes to expert i with probability `load[i]`, else uniformly)."""
    router = len(experts) * d if len(experts) > 1 else 0
    total = router + sum(_expert(d, h) for h in experts)
    share = np.full(len(experts), 1 / len(experts)) if load is None else np.asarray(load, dtype=np.float64)
    active = router + min(top_k, len(experts)) * float(share @ [_expert(d, h) for h in experts])
    return total, active


def count(
    arch: ArchConfig,
    vocab_size: int,
    qkv_dim: int,
    src_len: int = 30,
    tgt_len: int = 30,
    routing: Sequence[RouterStats | None] | None = None,
    pre_norm: bool = False,
    loads: Sequence[np.ndarray | None] | None = None,
) -> Counts:
    """`routing`: the router stats of a batch-1 forward (encoder layers then decoder layers).
    `loads`: per layer (same order), the share of token-expert assignments each expert
    received over a corpus (sums to 1; None for a dense layer): FLOPs and active parameters
    at that routing. `pre_norm`: the model has the final encoder and decoder LayerNorms of pre-LN."""
    if routing is not None and loads is not None:
        raise ValueError("count: give router stats of one forward or loads over a corpus, not both")
    if routing is not None:  # one forward's routing is its loads (the counts of a 30 + 30 pass)
        loads = [None if s is None else expert_shares(s.tokens_per_expert) for s in routing]
    e, d, q, S, T = arch.encoder_embed_dim, arch.decoder_embed_dim, qkv_dim, src_len, tgt_len
    embed = vocab_size * max(e, d)
    fixed = embed + (2 * e + 2 * d if pre_norm else 0)  # parameters outside the experts
    total_experts, active_experts = 0, 0.0
    flops, flops_all = 0.0, 0.0
    n_layers = arch.encoder_layers + arch.decoder_layers
    shares = [None if x is None else np.asarray(x, dtype=np.float64) for x in loads] if loads else [None] * n_layers
    if len(shares) != n_layers:
        raise ValueError(f"count: {len(shares)} expert loads for {n_layers} layers")

    def moe_flops(dim: int, tokens: int, experts: tuple[int, ...], layer: int) -> float:
        n = len(experts)
        router = 2 * tokens * dim * n if n > 1 else 0
        share = shares[layer] if n > 1 and shares[layer] is not None else np.full(n, 1 / n)
        per_expert = tokens * min(arch.top_k, n) * share
        return router + sum(c * 4 * dim * h for c, h in zip(per_expert, experts, strict=True))

    for i, experts in enumerate(arch.encoder_ffn):
        fixed += _attention(e, e, q) + 4 * e  # two LayerNorms
        tot, act = _moe_params(e, experts, arch.top_k, shares[i])
        total_experts, active_experts = total_experts + tot, active_experts + act
        attn = 2 * S * e * q * 4 + 2 * 2 * S * S * q
        flops += attn + moe_flops(e, S, experts, i)
        flops_all += attn + 2 * S * e * len(experts) * (len(experts) > 1) + sum(4 * S * e * h for h in experts)

    for j, experts in enumerate(arch.decoder_ffn):
        memory = arch.decoder_ende_span[j] * S
        fixed += _attention(d, d, q) + _attention(d, e, q) + 6 * d
        tot, act = _moe_params(d, experts, arch.top_k, shares[arch.encoder_layers + j])
        total_experts, active_experts = total_experts + tot, active_experts + act
        self_attn = 2 * T * d * q * 4 + 2 * 2 * T * T * q
        ende = 2 * T * d * q * 2 + 2 * 2 * memory * e * q + 2 * 2 * T * memory * q
        flops += self_attn + ende + moe_flops(d, T, experts, arch.encoder_layers + j)
        flops_all += self_attn + ende + 2 * T * d * len(experts) * (len(experts) > 1)
        flops_all += sum(4 * T * d * h for h in experts)

    output = 2 * T * d * vocab_size
    total = fixed + total_experts
    active = fixed + active_experts
    return Counts(
        params_total=int(total),
        params_active=int(round(active)),
        params_total_no_embed=int(total - embed),
        params_active_no_embed=int(round(active - embed)),
        gflops=(flops + output) / 1e9,
        gflops_no_embed=flops / 1e9,
        gflops_all_experts=(flops_all + output) / 1e9,
    )


def per_token_flops(
    arch: ArchConfig, qkv_dim: int, src_len: int, tgt_len: int, vocab_size: int, routing: Sequence[RouterStats | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Active FLOPs of each source and each target token of a batch-1 forward: its
    projections, its share of attention, its router and the experts it was routed to
    (the adaptive-computation view: tokens sent to bigger experts cost more)."""
    e, d, q, S, T = arch.encoder_embed_dim, arch.decoder_embed_dim, qkv_dim, src_len, tgt_len
    src = np.zeros(S)
    tgt = np.zeros(T)

    def add_moe(out: np.ndarray, dim: int, experts: tuple[int, ...], layer_stats: RouterStats | None) -> None:
        if len(experts) == 1 or layer_stats is None:
            out += min(arch.top_k, len(experts)) * float(np.mean([4 * dim * h for h in experts]))
            return
        out += 2 * dim * len(experts)
        chosen = layer_stats.expert_index.cpu().numpy()  # (tokens, k)
        sizes = np.asarray(experts)
        out += (4 * dim * sizes[chosen]).sum(axis=1)

    for i, experts in enumerate(arch.encoder_ffn):
        src += 2 * e * q * 4 + 2 * 2 * S * q
        add_moe(src, e, experts, routing[i])
    for j, experts in enumerate(arch.decoder_ffn):
        memory = arch.decoder_ende_span[j] * S
        tgt += 2 * d * q * 4 + 2 * 2 * T * q + 2 * d * q * 2 + 2 * 2 * memory * q
        tgt += 2 * 2 * memory * e * q / T  # the encoder memory projection, shared by the target tokens
        add_moe(tgt, d, experts, routing[arch.encoder_layers + j])
    tgt += 2 * d * vocab_size
    return src, tgt

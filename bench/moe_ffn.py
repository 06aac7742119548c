"""Heterogeneous top-1 MoE FFN vs a dense FFN with the same active FLOPs per token.

4096 tokens, d = 512, forward + backward. Goal: MoE time / dense time <= 1.10.
    python bench/moe_ffn.py [--json out.json]
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved, report, setup

from automoe.model.moe import MoE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--experts", default="3072,2048,1024,2048")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()
    setup()
    torch.manual_seed(0)
    sizes = tuple(int(s) for s in args.experts.split(","))
    moe = MoE(embed_dim=args.dim, ffn_dims=sizes)
    x = torch.randn(args.tokens, args.dim, requires_grad=True)
    with torch.no_grad():
        _, stats = moe(x, sizes, top_k=1)
    counts = stats.tokens_per_expert.tolist()
    active_hidden = sum(c * h for c, h in zip(counts, sizes, strict=True)) / args.tokens
    dense_hidden = round(active_hidden)
    dense = MoE(embed_dim=args.dim, ffn_dims=(dense_hidden,))

    def run_moe():
        y, _ = moe(x, sizes, top_k=1)
        y.sum().backward()

    def run_dense():
        y, _ = dense(x, (dense_hidden,))
        y.sum().backward()

    t = interleaved({"moe": run_moe, "dense": run_dense}, repeats=args.repeats)
    report(
        "moe_ffn",
        {
            "tokens": args.tokens,
            "dim": args.dim,
            "active_hidden": active_hidden,
            "dense_hidden": dense_hidden,
            "moe_ms": t["moe"] * 1e3,
            "dense_ms": t["dense"] * 1e3,
            "ratio_moe_over_dense": t["moe"] / t["dense"],
        },
        args.json,
    )


if __name__ == "__main__":
    main()

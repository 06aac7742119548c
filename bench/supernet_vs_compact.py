"""Supernet forward+backward with an arch vs the extracted compact model of the same arch.

Goal: supernet throughput / compact throughput >= 0.9 (weight slicing must be cheap).
    python bench/supernet_vs_compact.py [--space small] [--json out.json]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from common import interleaved, report, setup

from automoe.model.subnet import extract
from automoe.model.supernet import SuperTransformer
from automoe.model.transformer import ModelArgs
from automoe.space import load_space


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--space", default="small")
    parser.add_argument("--archs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    setup()
    space = load_space(args.space)
    torch.manual_seed(0)
    net = SuperTransformer(
        space=space,
        args=ModelArgs(vocab_size=args.vocab, qkv_dim=space.qkv_dim, max_embed_dim=max(space.encoder_embed_dim)),
    )
    rng = np.random.default_rng(0)
    src = torch.randint(4, args.vocab, (args.batch, args.length))
    tgt = torch.randint(4, args.vocab, (args.batch, args.length))
    tokens = args.batch * args.length * 2
    ratios, rows = [], {}
    for i in range(args.archs):
        arch = space.sample(rng)
        sub = extract(net, arch).train()

        def step(model, a):
            def run():
                logits, _ = model(src, tgt, a)
                F.cross_entropy(logits.flatten(0, 1), tgt.flatten()).backward()

            return run

        t = interleaved({"supernet": step(net.train(), arch), "compact": step(sub, None)}, repeats=args.repeats)
        ratios.append(t["compact"] / t["supernet"])  # throughput ratio supernet / compact
        rows[f"arch{i}_supernet_tok_s"] = tokens / t["supernet"]
        rows[f"arch{i}_compact_tok_s"] = tokens / t["compact"]
    rows["throughput_ratio_supernet_over_compact"] = float(np.median(ratios))
    report("supernet_vs_compact", rows, args.json)


if __name__ == "__main__":
    main()

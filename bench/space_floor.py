"""The floor of the `small` space: its fastest arch (`space.smallest()`: d=192, 2+1 layers,
FFN 256) against the d=256 3+3 dense reference (`space.largest_dense()`), timed as
measure_latency times them (batch 1, beam 5, a 30-token source, 30 decoder steps, the
models alternating run by run), on the compiled decoder and on the Python path, fp32 and
int8. A relative budget below this ratio is infeasible in that space on that engine.
Random weights (latency does not depend on their values), a 5k vocabulary (Multi30k's).
    python bench/space_floor.py [--json out.json]
"""

from __future__ import annotations

import argparse
import os

import torch
from common import report, setup

from automoe.latency.measure import measure_many
from automoe.model import compiled
from automoe.model.subnet import extract
from automoe.model.supernet import SuperTransformer
from automoe.model.transformer import ModelArgs
from automoe.space import load_space

VOCAB = 5000


def step_weights(model) -> int:
    """Weights one incremental step reads: the decoder's layers and the output projection."""
    d = model.arch.decoder_embed_dim
    layers = sum(
        p.numel()
        for i in range(model.arch.decoder_layers)
        for name, p in model.core.decoder[i].named_parameters()
        if not name.startswith(("ende_attn.k_proj", "ende_attn.v_proj"))  # projected once, at the first step
    )
    return layers + model.args.vocab_size * d


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    setup()
    space = load_space("small")
    torch.manual_seed(0)
    net = SuperTransformer(space=space, args=ModelArgs(vocab_size=VOCAB, qkv_dim=space.qkv_dim, max_embed_dim=256))
    reference, fastest = extract(net.eval(), space.largest_dense()), extract(net.eval(), space.smallest())
    g = torch.Generator().manual_seed(1)
    sources = torch.randint(4, VOCAB, (8, 30), generator=g)
    sources[:, -1] = 3
    rows: dict[str, float | str] = {
        # what a batch-1 step must read: every decoder weight and the output projection. At 5
        # rows the products are bound by memory bandwidth, so this ratio is the floor's floor
        "step_weights_ratio_fastest_over_reference": step_weights(fastest) / step_weights(reference),
    }
    for engine in ("compiled", "python"):
        if engine == "python":
            os.environ["AUTOMOE_DECODER"] = "off"
        compiled.reset()
        if engine == "compiled" and not compiled.active():
            raise SystemExit("the compiled decoder is not built: make install")
        for precision in ("fp32", "int8"):
            ref, fast = measure_many([reference, fastest], sources, repeats=args.repeats, precision=precision)
            rows[f"{engine}_{precision}_reference_ms"] = ref.total_ms
            rows[f"{engine}_{precision}_fastest_ms"] = fast.total_ms
            rows[f"{engine}_{precision}_ratio_fastest_over_reference"] = fast.total_ms / ref.total_ms
    os.environ.pop("AUTOMOE_DECODER", None)
    compiled.reset()
    report("space_floor", rows, args.json)


if __name__ == "__main__":
    main()

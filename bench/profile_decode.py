"""Where batch-1 decoding time goes: torch.profiler over the paper's latency protocol
(beam 5, 30-token source, 30 decoder steps) of the translate_vs_marian model: plain eager,
the serving layout on the Python path (fused steps) and on the compiled decoder. Prints the
top operators and the share of time in GEMMs vs everything else (per-step operator and
Python overhead).
    python bench/profile_decode.py [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import report, setup
from torch.profiler import ProfilerActivity, profile
from translate_vs_marian import VOCAB, ours

from automoe.model.decode import beam_search
from automoe.model.inference import for_inference

GEMM = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    setup()
    torch.manual_seed(0)
    plain = ours()
    src = torch.randint(4, VOCAB, (1, 30))
    src[:, -1] = 3
    rows = {}
    served = for_inference(plain)
    python = copy.copy(served)  # the same serving layout on the Python path (fused steps)
    python.compiled = None
    variants = [("plain", plain), ("serving", python)]
    if served.compiled is not None:
        variants.append(("compiled", served))
    for name, model in variants:

        def run(m=model):
            beam_search(m, src, beam=5, max_len_a=0.0, max_len_b=29, min_len=29)

        for _ in range(3):
            run()
        t0 = time.perf_counter()
        for _ in range(args.runs):
            run()
        wall = (time.perf_counter() - t0) / args.runs * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.runs):
                run()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM)
        calls = sum(e.count for e in events) / args.runs
        print(f"\n== {name}: {wall:.1f} ms per decode (no profiler), {calls:.0f} operator calls per decode")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
            share = 100 * e.self_cpu_time_total / total
            print(f"  {e.key:<52} {share:5.1f}%  {e.count / args.runs:6.0f} calls")
        rows |= {
            f"{name}_ms": wall,
            f"{name}_gemm_share_pct": 100 * gemm / total,
            f"{name}_op_calls_per_decode": calls,
            f"{name}_non_gemm_ms": wall * (1 - gemm / total),
        }
    rows["speedup_serving_over_plain"] = rows["plain_ms"] / rows["serving_ms"]
    if "compiled_ms" in rows:
        rows["speedup_compiled_over_python"] = rows["serving_ms"] / rows["compiled_ms"]
    report("profile_decode", rows, args.json)


if __name__ == "__main__":
    main()

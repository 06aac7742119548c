"""Whether a searched model keeps its budget on the routing it is served with, and if not,
the tighter budget its search is run again with.

    python configs/experiments/multi30k_fair/budget_retry.py OUT/evaluate_NAME.json
        --budget 0.5 --fraction 0.5 --slack 0.02 --metrics OUT/budget_NAME.json

A search confirms its winner on measurement with the supernet's routing; fine-tuning moves
the routers (BENCHMARKS.md section 3: MoE winners measured up to 9% slower after it). The
rule, the same for every arm: the fine-tuned model's latency relative to the reference,
measured by evaluate in alternating rounds on validation sources, must be at most
`budget * (1 + slack)`. Where it is not, the search runs again (same seed) at the fraction it
used scaled by the overshoot, `fraction * budget / ratio` (a negative slack is a margin: then
the aim is `budget * (1 + slack)`), and the new winner is fine-tuned and evaluated alike.
Writes {"ratio", "budget", "slack", "fraction", "over", "next_fraction"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from automoe.io import atomic_write_json


def decide(ratio: float, budget: float, fraction: float, slack: float) -> dict:
    """The verdict on one fine-tuned model: over its budget or not, and the next search's fraction."""
    if not (ratio > 0 and budget > 0 and fraction > 0 and slack > -1):
        raise ValueError(f"ratio {ratio}, budget {budget}, fraction {fraction} and slack {slack} must be positive")
    limit = budget * (1 + slack)
    over = ratio > limit
    aim = min(budget, limit)  # the budget itself; a negative slack is a margin under it
    return {
        "ratio": ratio,
        "budget": budget,
        "slack": slack,
        "fraction": fraction,
        "over": over,
        "next_fraction": fraction * aim / ratio if over else None,
    }


def measured_ratio(evaluation: Path) -> float:
    """The searched model's latency over the reference's, measured in the same rounds (as the report)."""
    m = json.loads(evaluation.read_text())
    return m["searched_latency_ms"] / m["dense_latency_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluation", type=Path, help="evaluate's metrics of the searched model")
    parser.add_argument("--budget", type=float, required=True, help="the budget, a fraction of the reference")
    parser.add_argument("--fraction", type=float, required=True, help="the fraction this model's search used")
    parser.add_argument("--slack", type=float, default=0.02, help="measured may exceed the budget by this fraction")
    parser.add_argument("--metrics", type=Path, required=True, help="where the verdict is written")
    args = parser.parse_args()
    try:
        verdict = decide(measured_ratio(args.evaluation), args.budget, args.fraction, args.slack)
    except (OSError, KeyError, ValueError, ZeroDivisionError) as e:
        sys.exit(f"budget_retry: {args.evaluation}: {e}")
    atomic_write_json(args.metrics, verdict)
    then = f"search again at {verdict['next_fraction']:.4f}" if verdict["over"] else "within budget"
    print(f"budget_retry: {args.evaluation.name}: {verdict['ratio']:.3f}x against {args.budget:.4f}: {then}")


if __name__ == "__main__":
    main()

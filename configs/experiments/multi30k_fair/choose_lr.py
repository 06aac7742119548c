"""The fine-tuning LR a family uses: the sweep run with the lowest validation loss.

    python configs/experiments/multi30k_fair/choose_lr.py OUT/sweep/FAMILY --metrics OUT/lr_FAMILY.json

Every folder `lr<LR>` under the sweep folder is one retrain of the family's first model at
that LR (the recipe otherwise, the same updates for every LR); the rule is the same for the
dense reference and every searched model: the lowest best validation loss, ties to the
smaller LR. A choice at either end of what was swept is not a choice: `extend` names the LR
to sweep next (half the lowest, twice the highest), null when the choice is inside what was
swept, or when `--max-extend` LRs beyond the `--grid` were swept already.
Writes {"lr": chosen, "valid_loss": {LR: loss}, "extend": next LR or null} to --metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from automoe.io import atomic_write_json


def choose(sweep: Path, grid: tuple[float, ...] | None = None, max_extend: int = 2) -> dict:
    losses = {}
    for metrics in sorted(sweep.glob("lr*/metrics.json")):
        lr = float(metrics.parent.name.removeprefix("lr"))
        losses[lr] = float(json.loads(metrics.read_text())["best_valid_loss"])
    if not losses:
        raise ValueError(f"{sweep}: no finished sweep run (lr*/metrics.json)")
    lr = min(sorted(losses), key=lambda x: losses[x])
    extend = lr / 2 if lr == min(losses) else lr * 2 if lr == max(losses) else None
    if len(losses) < 2 or (grid is not None and len(set(losses) - set(grid)) >= max_extend):
        extend = None  # one LR chooses nothing; or as far beyond the grid as allowed
    return {"lr": lr, "valid_loss": {str(k): v for k, v in sorted(losses.items())}, "extend": extend}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="OUT/sweep/FAMILY")
    parser.add_argument("--metrics", type=Path, required=True, help="where the choice is written")
    parser.add_argument("--grid", type=float, nargs="+", help="the LRs the design sweeps (LR_GRID)")
    parser.add_argument("--max-extend", type=int, default=2, help="LRs beyond the grid to sweep at most")
    args = parser.parse_args()
    try:
        chosen = choose(args.sweep, tuple(args.grid) if args.grid else None, args.max_extend)
    except ValueError as e:
        sys.exit(f"choose_lr: {e}")
    if not (args.metrics.is_file() and json.loads(args.metrics.read_text()) == chosen):
        atomic_write_json(args.metrics, chosen)  # unchanged: left alone (the report is redone on a newer one)
    edge = f"; at the grid's end: sweep {chosen['extend']:g} next" if chosen["extend"] else ""
    print(f"choose_lr: {args.sweep.name}: lr {chosen['lr']} (validation loss by LR: {chosen['valid_loss']}){edge}")


if __name__ == "__main__":
    main()

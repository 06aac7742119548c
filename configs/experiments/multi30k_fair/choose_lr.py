"""The fine-tuning LR a family uses: the sweep run with the lowest validation loss.

    python configs/experiments/multi30k_fair/choose_lr.py OUT/sweep/FAMILY --metrics OUT/lr_FAMILY.json

Every folder `lr<LR>` under the sweep folder is one retrain of the family's first model at
that LR (the recipe otherwise, the same updates for every LR); the rule is the same for the
dense reference and every searched model: the lowest best validation loss, ties to the
smaller LR. Writes {"lr": chosen, "valid_loss": {LR: loss}} to --metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from automoe.io import atomic_write_json


def choose(sweep: Path) -> dict:
    losses = {}
    for metrics in sorted(sweep.glob("lr*/metrics.json")):
        lr = float(metrics.parent.name.removeprefix("lr"))
        losses[lr] = float(json.loads(metrics.read_text())["best_valid_loss"])
    if not losses:
        raise ValueError(f"{sweep}: no finished sweep run (lr*/metrics.json)")
    lr = min(sorted(losses), key=lambda x: losses[x])
    return {"lr": lr, "valid_loss": {str(k): v for k, v in sorted(losses.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="OUT/sweep/FAMILY")
    parser.add_argument("--metrics", type=Path, required=True, help="where the choice is written")
    args = parser.parse_args()
    try:
        chosen = choose(args.sweep)
    except ValueError as e:
        sys.exit(f"choose_lr: {e}")
    atomic_write_json(args.metrics, chosen)
    print(f"choose_lr: {args.sweep.name}: lr {chosen['lr']} (validation loss by LR: {chosen['valid_loss']})")


if __name__ == "__main__":
    main()

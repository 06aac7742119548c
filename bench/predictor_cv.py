"""Latency predictors compared by k-fold cross-validation on a measured latency table.

Every row is predicted once, by a predictor fitted without it (15% of the other rows
held out for the MLP's early stopping, as the stage does): the paper's MLP and the
linear model (`train_predictor.fit.layers: 0`), both over `automoe.space.FEATURE_NAMES`.

    python bench/predictor_cv.py --latency results/latency --folds 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from automoe.latency.predictor import FitConfig, fit, scores
from automoe.latency.table import load_space_of, read_table
from automoe.space import ArchConfig, arch_features

PREDICTORS = {
    "paper's MLP, 3 x 400": FitConfig(),
    "linear (ridge 1e-3)": FitConfig(layers=0, weight_decay=1e-3),
}


def cross_validate(x: np.ndarray, y: np.ndarray, cfg: FitConfig, folds: int, seed: int = 0) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(y))
    predicted = np.empty(len(y))
    for k in range(folds):
        test = order[k::folds]
        rest = np.setdiff1d(order, test)
        n_valid = max(1, int(0.15 * len(rest)))
        valid, train = rest[:n_valid], rest[n_valid:]
        predictor = fit(x[train], y[train], x[valid], y[valid], cfg, "cv", {})
        predicted[test] = predictor.predict_features(x[test])
    return predicted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=Path, required=True, help="measure_latency output folder")
    p.add_argument("--folds", type=int, default=8)
    a = p.parse_args()
    rows, _ = read_table(a.latency)
    load_space_of(a.latency)  # the table's own space: refuses a folder without one
    archs = [ArchConfig.from_dict(json.loads(r["arch"])) for r in rows]
    x = np.stack([arch_features(arch) for arch in archs])
    y = np.array([r["latency_ms"] for r in rows])
    print(f"{len(rows)} measured archs, {y.min():.1f}-{y.max():.1f} ms, {a.folds}-fold cross-validation\n")
    print("| predictor | MAPE | R² | Kendall's tau |\n|---|---|---|---|")
    for name, cfg in PREDICTORS.items():
        s = scores(y, cross_validate(x, y, cfg, a.folds))
        print(f"| {name} | {s['mape_pct']:.2f}% | {s['r2']:.3f} | {s['kendall_tau']:.3f} |")


if __name__ == "__main__":
    main()

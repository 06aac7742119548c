"""train_predictor: fit the MLP latency predictor on the measured latency table.

Splits the rows (seeded) into train / valid / test, standardises features and targets,
trains with Adam on MSE keeping the best validation epoch, and reports RMSE (ms), MAPE,
R² and Kendall's tau on the held-out test rows. Output folder: `predictor.pt` (weights,
feature names, normalisation, search-space hash, hardware), `predictions.csv` (DVC
plot), `predicted_vs_measured.png`, `metrics.json`, and the table's `kernels.json`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from automoe.config import load_section
from automoe.errors import DataError
from automoe.io import atomic_write_json, atomic_write_text, staged_dir
from automoe.latency.predictor import FitConfig, fit, scores
from automoe.latency.table import arch_key, load_space_of, read_table
from automoe.model import kernels
from automoe.plots import figure
from automoe.space import ArchConfig, arch_features
from automoe.stages._cli import cli_run, component_run, guarded, html_images, stage_parser

NAME = "train_predictor"
ARTIFACTS = ["predicted_vs_measured.png", "predictions.csv"]  # logged to MLflow


@dataclass(frozen=True)
class TrainPredictorConfig:
    fit: FitConfig = field(default_factory=FitConfig)
    valid_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 1

    def __post_init__(self) -> None:
        if not (
            0 < self.valid_fraction < 1 and 0 < self.test_fraction < 1 and self.valid_fraction + self.test_fraction < 1
        ):
            raise ValueError("valid_fraction and test_fraction must be in (0, 1) and sum to less than 1")


@dataclass(frozen=True)
class TrainPredictorInputs:
    latency: Path  # measure_latency output folder


def split(n: int, cfg: TrainPredictorConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_test, n_valid = max(1, round(n * cfg.test_fraction)), max(1, round(n * cfg.valid_fraction))
    return order[n_test + n_valid :], order[n_test : n_test + n_valid], order[:n_test]


def run(cfg: TrainPredictorConfig, inputs: TrainPredictorInputs, out_dir: Path) -> dict[str, float]:
    rows, hardware = read_table(inputs.latency)
    space = load_space_of(inputs.latency)
    if len(rows) < 10:
        raise DataError(f"{inputs.latency}: {len(rows)} measured archs are too few to fit a predictor (need >= 10)")
    archs = [ArchConfig.from_dict(json.loads(r["arch"])) for r in rows]
    x = np.stack([arch_features(a) for a in archs])
    y = np.array([r["latency_ms"] for r in rows])
    train_idx, valid_idx, test_idx = split(len(rows), cfg)
    predictor = fit(x[train_idx], y[train_idx], x[valid_idx], y[valid_idx], cfg.fit, space.digest(), hardware)
    predictor.measured = {arch_key(a): float(ms) for a, ms in zip(archs, y, strict=True)}
    predicted = predictor.predict_features(x)
    metrics = {f"test_{k}": v for k, v in scores(y[test_idx], predicted[test_idx]).items()}
    metrics |= {f"train_{k}": v for k, v in scores(y[train_idx], predicted[train_idx]).items() if k != "kendall_tau"}
    metrics["rows"] = float(len(rows))
    with staged_dir(out_dir) as tmp:
        predictor.save(tmp / "predictor.pt", metrics)
        plan = inputs.latency / kernels.PLAN_FILE
        if plan.is_file():  # the engine the table was timed with travels on to the search's confirmation
            shutil.copyfile(plan, tmp / kernels.PLAN_FILE)
        part = np.empty(len(rows), dtype=object)
        part[train_idx], part[valid_idx], part[test_idx] = "train", "valid", "test"
        lines = ["arch_id,split,measured_ms,predicted_ms"] + [
            f"{r['arch_id']},{part[i]},{y[i]:.4f},{predicted[i]:.4f}" for i, r in enumerate(rows)
        ]
        atomic_write_text(tmp / "predictions.csv", "\n".join(lines) + "\n")
        scatter(tmp / "predicted_vs_measured.png", y, predicted, part, metrics)
        atomic_write_json(tmp / "metrics.json", metrics)
    return metrics


def scatter(path: Path, measured: np.ndarray, predicted: np.ndarray, part: np.ndarray, metrics: dict) -> None:
    with figure(path, size=(5.5, 5)) as ax:
        for name, marker in (("train", "."), ("valid", "s"), ("test", "o")):
            sel = part == name
            ax.scatter(measured[sel], predicted[sel], marker=marker, label=name, alpha=0.7)
        lo, hi = float(min(measured.min(), predicted.min())), float(max(measured.max(), predicted.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("measured latency (ms)")
        ax.set_ylabel("predicted latency (ms)")
        ax.set_title(f"test: MAPE {metrics['test_mape_pct']:.1f}%, R² {metrics['test_r2']:.3f}")
        ax.legend()


def load_config(params: Any, overrides: Any = None) -> TrainPredictorConfig:
    return load_section(TrainPredictorConfig, NAME, params, overrides)


@guarded
def main(argv: list[str] | None = None) -> None:
    """automoe train_predictor --latency results/latency --out models/predictor"""
    parser = stage_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--latency", required=True, type=Path, help="measure_latency output folder")
    args = parser.parse_args(argv)
    cli_run(NAME, load_config, args, lambda cfg, _: run(cfg, TrainPredictorInputs(args.latency), args.out), ARTIFACTS)


def component_main(
    params: str,
    overrides: list,
    latency_path: str,
    out_path: str,
    metrics: Any,
    plot_path: str = "",
) -> None:
    component_run(
        NAME,
        load_config,
        params,
        overrides,
        out_path,
        lambda cfg, _: run(cfg, TrainPredictorInputs(Path(latency_path)), Path(out_path)),
        ARTIFACTS,
        metrics,
    )
    if plot_path:
        png = Path(out_path) / "predicted_vs_measured.png"
        Path(plot_path).write_text(html_images("Predicted vs measured latency", [png]))

"""The latency predictor: an MLP over architecture features (HAT: 3 hidden layers of 400,
Adam, MSE), or with `layers: 0` a linear model over the same features fitted in closed
form (least squares, `weight_decay` as the ridge penalty), which generalises better from
the ~100 measured archs a CPU run affords. The saved file describes itself: feature
names, normalisation, the hash of the search space it was trained for, the hardware it
predicts and the table's measured latencies (so a budget relative to the dense baseline
uses the baseline's measured latency)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from automoe.errors import AutomoeError
from automoe.latency.table import arch_key
from automoe.model import artifact
from automoe.space import FEATURE_NAMES, ArchConfig, SearchSpace, arch_features

FORMAT = "automoe.latency_predictor/1"


def mlp(n_in: int, hidden: int, layers: int) -> nn.Sequential:
    dims = [n_in] + [hidden] * layers
    blocks: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        blocks += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(dims[-1], 1))


@dataclass
class LatencyPredictor:
    net: nn.Sequential
    feature_names: tuple[str, ...]
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float
    y_std: float
    space_digest: str
    hardware: dict
    hidden: int = 400
    layers: int = 3
    measured: dict[str, float] = field(default_factory=dict)  # arch key -> the table's latency (ms)

    def reference_ms(self, arch: ArchConfig) -> float:
        """The latency of an arch the table measured (a budget's reference), else the prediction."""
        measured = self.measured.get(arch_key(arch))
        return float(measured) if measured is not None else float(self.predict([arch])[0])

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        """Feature rows (N, F) -> latency in ms (N,)."""
        z = torch.as_tensor((np.atleast_2d(x) - self.x_mean) / self.x_std, dtype=torch.float32)
        with torch.no_grad():
            y = self.net(z).squeeze(-1).numpy()
        return y * self.y_std + self.y_mean

    def predict(self, archs: list[ArchConfig]) -> np.ndarray:
        return self.predict_features(np.stack([arch_features(a) for a in archs]))

    def check_space(self, space: SearchSpace, what: str = "latency predictor") -> None:
        if space.digest() != self.space_digest:
            raise AutomoeError(
                f"{what}: trained for another search space (hash {self.space_digest}), "
                f"not {space.name!r} (hash {space.digest()}); retrain the predictor"
            )

    def save(self, path: Path | str, metrics: dict[str, float] | None = None) -> None:
        artifact.save(
            path,
            FORMAT,
            {
                "feature_names": list(self.feature_names),
                "x_mean": self.x_mean.tolist(),
                "x_std": self.x_std.tolist(),
                "y_mean": self.y_mean,
                "y_std": self.y_std,
                "space_digest": self.space_digest,
                "hardware": dict(self.hardware),
                "hidden": self.hidden,
                "layers": self.layers,
                "metrics": dict(metrics or {}),
                "measured": dict(self.measured),
                "state_dict": artifact.cpu_state(self.net),
            },
        )

    @classmethod
    def load(cls, path: Path | str) -> LatencyPredictor:
        p = artifact.load(path, FORMAT)
        if tuple(p["feature_names"]) != FEATURE_NAMES:
            raise AutomoeError(f"{path}: made with other features ({len(p['feature_names'])}); retrain the predictor")
        net = mlp(len(FEATURE_NAMES), p["hidden"], p["layers"])
        net.load_state_dict(p["state_dict"])
        return cls(
            net.eval(),
            tuple(p["feature_names"]),
            np.asarray(p["x_mean"]),
            np.asarray(p["x_std"]),
            float(p["y_mean"]),
            float(p["y_std"]),
            p["space_digest"],
            p["hardware"],
            p["hidden"],
            p["layers"],
            dict(p.get("measured", {})),
        )


@dataclass(frozen=True)
class FitConfig:
    hidden: int = 400
    layers: int = 3  # hidden layers; 0: a linear model, fitted in closed form
    lr: float = 1e-3
    epochs: int = 2000
    batch_size: int = 128
    weight_decay: float = 0.0  # Adam's weight decay; the ridge penalty of the linear model
    seed: int = 1

    def __post_init__(self) -> None:
        if self.layers < 0 or (self.layers and self.hidden < 1) or self.weight_decay < 0:
            raise ValueError("layers must be >= 0, hidden >= 1 when layers > 0, weight_decay >= 0")


def fit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    cfg: FitConfig,
    space_digest: str,
    hardware: dict,
) -> LatencyPredictor:
    """Adam on MSE of standardised targets, keeping the weights with the lowest validation
    MSE; with `layers == 0`, the linear least-squares solution on the training rows."""
    x_mean, x_std = x_train.mean(0), x_train.std(0)
    x_std = np.where(x_std > 0, x_std, 1.0)  # a feature constant in this space carries no information
    y_mean, y_std = float(y_train.mean()), float(y_train.std() or 1.0)
    if cfg.layers == 0:
        net = _least_squares((x_train - x_mean) / x_std, (y_train - y_mean) / y_std, cfg.weight_decay)
        return LatencyPredictor(net, FEATURE_NAMES, x_mean, x_std, y_mean, y_std, space_digest, hardware, 0, 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = mlp(x_train.shape[1], cfg.hidden, cfg.layers)
    xt = torch.as_tensor((x_train - x_mean) / x_std, dtype=torch.float32)
    yt = torch.as_tensor((y_train - y_mean) / y_std, dtype=torch.float32)
    xv = torch.as_tensor((x_valid - x_mean) / x_std, dtype=torch.float32)
    yv = torch.as_tensor((y_valid - y_mean) / y_std, dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state = float("inf"), None
    for _ in range(cfg.epochs):
        net.train()
        for idx in torch.randperm(len(xt), generator=gen).split(cfg.batch_size):
            loss = nn.functional.mse_loss(net(xt[idx]).squeeze(-1), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            valid = float(nn.functional.mse_loss(net(xv).squeeze(-1), yv)) if len(xv) else float(loss)
        if valid < best:
            best, best_state = valid, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return LatencyPredictor(
        net.eval(), FEATURE_NAMES, x_mean, x_std, y_mean, y_std, space_digest, hardware, cfg.hidden, cfg.layers
    )


def _least_squares(x: np.ndarray, y: np.ndarray, ridge: float) -> nn.Sequential:
    """min ||x w + b - y||² / n + ridge ||w||² on standardised data, as a one-layer net."""
    n, f = x.shape
    a = np.c_[x, np.ones(n)]
    penalty = ridge * n * np.diag([1.0] * f + [0.0])  # the intercept is not penalised
    w = np.linalg.lstsq(a.T @ a + penalty, a.T @ y, rcond=None)[0]
    net = mlp(f, 0, 0)
    with torch.no_grad():
        net[0].weight.copy_(torch.as_tensor(w[:f], dtype=torch.float32)[None])
        net[0].bias.fill_(float(w[f]))
    return net.eval()


def scores(measured: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """RMSE (ms), MAPE (%), R² and Kendall's tau of predictions against measurements."""
    from scipy.stats import kendalltau

    err = predicted - measured
    ss_res = float((err**2).sum())
    ss_tot = float(((measured - measured.mean()) ** 2).sum()) or 1e-12
    return {
        "rmse_ms": float(np.sqrt((err**2).mean())),
        "mape_pct": float(np.mean(np.abs(err) / np.abs(measured)) * 100),
        "r2": 1.0 - ss_res / ss_tot,
        "kendall_tau": float(kendalltau(measured, predicted).statistic),
    }

"""Learning-rate schedules as pure functions of the update count."""

from __future__ import annotations

import math


def learning_rate(update: int, *, peak: float, warmup: int, total: int, kind: str, final: float = 0.0) -> float:
    """Linear warmup to `peak`, then cosine decay to `final` at `total` (or inverse sqrt)."""
    if warmup > 0 and update < warmup:
        return peak * (update + 1) / warmup
    if kind == "cosine":
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "inverse_sqrt":
        return peak * math.sqrt(max(1, warmup) / (update + 1))
    raise ValueError(f"unknown schedule {kind!r}")

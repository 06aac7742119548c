"""Plots people look at (training curves, Pareto front, predicted vs measured latency)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def figure(path: Path, size: tuple[float, float] = (6.5, 4.5), dpi: int = 110) -> Iterator:
    """Yield matplotlib axes; on exit, lay out and write a PNG atomically (temp file + rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, dpi=dpi, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)

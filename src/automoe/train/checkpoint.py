"""Checkpoints: atomic (temp file, fsync, rename), last N kept plus the best, the newest
readable one used on resume (a corrupt file is reported and an older one taken)."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Any

import torch

from automoe.errors import AutomoeError
from automoe.io import atomic_write_bytes

PATTERN = re.compile(r"checkpoint_(\d{7})\.pt$")
BEST = "checkpoint_best.pt"


def _name(update: int) -> str:
    return f"checkpoint_{update:07d}.pt"


def save(folder: Path, update: int, payload: dict[str, Any], keep_last: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = folder / _name(update)
    atomic_write_bytes(path, buf.getvalue())
    for old in listing(folder)[keep_last:]:
        old.unlink(missing_ok=True)
    return path


def save_best(folder: Path, source: Path) -> None:
    """The best checkpoint is a copy of a numbered one, written atomically too."""
    atomic_write_bytes(folder / BEST, source.read_bytes())


def listing(folder: Path) -> list[Path]:
    """Numbered checkpoints, newest first."""
    found = [p for p in folder.glob("checkpoint_*.pt") if PATTERN.search(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(PATTERN.search(p.name).group(1)), reverse=True)


def read(path: Path) -> dict[str, Any]:
    """The checkpoint's payload, memory-mapped: workers on one node that resume from it
    share the page cache's one copy (copy-on-write) instead of each reading it whole."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise AutomoeError(f"{path}: corrupt checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or "update" not in payload:
        raise AutomoeError(f"{path}: not an automoe checkpoint")
    return payload


def load_latest(folder: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that reads; None when there is none at all."""
    candidates = listing(folder)
    for path in candidates:
        try:
            return read(path), path
        except AutomoeError as exc:
            print(f"warning: {exc}; trying an older checkpoint", file=sys.stderr)
    if candidates:
        raise AutomoeError(f"{folder}: every checkpoint is corrupt ({len(candidates)} tried)")
    return None


def average(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the model weights of several checkpoints (accumulated in float64)."""
    if not paths:
        raise AutomoeError("checkpoint averaging: no checkpoints to average")
    first = read(paths[0])["model"]
    total = {k: v.double().clone() for k, v in first.items()}
    for path in paths[1:]:
        for k, v in read(path)["model"].items():
            total[k] += v.double()
    return {k: (v / len(paths)).to(first[k].dtype) for k, v in total.items()}

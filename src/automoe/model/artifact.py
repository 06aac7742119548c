"""Self-describing model files: one dict with a format tag, written atomically and read
with `weights_only=True` (plain data and tensors only, no pickled code)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from automoe.errors import AutomoeError
from automoe.io import atomic_write_bytes


def save(path: Path | str, fmt: str, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"format": fmt, **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: Path | str, fmt: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise AutomoeError(f"{path}: model file not found") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise AutomoeError(f"{path}: not a readable model file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise AutomoeError(f"{path}: expected a {fmt} file, found {found or 'something else'}")
    return payload


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

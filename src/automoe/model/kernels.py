"""Kernel choices made once per machine, so one process and the next time the same engine.

The serving layout (model/inference.py) picks, per weight shape and thread count, between
PyTorch's default GEMM and the packed oneDNN kernel by a timing probe. A probe near a tie
can flip from one process to the next, and then the latency table, the search, evaluate
and the gate would each time a different engine. So every choice is measured once and
kept in a plan:

- in the process (a dict keyed by shape and threads);
- in the machine's cache, `$AUTOMOE_KERNEL_CACHE` (a file; `off` disables it) or
  `~/.cache/automoe/kernels-<machine id>.json`: every later process on this machine
  reuses it (read-merge-write, atomic; a cache that cannot be written is skipped);
- as a file beside what was measured (`kernels.json` in measure_latency's output, in the
  registered model): `use(path)` loads it where it was made on this kind of machine, so
  a pod that starts fresh times the engine the latency table timed.

A plan records the machine it holds for (CPU model, cores, torch, the CPU's vector ISA,
the int8 kernel); a plan from another machine is ignored with one warning line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from automoe.cpu import cpu_model, int8_kernel

PLAN_FILE = "kernels.json"
_CHOICES: dict[str, int] = {}  # "out x in x bias x threads" -> rows up to which the default GEMM runs
_STATE = {"machine_cache_read": False}


def machine() -> dict[str, str | int]:
    """What a kernel choice is valid for (threads are part of each choice's key)."""
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count() or 0,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "int8_kernel": int8_kernel(),
    }


def machine_id() -> str:
    return hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:12]


def key(out_features: int, in_features: int, bias: bool, threads: int) -> str:
    return f"{out_features}x{in_features}x{'bias' if bias else 'nobias'}x{threads}t"


def cache_path() -> Path | None:
    """The machine's plan file (None when `AUTOMOE_KERNEL_CACHE=off`)."""
    env = os.environ.get("AUTOMOE_KERNEL_CACHE", "")
    if env.lower() == "off":
        return None
    if env:
        return Path(env)
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except (RuntimeError, KeyError):  # no home (a container's user without one): the process keeps the plan
        return None
    return base / "automoe" / f"kernels-{machine_id()}.json"


def choice(k: str, probe: Callable[[], int]) -> int:
    """The plan's choice for `k`; measured by `probe` (and kept) the first time on this machine."""
    if not _STATE["machine_cache_read"]:
        _STATE["machine_cache_read"] = True
        path = cache_path()
        if path is not None and path.is_file():
            _merge(path, quiet=True)
    if k not in _CHOICES:
        _CHOICES[k] = int(probe())
        path = cache_path()
        if path is not None:
            with contextlib.suppress(OSError):  # a read-only home: the plan lives in the process only
                save(path)
    return _CHOICES[k]


def plan() -> dict:
    return {"machine": machine(), "machine_id": machine_id(), "small_rows": dict(sorted(_CHOICES.items()))}


def save(path: Path | str) -> None:
    """Write the process's plan to `path`, merged with what is there for this machine (atomic)."""
    from automoe.io import atomic_write_json

    path = Path(path)
    existing = _read(path)
    choices = dict(existing["small_rows"]) if existing and existing.get("machine_id") == machine_id() else {}
    choices |= _CHOICES
    atomic_write_json(path, {"machine": machine(), "machine_id": machine_id(), "small_rows": choices})


def use(path: Path | str) -> int:
    """Adopt the choices of a plan file made on this kind of machine (they win over this
    process's own); returns how many were adopted (0 for another machine or no file)."""
    return _merge(Path(path), quiet=False)


def _merge(path: Path, quiet: bool) -> int:
    data = _read(path)
    if data is None:
        return 0
    if data.get("machine_id") != machine_id():
        if not quiet:
            warnings.warn(
                f"{path}: kernel plan of another machine ({data.get('machine', {}).get('cpu_model', '?')}); "
                "measuring this machine's own",
                stacklevel=2,
            )
        return 0
    rows = {str(k): int(v) for k, v in data.get("small_rows", {}).items()}
    _CHOICES.update(rows)
    return len(rows)


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("small_rows", {}), dict) else None


def clear() -> None:
    """Forget the process's choices (tests: measure again; the machine's cache is read again)."""
    _CHOICES.clear()
    _STATE["machine_cache_read"] = False

"""Timing helpers for bench/ scripts: medians of repeated runs, thread count fixed and printed."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

import torch


def setup(threads: int | None = None) -> int:
    threads = threads or int(os.environ.get("AUTOMOE_BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    return threads


def median_time(fn: Callable[[], object], repeats: int = 15, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each function, measured alternately so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def report(name: str, rows: dict[str, float], out: str | None = None) -> None:
    width = max(len(k) for k in rows)
    print(f"== {name} (threads={torch.get_num_threads()}, torch {torch.__version__})")
    for key, value in rows.items():
        print(f"  {key:<{width}}  {value:.4g}")
    if out:
        with open(out, "w") as fh:
            json.dump({"bench": name, "threads": torch.get_num_threads(), **rows}, fh, indent=2)

"""What this CPU is and can do: its model name and feature flags, and what they decide
(the int8 kernel's input range). Read once per process; a feature is data, never an
assumption: it goes into fingerprints, kernel plans and model tags."""

from __future__ import annotations

import functools
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


INT8_WIDE_ACCUMULATE = ("avx512_vnni", "amx_int8")  # vpdpbusd / AMX tiles: int32 sums of u8 x s8 products


def int8_reduce_range(flags: frozenset[str] | None = None) -> bool:
    """Whether int8 products on this CPU need the input in 7 bits (0..127). FBGEMM's int8
    GEMM without AVX-512 VNNI or AMX (AVX2, and AVX-512 without VNNI) uses vpmaddubsw, which
    adds two u8 x s8 products into a saturating int16: 255 x 127 x 2 overflows it, 127 x 127
    x 2 does not. Read from the CPU's flags; where they cannot be read, the safe 7 bits."""
    flags = cpu_flags() if flags is None else flags
    return not any(f in flags for f in INT8_WIDE_ACCUMULATE)


def int8_kernel(reduce_range: bool | None = None) -> str:
    """The int8 product this process runs, as recorded in fingerprints and model tags."""
    reduce_range = int8_reduce_range() if reduce_range is None else reduce_range
    return "u7xs8-int16pairs" if reduce_range else "u8xs8-vnni"

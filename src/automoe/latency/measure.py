"""Latency of SubTransformers on this machine, with the paper's protocol.

Batch 1, a source of `src_len` tokens cut from real validation sentences (MoE routing
depends on the tokens), encoder once, then `tgt_steps` steps of the real beam search
(`automoe.model.decode.beam_search` with `beam` hypotheses, EOS held off until the last
step): the hypotheses diverge from the first step as in real decoding, so MoE decoder
layers route them to different experts, and the search's own per-step work (log-softmax,
top candidates, cache reorder) is timed with the model. Warm-up runs, then repeated runs;
each figure is the mean of the runs between the 10th and 90th percentile.

`measure_many` times several models in alternation, run by run, in an order that turns
around every run (A, B, C, C, B, A, A, B, C, ...): a machine whose speed drifts for seconds
at a time (a shared cloud host: +-15% phases seen on a 2-core AMD EPYC) then slows all of
them alike, so their ratios hold where back-to-back figures would not; and no model is
always the one that runs first (after another model's cache traffic) or last.
measure_latency times each chunk of archs beside the dense reference this way; the
search's confirmation and evaluate do the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from automoe.cpu import cpu_model, int8_kernel
from automoe.data.corpus import EOS
from automoe.data.dataset import ParallelSplit
from automoe.model import compiled
from automoe.model.decode import beam_search
from automoe.model.inference import Precision, for_inference


@dataclass(frozen=True)
class Latency:
    encoder_ms: float
    decoder_ms: float

    @property
    def total_ms(self) -> float:
        return self.encoder_ms + self.decoder_ms


def trimmed_mean(values: list[float] | np.ndarray, low: float = 10.0, high: float = 90.0) -> float:
    """Mean of the sorted values from the `low` to the `high` percentile rank (10 runs: the
    middle 8; fewer than 3 runs: all of them)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    lo, hi = int(np.floor(n * low / 100)), int(np.ceil(n * high / 100))
    return float(v[lo:hi].mean() if hi > lo else v.mean())


def fingerprint(device: torch.device, precision: str = "fp32") -> dict[str, str | int]:
    """What the latency figures are valid for: the machine and the serving layout measured
    (`precision` only when not fp32, so tables measured before int8 existed keep their id)."""
    info: dict[str, str | int] = {"torch": torch.__version__, "device": device.type}
    if device.type == "cuda":  # the GPU, not the host's CPU, is what the figures are valid for
        info |= gpu_fingerprint(device)
    else:
        info |= {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count() or 0, "threads": torch.get_num_threads()}
        if compiled.active() and precision in ("fp32", "int8"):  # the engine that timed it (model/compiled.py)
            info["decoder"] = compiled.version()
    if precision != "fp32":
        info["precision"] = precision
    if precision == "int8":  # 7- or 8-bit inputs: what this CPU's int8 kernel can sum (model/inference.py)
        info["int8_kernel"] = int8_kernel()
    info["id"] = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
    return info


def gpu_fingerprint(device: torch.device) -> dict[str, str | int]:
    """The GPU's model, compute capability, memory, CUDA runtime and driver."""
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu": props.name,
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30),
        "cuda": str(torch.version.cuda),
        "driver": nvidia_driver(),
    }


def nvidia_driver() -> str:
    """The NVIDIA driver's version ("" where it cannot be read)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def source_windows(split: ParallelSplit, length: int, count: int) -> torch.Tensor:
    """`count` sources of exactly `length` tokens (the last one EOS), cut from the
    validation sentences laid end to end: (count, length)."""
    stream = np.concatenate([split.src[i][:-1] for i in range(len(split))]).astype(np.int64)
    need = count * (length - 1)
    if len(stream) < need:
        stream = np.resize(stream, need)
    windows = stream[:need].reshape(count, length - 1)
    return torch.from_numpy(np.concatenate([windows, np.full((count, 1), EOS)], axis=1))


def measure(model, sources: torch.Tensor, *args, **kwargs) -> Latency:
    """Encoder and decoder time of `model` (a compact SubTransformer): `measure_many` of one."""
    return measure_many([model], sources, *args, **kwargs)[0]


@torch.inference_mode()
def measure_many(
    models: list,
    sources: torch.Tensor,
    beam: int = 5,
    steps: int = 30,
    warmup: int = 3,
    repeats: int = 10,
    precision: Precision = "fp32",
) -> list[Latency]:
    """Encoder and decoder time of each of `models` (compact SubTransformers) for batch-1
    sources in the serving layout of `precision`, the models in alternation run by run (see
    the module doc); run r of every model uses source r % len(sources)."""
    served = [for_inference(model, precision) for model in models]  # the serving layout (packed or int8)
    devices = [next(model.parameters()).device for model in served]
    times = [([], []) for _ in served]
    for run in range(warmup + repeats):
        order = range(len(served)) if run % 2 == 0 else range(len(served) - 1, -1, -1)  # ABBA
        for i in order:
            model, device, (enc_times, dec_times) = served[i], devices[i], times[i]
            src = sources[run % len(sources)].unsqueeze(0).to(device)  # (1, S)
            t0 = _now(device)
            enc = model.encode(src)
            t1 = _now(device)
            # exactly `steps` decoder steps: EOS is banned before the last one and forced at it
            beam_search(model, src, beam=beam, max_len_a=0.0, max_len_b=steps - 1, min_len=steps - 1, encoded=enc)
            t2 = _now(device)
            if run >= warmup:
                enc_times.append((t1 - t0) * 1e3)
                dec_times.append((t2 - t1) * 1e3)
    return [Latency(trimmed_mean(e), trimmed_mean(d)) for e, d in times]


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

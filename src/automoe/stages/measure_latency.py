"""measure_latency: measure sampled SubTransformers on this machine (the target hardware).

Each arch is extracted from the trained supernet (so MoE routing is the trained
router's) and timed with the paper's protocol on sources cut from real validation
sentences. Output folder: `latency.csv` (one row per arch: encoder, decoder and total
ms, the arch), `hardware.json` (CPU model, cores, threads, torch, device, and the serving precision when
int8, with the CPU's int8 kernel: measure what will be served), `kernels.json` (the GEMM
choices every arch was timed with, model/kernels.py: later stages time the same engine),
`reference.json` (the dense reference's latency the rows are scaled to), `protocol.json`
(what the rows were measured with: the supernet's sha256 and the timing protocol). Archs are timed
in chunks of `chunk`, each chunk in alternation run by run beside the largest dense arch
(the budget's reference), and every row is scaled by reference / the chunk's reference:
a machine whose speed drifts between chunks moves no row against another. Rows are
appended as they are measured; rerunning after a kill measures only what is missing;
a rerun with another supernet (its trained routing sets the MoE archs' latency) or another
timing protocol measures the table afresh (dvc keeps the folder across runs: rows of two
sittings under two protocols are not one table); a table from other hardware is refused.
Under Kubeflow, `shard`/`num_shards` split the archs over parallel pods and
`automoe merge_latency` joins them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from automoe.config import load_section
from automoe.data.dataset import PreparedData
from automoe.errors import ConfigError
from automoe.io import atomic_write_json, file_sha256
from automoe.latency import measure as m
from automoe.latency.table import LatencyTable, arch_key, save_space
from automoe.model import kernels
from automoe.model.inference import Precision, device_error
from automoe.model.subnet import extract
from automoe.model.supernet import SuperTransformer
from automoe.space import ArchConfig, SearchSpace
from automoe.stages._cli import artifact_file, cli_run, component_run, guarded, stage_parser

NAME = "measure_latency"
ARTIFACTS = ["latency.csv", "hardware.json", kernels.PLAN_FILE]  # logged to MLflow


@dataclass(frozen=True)
class MeasureLatencyConfig:
    n_archs: int = 60  # sampled archs (the paper: 2000); the largest and smallest are added
    seed: int = 1
    beam: int = 5
    src_len: int = 30
    tgt_steps: int = 30
    warmup: int = 3
    repeats: int = 10
    sources: int = 8  # distinct validation windows cycled through the runs
    chunk: int = 8  # archs timed together, in alternation with the dense reference
    threads: int = 2
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Precision = "fp32"  # the serving layout measured (as evaluate.decode and register serve)
    num_shards: int = 1  # Kubeflow: parallel pods measuring disjoint archs
    node_selector: dict[str, str] = field(default_factory=dict)  # Kubeflow: pods of the target hardware
    accelerator: str = ""  # Kubeflow: e.g. nvidia.com/gpu for a GPU target

    def __post_init__(self) -> None:
        for name in ("n_archs", "beam", "src_len", "tgt_steps", "repeats", "sources", "threads", "num_shards", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.src_len < 2:
            raise ValueError("src_len must be at least 2")
        reason = device_error(self.precision, self.device)
        if reason:
            raise ValueError(f"precision {self.precision}: {reason}")


@dataclass(frozen=True)
class MeasureLatencyInputs:
    data: Path
    supernet: Path
    shard: int = 0


def archs_to_measure(space: SearchSpace, cfg: MeasureLatencyConfig) -> list[ArchConfig]:
    """The same list for every shard and every rerun: the extremes, seeded samples, then the
    largest dense arch (the baseline a relative budget is a fraction of: measured, not
    extrapolated; last, so tables measured before it was added keep their arch ids)."""
    rng = np.random.default_rng(cfg.seed)
    samples = [space.sample(rng) for _ in range(cfg.n_archs)]
    return [space.largest(), space.smallest(), *samples, space.largest_dense()]


def run(cfg: MeasureLatencyConfig, inputs: MeasureLatencyInputs, out_dir: Path) -> dict[str, float]:
    if not 0 <= inputs.shard < cfg.num_shards:
        raise ConfigError(f"measure_latency: shard {inputs.shard} is outside 0..{cfg.num_shards - 1}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("measure_latency.device: cuda was asked for but no GPU is visible")
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    data = PreparedData.open(inputs.data)
    supernet, vocab = SuperTransformer.load(artifact_file(inputs.supernet, "supernet.pt"))
    data.check_vocab(vocab, str(inputs.supernet))
    table = LatencyTable(out_dir, m.fingerprint(device, cfg.precision))
    differs = start_over_unless_same_protocol(out_dir, table, protocol(cfg, inputs.supernet))
    if differs:
        print(f"{NAME}: the table was measured with {differs}; measuring it afresh", file=sys.stderr)
    save_space(out_dir, supernet.space)
    kernels.use(out_dir / kernels.PLAN_FILE)  # a resumed run keeps the engine its first rows were timed with
    archs = archs_to_measure(supernet.space, cfg)
    dropped = table.retain({i: arch_key(a) for i, a in enumerate(archs)})
    if dropped:
        print(f"{NAME}: {dropped} rows of archs this configuration no longer measures were dropped", file=sys.stderr)
    done = {row["arch_id"] for row in table.rows()}
    sources = m.source_windows(data.split("valid"), cfg.src_len, cfg.sources)
    todo = [(i, a) for i, a in enumerate(archs) if i % cfg.num_shards == inputs.shard and i not in done]
    reference = extract(supernet, supernet.space.largest_dense()).to(device)
    with tqdm(total=len(todo), desc=NAME, mininterval=5.0) as bar:
        for start in range(0, len(todo), cfg.chunk):
            chunk = todo[start : start + cfg.chunk]
            models = [reference] + [extract(supernet, arch).to(device) for _, arch in chunk]
            lats = m.measure_many(models, sources, cfg.beam, cfg.tgt_steps, cfg.warmup, cfg.repeats, cfg.precision)
            kernels.save(out_dir / kernels.PLAN_FILE)  # before the rows: no row timed with an unrecorded choice
            scale = reference_ms(out_dir, lats[0]) / lats[0].total_ms
            for (arch_id, arch), lat in zip(chunk, lats[1:], strict=True):
                table.append(arch_id, arch, lat.encoder_ms * scale, lat.decoder_ms * scale)
            bar.update(len(chunk))
    kernels.save(out_dir / kernels.PLAN_FILE)
    rows = table.rows()
    latencies = np.array([r["latency_ms"] for r in rows])
    return {
        "archs_measured": len(rows),
        "latency_ms_min": float(latencies.min()),
        "latency_ms_median": float(np.median(latencies)),
        "latency_ms_max": float(latencies.max()),
    }


REFERENCE = "reference.json"
PROTOCOL = "protocol.json"


def protocol(cfg: MeasureLatencyConfig, supernet: Path) -> dict[str, Any]:
    """What a row's figure depends on beyond the hardware and the arch: the supernet (its
    routers) and how it was timed. `n_archs`, `seed` and `chunk` only choose and group
    the archs (a changed arch list is `LatencyTable.retain`'s business)."""
    timing = ("beam", "src_len", "tgt_steps", "warmup", "repeats", "sources")
    return {"supernet_sha256": file_sha256(artifact_file(supernet, "supernet.pt"))} | {
        k: getattr(cfg, k) for k in timing
    }


def start_over_unless_same_protocol(out_dir: Path, table: LatencyTable, wanted: dict[str, Any]) -> str:
    """Empty the table and forget its reference when its rows were measured under another
    protocol; returns what differed ("" when nothing did). The rows go before the new
    protocol is written, so a kill in between leaves an empty table, never old rows under
    a new protocol."""
    path = out_dir / PROTOCOL
    saved = json.loads(path.read_text()) if path.is_file() else None
    differs = ""
    if saved != wanted:
        if saved is None and table.rows():
            differs = "an unrecorded protocol (no protocol.json)"
        elif saved is not None:
            differs = "; ".join(
                f"{k}: {str(saved.get(k))[:12]} there, {str(wanted.get(k))[:12]} here"
                for k in sorted(set(saved) | set(wanted))
                if saved.get(k) != wanted.get(k)
            )
        table.retain({})
        (out_dir / REFERENCE).unlink(missing_ok=True)
        atomic_write_json(path, wanted)
    return differs


def reference_ms(out_dir: Path, measured: m.Latency) -> float:
    """The reference latency every row is scaled to: the first chunk's, kept in
    `reference.json` (a resumed run scales to the same figure)."""
    path = out_dir / REFERENCE
    if not path.is_file():
        atomic_write_json(path, {"arch": "largest_dense", "latency_ms": measured.total_ms})
    return float(json.loads(path.read_text())["latency_ms"])


def load_config(params: Any, overrides: Any = None) -> MeasureLatencyConfig:
    return load_section(MeasureLatencyConfig, NAME, params, overrides)


@guarded
def main(argv: list[str] | None = None) -> None:
    """automoe measure_latency --data data/prepared --supernet models/supernet/supernet.pt --out results/latency"""
    parser = stage_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="prepare_data output folder")
    parser.add_argument("--supernet", required=True, type=Path, help="train_supernet's supernet.pt")
    parser.add_argument("--shard", type=int, default=0, help="which of num_shards to measure")
    args = parser.parse_args(argv)
    inputs = MeasureLatencyInputs(args.data, args.supernet, args.shard)
    cli_run(NAME, load_config, args, lambda cfg, _: run(cfg, inputs, args.out), ARTIFACTS)


def component_main(
    params: str,
    overrides: list,
    data_path: str,
    supernet_path: str,
    shard: int,
    out_path: str,
    metrics: Any,
) -> None:
    inputs = MeasureLatencyInputs(Path(data_path), Path(supernet_path), int(shard))
    component_run(
        NAME,
        load_config,
        params,
        overrides,
        out_path,
        lambda cfg, _: run(cfg, inputs, Path(out_path)),
        ARTIFACTS,
        metrics,
    )


def merge_main(shard_paths: list[str], out_path: str) -> None:
    """Join the shard tables of a Kubeflow ParallelFor into one (same hardware only)."""
    from automoe.latency.table import load_space_of, merge

    folders = [Path(p) for p in shard_paths]
    # each shard scaled its rows to its own timing of the reference: rescale to the first's
    refs = [
        json.loads((f / REFERENCE).read_text())["latency_ms"] if (f / REFERENCE).is_file() else None for f in folders
    ]
    scales = [refs[0] / r if refs[0] and r else 1.0 for r in refs]
    n = merge(folders, Path(out_path), scales)
    if refs[0]:
        atomic_write_json(Path(out_path) / REFERENCE, {"arch": "largest_dense", "latency_ms": refs[0]})
    if (folders[0] / PROTOCOL).is_file():  # every shard ran one compiled config on one supernet
        atomic_write_json(Path(out_path) / PROTOCOL, json.loads((folders[0] / PROTOCOL).read_text()))
    save_space(Path(out_path), load_space_of(folders[0]))
    for folder in folders:  # the shards' kernel choices, together (same hardware: merge checked it)
        kernels.use(folder / kernels.PLAN_FILE)
    kernels.save(Path(out_path) / kernels.PLAN_FILE)
    print(f"merge_latency: {n} archs from {len(folders)} shards")


@guarded
def merge_cli(argv: list[str] | None = None) -> None:
    """merge_latency: join shard latency tables measured on the same hardware."""
    import argparse

    parser = argparse.ArgumentParser(prog="automoe merge_latency", description=merge_cli.__doc__)
    parser.add_argument("shards", nargs="+", help="measure_latency output folders")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    merge_main(args.shards, args.out)

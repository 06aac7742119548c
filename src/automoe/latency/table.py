"""The latency table: one CSV row per measured arch, appended and fsynced as it goes,
plus the hardware fingerprint it belongs to. A killed run loses at most the row it was
measuring (a torn last line is dropped on resume); rows of other hardware are refused."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import yaml

from automoe.config import from_dict, read_yaml
from automoe.errors import DataError
from automoe.io import atomic_write_json, atomic_write_text
from automoe.space import ArchConfig, SearchSpace

TABLE = "latency.csv"
HARDWARE = "hardware.json"
SPACE = "space.yaml"
COLUMNS = ["arch_id", "encoder_ms", "decoder_ms", "latency_ms", "hardware_id", "arch"]


def arch_key(arch: ArchConfig) -> str:
    return json.dumps(arch.to_dict(), separators=(",", ":"), sort_keys=True)


class LatencyTable:
    def __init__(self, folder: Path, hardware: dict):
        self.folder, self.hardware = folder, hardware
        self.path = folder / TABLE
        folder.mkdir(parents=True, exist_ok=True)
        hw_path = folder / HARDWARE
        if hw_path.is_file():
            saved = json.loads(hw_path.read_text())
            if saved.get("id") != hardware["id"]:
                raise DataError(
                    f"{self.path}: measured on other hardware or in another serving layout "
                    f"({_differences(saved, hardware)}); use another output folder"
                )
        else:
            atomic_write_json(hw_path, hardware)
        self._repair()

    def _repair(self) -> None:
        """Drop a torn last line left by a kill; write the header of a new table."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            self.path.write_text(",".join(COLUMNS) + "\n")
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def rows(self) -> list[dict]:
        with open(self.path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            if row["hardware_id"] != self.hardware["id"]:
                raise DataError(f"{self.path}: row {row['arch_id']} was measured on other hardware")
            for key in ("encoder_ms", "decoder_ms", "latency_ms"):
                row[key] = float(row[key])
            row["arch_id"] = int(row["arch_id"])
        return rows

    def retain(self, wanted: dict[int, str]) -> int:
        """Keep only the rows whose (arch_id, arch) is in `wanted` (id -> arch_key), by an
        atomic rewrite; returns how many rows were dropped. A resumed run whose arch list
        changed (another seed or count, another sampler) keeps no row of an arch it no
        longer measures under that id."""
        with open(self.path, newline="") as fh:
            rows = list(csv.reader(fh))
        header, body = rows[0], rows[1:]
        kept = [r for r in body if wanted.get(int(r[0])) == r[COLUMNS.index("arch")]]
        if len(kept) < len(body):
            buf = io.StringIO()
            csv.writer(buf).writerows([header, *kept])
            atomic_write_text(self.path, buf.getvalue())
        return len(body) - len(kept)

    def append(self, arch_id: int, arch: ArchConfig, encoder_ms: float, decoder_ms: float) -> None:
        buf = io.StringIO()
        csv.writer(buf).writerow(
            [
                arch_id,
                f"{encoder_ms:.4f}",
                f"{decoder_ms:.4f}",
                f"{encoder_ms + decoder_ms:.4f}",
                self.hardware["id"],
                arch_key(arch),
            ]
        )
        with open(self.path, "a") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())


def read_table(folder: Path) -> tuple[list[dict], dict]:
    """Rows and hardware of a finished measure_latency output folder."""
    hw_path = folder / HARDWARE
    if not hw_path.is_file() or not (folder / TABLE).is_file():
        raise DataError(f"{folder}: not a latency table folder ({TABLE} or {HARDWARE} missing)")
    hardware = json.loads(hw_path.read_text())
    return LatencyTable(folder, hardware).rows(), hardware


def _describe(hw: dict) -> str:
    where = hw.get("gpu") or f"{hw.get('cpu_model')}, {hw.get('threads')} threads"
    return f"{where}, torch {hw.get('torch')}, {hw.get('device')}, {hw.get('precision', 'fp32')}"


def _differences(saved: dict, now: dict) -> str:
    """What differs between two fingerprints, e.g. "precision: int8 there, fp32 here"."""
    keys = sorted((set(saved) | set(now)) - {"id"})
    value = lambda hw, k: hw.get(k, "fp32" if k == "precision" else "none")  # noqa: E731 - no precision: fp32
    differ = [k for k in keys if value(saved, k) != value(now, k)]
    return "; ".join(f"{k}: {value(saved, k)} there, {value(now, k)} here" for k in differ)


def merge(folders: list[Path], out: Path, scales: list[float] | None = None) -> int:
    """Union of shard tables measured on the same hardware, shard k's figures times
    `scales[k]` (default 1); returns the row count."""
    tables = [read_table(f) for f in folders]
    if not tables:
        raise DataError("merge: no latency tables given")
    hardware = tables[0][1]
    for folder, (_, hw) in zip(folders, tables, strict=True):
        if hw["id"] != hardware["id"]:
            raise DataError(f"{folder}: measured on other hardware ({_describe(hw)}) than {folders[0]}")
    scales = scales or [1.0] * len(tables)
    scaled = [
        r | {"encoder_ms": r["encoder_ms"] * k, "decoder_ms": r["decoder_ms"] * k}
        for (rows, _), k in zip(tables, scales, strict=True)
        for r in rows
    ]
    rows = sorted({r["arch_id"]: r for r in scaled}.values(), key=lambda r: r["arch_id"])
    merged = LatencyTable(out, hardware)
    merged.path.write_text(",".join(COLUMNS) + "\n")
    for r in rows:
        merged.append(r["arch_id"], ArchConfig.from_dict(json.loads(r["arch"])), r["encoder_ms"], r["decoder_ms"])
    return len(rows)


def save_space(folder: Path, space: SearchSpace) -> None:
    """The search space the table's archs come from (a predictor must match it)."""
    atomic_write_text(folder / SPACE, yaml.safe_dump(space.to_dict(), sort_keys=False))


def load_space_of(folder: Path) -> SearchSpace:
    path = folder / SPACE
    if not path.is_file():
        raise DataError(f"{folder}: {SPACE} missing (not a measure_latency output)")
    return from_dict(SearchSpace, read_yaml(path), str(path))

"""`make bench`: every benchmark, side by side in one run on this machine, as one table of
ratios (medians of repeated runs, thread count fixed), also written as JSON.

    python bench/run_all.py [--out results/bench.json] [--latency results/latency]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "moe_ffn": ("ratio_moe_over_dense", "<= 1.10", "heterogeneous top-1 MoE FFN / dense FFN, equal active FLOPs"),
    "supernet_vs_compact": ("throughput_ratio_supernet_over_compact", ">= 0.90", "supernet / compact training step"),
    "translate_vs_marian": ("speedup_ours_over_marian", ">= 2.0", "beam-4 batch-32 translation vs MarianMT"),
    "ct2_latency": ("slowdown_ours_over_ct2", "<= 1.0", "batch-1 beam-5 latency / CTranslate2 (same weights, fp32)"),
    "profile_decode": ("speedup_compiled_over_python", "(info)", "batch-1 decoding: compiled decoder vs Python path"),
    "space_floor": (
        "compiled_fp32_ratio_fastest_over_reference",
        "<= 0.30",
        "small space: fastest arch / d=256 3+3 reference (measure_latency's timing)",
    ),
}

EXTRA = {  # more ratios the same benchmark measures side by side
    "ct2_latency": [
        ("slowdown_int8_ours_over_ct2", "<= 0.8", "batch-1 beam-5 latency / CTranslate2, both int8"),
        ("speedup_int8_over_fp32_ours", "(info)", "batch-1 beam-5: our int8 / our fp32 serving"),
    ],
    "profile_decode": [
        ("speedup_serving_over_plain", "(info)", "batch-1 decoding: serving layout (Python path) vs plain eager"),
    ],
    "space_floor": [
        ("compiled_int8_ratio_fastest_over_reference", "(info)", "the same floor in int8"),
        ("python_fp32_ratio_fastest_over_reference", "(info)", "the same floor on the Python path, fp32"),
    ],
}


def predictor_quality(latency: Path, layers: int) -> dict[str, float]:
    """Held-out MAPE and R² of a predictor (`layers` hidden layers; 0: linear) trained on a
    measured latency table, the stage's own split."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "automoe.cli",
            "train_predictor",
            "--latency",
            str(latency),
            "--out",
            f"{tmp}/p",
            "--metrics",
            f"{tmp}/m.json",
            "--set",
            f"train_predictor.fit.layers={layers}",
        ]
        subprocess.run(cmd, check=True, env=dict(os.environ, AUTOMOE_TRACKING="0"), capture_output=True)
        return json.loads(Path(f"{tmp}/m.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results/bench.json")
    parser.add_argument("--latency", default="results/latency", help="a measure_latency output (from make run)")
    args = parser.parse_args()
    threads = os.environ.setdefault("AUTOMOE_BENCH_THREADS", "2")
    results: dict[str, dict] = {}
    rows = []
    for name, (key, goal, what) in BENCHES.items():
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), "--json", out.name], cwd=HERE.parent)
            if proc.returncode != 0:
                rows.append((what, "failed", goal))
                continue
            results[name] = json.loads(Path(out.name).read_text())
        rows.append((what, f"{results[name][key]:.3f}x", goal))
        for extra_key, extra_goal, extra_what in EXTRA.get(name, ()):
            rows.append((extra_what, f"{results[name][extra_key]:.3f}x", extra_goal))
    if all(Path(f"models/retrain/{m}/model.pt").is_file() for m in ("searched", "dense")):  # after make run
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, str(HERE / "searched_vs_ct2.py"), "--json", out.name]
            if subprocess.run(cmd, cwd=HERE.parent).returncode == 0:
                r = results["searched_vs_ct2"] = json.loads(Path(out.name).read_text())
                for p in ("fp32", "int8"):
                    rows.append((
                        f"make run's searched model (ours) / its dense reference on CTranslate2, {p}: speed",
                        f"{r[f'speedup_{p}_searched_ours_over_dense_ct2']:.3f}x", "(info)",
                    ))  # fmt: skip
                    engine = "CTranslate2" if r["ct2_is_the_reference"] else "ours: no CTranslate2 form"
                    dense = r.get(f"bleu_dense_ct2_{p}", r[f"bleu_dense_ours_{p}"])
                    rows.append((
                        f"  BLEU test2016, searched (ours) / dense ({engine}), {p}",
                        f"{r[f'bleu_searched_ours_{p}']:.2f} / {dense:.2f}", "(info)",
                    ))  # fmt: skip
            else:
                rows.append(
                    ("make run's searched model (ours) / its dense reference on CTranslate2", "failed", "(info)")
                )
    if Path("models/retrain/searched/model.pt").is_file() and Path("data/prepared/test.src.txt").is_file():
        with tempfile.NamedTemporaryFile(suffix=".json") as out:  # serving make run's searched model under load
            cmd = [sys.executable, str(HERE / "serve_load.py"), "--json", out.name]
            if subprocess.run(cmd, cwd=HERE.parent).returncode == 0:
                r = results["serve_load"] = json.loads(Path(out.name).read_text())
                rows.append((
                    "serving, concurrency 16: served / offline batched sentences/s (automoe serve)",
                    f"{r['served_over_offline_c16']:.3f}x", ">= 0.7",
                ))  # fmt: skip
                rows.append((
                    "serving, concurrency 1: p50, batching / each request alone",
                    f"{r['p50_c1_batched_over_unbatched']:.3f}x", "<= 1.10",
                ))  # fmt: skip
                rows.append(("serving: failed requests under the bounded load", str(r["failed"]), "0"))
                if "mlflow_served_over_offline_c16" in r:
                    rows.append((
                        "  the same with mlflow models serve of the registered pyfunc (it batches too)",
                        f"{r['mlflow_served_over_offline_c16']:.3f}x", "(info)",
                    ))  # fmt: skip
            else:
                rows.append(("serving under load (bench/serve_load.py)", "failed", ">= 0.7"))
    latency = Path(args.latency)
    if (latency / "latency.csv").is_file():
        for name, layers in (("MLP 3x400", 3), ("linear", 0)):
            q = predictor_quality(latency, layers)
            results[f"predictor_{'mlp' if layers else 'linear'}"] = q
            rows.append((f"latency predictor, {name}: MAPE (held-out)", f"{q['test_mape_pct']:.2f}%", "<= 4%"))
            rows.append((f"latency predictor, {name}: R² (held-out)", f"{q['test_r2']:.3f}", ">= 0.97"))
    timing = Path("results/make_run_seconds.txt")
    if timing.is_file():
        seconds = float(timing.read_text())
        results["make_run_seconds"] = seconds
        rows.append(("make run wall time", f"{seconds / 60:.1f} min", "<= 20 min"))
    width = max(len(r[0]) for r in rows)
    print(f"\nautomoe benchmarks (threads={threads}; each ratio measured side by side in this run)")
    for what, value, goal in rows:
        print(f"  {what:<{width}}  {value:>10}   goal {goal}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": int(threads), **results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

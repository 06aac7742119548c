"""Tables and plots of a finished multi30k_2h run (run.sh), for BENCHMARKS.md.

    python configs/experiments/multi30k_2h/report.py [OUT] [--figures bench/figures]

Prints Markdown (models, searches, predictor, stage times, hardware) and writes
`multi30k_2h_bleu_vs_latency.png`, `multi30k_2h_pareto.png` and
`multi30k_2h_valid_curves.png` into the figures folder.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from automoe.plots import figure
from automoe.train.trainer import read_valid_history

VARIANTS = {  # retrain folder -> (label, evaluate folder, key prefix in its metrics.json)
    "heterogeneous": ("AutoMoE, heterogeneous experts", "heterogeneous", "searched"),
    "homogeneous": ("AutoMoE, homogeneous experts", "homogeneous", "searched"),
    "dense_search": ("dense-only search (HAT-style)", "dense_search", "searched"),
    "dense": ("dense baseline (largest dense)", "heterogeneous", "dense"),
}
SEARCHES = {"heterogeneous": "heterogeneous", "homogeneous": "homogeneous", "dense_search": "dense_search"}


def load(out: Path) -> dict[str, dict]:
    models = {}
    for name, (label, folder, prefix) in VARIANTS.items():
        path = out / "evaluate" / folder / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        models[name] = {"label": label} | {k[len(prefix) + 1 :]: v for k, v in m.items() if k.startswith(prefix + "_")}
    return models


def table(models: dict[str, dict]) -> str:
    dense = models.get("dense")
    head = "| model | BLEU | chrF | latency (ms) | speedup | GFLOPs | params active | params total |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for m in models.values():
        speedup = f"{dense['latency_ms'] / m['latency_ms']:.2f}x" if dense else "-"
        lines.append(
            f"| {m['label']} | {m['bleu']:.2f} | {m['chrf']:.2f} | {m['latency_ms']:.1f} | {speedup} "
            f"| {m['gflops']:.3f} | {m['params_active'] / 1e6:.2f}M | {m['params_total'] / 1e6:.2f}M |"
        )
    return "\n".join(lines)


def searches(out: Path) -> str:
    lines = [
        "| search space | evaluations | budget (ms) | best predicted (ms) | best valid loss | random search best |",
        "|---|---|---|---|---|---|",
    ]
    for name, folder in SEARCHES.items():
        path = out / "search" / folder / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            lines.append(
                f"| {VARIANTS[name][0]} | {m['evaluations']:.0f} | {m['budget']:.1f} | {m['best_cost']:.1f} "
                f"| {m['best_fitness']:.3f} | {m.get('random_best_fitness', float('nan')):.3f} |"
            )
    return "\n".join(lines)


def archs(out: Path) -> str:
    lines = []
    for name, folder in SEARCHES.items():
        path = out / "retrain" / folder / "arch.yaml"
        if path.is_file():
            lines += [f"{VARIANTS[name][0]}:", "```yaml", path.read_text().strip(), "```"]
    return "\n".join(lines)


def plots(out: Path, models: dict[str, dict], figures: Path) -> None:
    figures.mkdir(parents=True, exist_ok=True)
    with figure(figures / "multi30k_2h_bleu_vs_latency.png") as ax:
        for m in models.values():
            ax.scatter([m["latency_ms"]], [m["bleu"]], s=60)
            ax.annotate(m["label"], (m["latency_ms"], m["bleu"]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlim(0, 1.6 * max(m["latency_ms"] for m in models.values()))  # room for the labels
        ax.set_xlabel("latency (ms, batch 1, beam 5, 30+30 tokens)")
        ax.set_ylabel("BLEU (test2016, beam 4)")
        ax.grid(alpha=0.3)
    with figure(figures / "multi30k_2h_pareto.png", size=(7, 4.5)) as ax:
        budget = None
        for name, folder in SEARCHES.items():
            s = out / "search" / folder
            if not (s / "pareto.csv").is_file():
                continue
            rows = []
            for f in ("population.csv", "random.csv", "pareto.csv"):
                if (s / f).is_file():
                    rows += list(csv.DictReader(open(s / f)))
            ax.scatter([float(r["cost"]) for r in rows], [float(r["fitness"]) for r in rows], s=8, alpha=0.4)
            front = list(csv.DictReader(open(s / "pareto.csv")))
            xs, ys = [float(r["cost"]) for r in front], [float(r["fitness"]) for r in front]
            ax.plot(xs, ys, "o-", ms=3, label=VARIANTS[name][0])
            budget = json.loads((s / "metrics.json").read_text())["budget"]
        if budget:
            ax.axvline(budget, color="red", ls="--", label="latency budget (25% of dense)")
        ax.set_xlabel("predicted latency (ms)")
        ax.set_ylabel("validation loss (inherited supernet weights)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    with figure(figures / "multi30k_2h_valid_curves.png", size=(7, 4)) as ax:
        for name in VARIANTS:
            path = out / "retrain" / SEARCHES.get(name, name) / "valid_curves.csv"
            if path.is_file():
                rows = read_valid_history(path)
                key = [k for k in rows[0] if k != "update"][0]
                ax.plot([r["update"] for r in rows], [r[key] for r in rows], "o-", label=VARIANTS[name][0])
        ax.set_xlabel("update (at least 4,096 target tokens each)")
        ax.set_ylabel("validation NLL per token")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="results/experiments/multi30k_2h", type=Path)
    parser.add_argument("--figures", default="bench/figures", type=Path)
    args = parser.parse_args()
    out = args.out
    models = load(out)
    print("## Models (test2016)\n\n" + table(models) + "\n")
    print("## Searches\n\n" + searches(out) + "\n")
    print("## Searched architectures\n\n" + archs(out) + "\n")
    for name in ("train_predictor", "measure_latency", "train_supernet", "retrain_dense"):
        path = out / f"{name}.json"
        if path.is_file():
            print(f"{name}: `{json.dumps(json.loads(path.read_text()))}`\n")
    times = out / "times.tsv"
    if times.is_file():
        rows = [line.split("\t") for line in times.read_text().splitlines()]
        print("## Stage wall times\n\n| step | seconds |\n|---|---|")
        print("\n".join(f"| {a} | {int(b)} |" for a, b in rows))
        print(f"| **total** | **{sum(int(b) for _, b in rows)}** ({sum(int(b) for _, b in rows) / 60:.0f} min) |\n")
    fp = out / "latency" / "hardware.json"
    if fp.is_file():
        print(f"hardware: `{fp.read_text().strip()}`")
    plots(out, models, args.figures)


if __name__ == "__main__":
    main()

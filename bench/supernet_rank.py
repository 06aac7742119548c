"""Does the supernet rank architectures? Kendall's tau between inherited-weight validation
loss and validation loss after retraining each architecture on its own.

Picks `--archs` architectures spread over the space's cost range (evenly spaced quantiles
of analytic GFLOPs, or of predicted latency with `--predictor`), scores each with the
supernet's weights on the first `--valid-sentences` validation sentences (the search's
fitness), retrains each from scratch for `--updates` updates with the from-scratch
recipe of `--params` (`train_supernet.train`, the same for all), and compares the two
rankings on the same validation sentences. Results are kept per arch in `--out/rank.json`, so a killed run
resumes with the next arch.

    python bench/supernet_rank.py --data data/prepared --supernet models/supernet/supernet.pt \\
        --archs 8 --updates 300 --out results/supernet_rank
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.stats import kendalltau, spearmanr

from automoe.config import read_yaml
from automoe.data.dataset import PreparedData
from automoe.io import atomic_write_json
from automoe.model.counting import count
from automoe.model.supernet import SuperTransformer
from automoe.plots import figure
from automoe.search.evolution import key
from automoe.space import ArchConfig
from automoe.stages import retrain, search


def spread_archs(space, n: int, cost, seed: int = 0, pool: int = 2000) -> list[ArchConfig]:
    """`n` distinct archs at evenly spaced cost quantiles of a uniform sample of the space."""
    rng = np.random.default_rng(seed)
    sample = sorted({key(a): a for a in (space.sample(rng) for _ in range(pool))}.values(), key=cost)
    picks = np.linspace(0, len(sample) - 1, n).round().astype(int)
    return [sample[i] for i in picks]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--supernet", type=Path, required=True)
    p.add_argument("--predictor", type=Path, help="predictor.pt: spread by predicted latency instead of GFLOPs")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--archs", type=int, default=8)
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--valid-sentences", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/supernet_rank"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = PreparedData.open(a.data)
    supernet, _ = SuperTransformer.load(a.supernet)
    space, vocab_size = supernet.space, supernet.args.vocab_size
    if a.predictor:
        from automoe.latency.predictor import LatencyPredictor

        predictor = LatencyPredictor.load(a.predictor)
        cost, unit = (lambda arch: float(predictor.predict([arch])[0])), "predicted latency (ms)"
    else:
        cost, unit = (lambda arch: count(arch, vocab_size, space.qkv_dim).gflops), "GFLOPs"
    archs = spread_archs(space, a.archs, cost)
    inherited = search.ValidLoss(supernet, data, a.valid_sentences, 4096)
    del supernet

    params = read_yaml(a.params) if a.params.is_file() else {}
    section = {k: v for k, v in params.get("retrain", {}).items() if k != "train"}
    # from scratch with the from-scratch recipe (the supernet's), warm-up capped to a third of the run
    train = dict(params.get("train_supernet", {}).get("train", {}))
    train = train | {
        "warmup_updates": min(int(train.get("warmup_updates", 0)), a.updates // 3),
        "max_updates": a.updates,
        "valid_max_sentences": a.valid_sentences,
        "valid_interval": a.updates,
        "threads": a.threads,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "space.yaml").write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))  # the supernet's space
    overrides = {"space": str(a.out / "space.yaml"), "train": train, "init_from_supernet": False}
    cfg = retrain.load_config({"retrain": section | overrides})
    state_file = a.out / "rank.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("setup") != {"updates": a.updates, "valid_sentences": a.valid_sentences, "supernet": str(a.supernet)}:
        state = {"setup": {"updates": a.updates, "valid_sentences": a.valid_sentences, "supernet": str(a.supernet)}}
    rows = state.setdefault("rows", {})
    for i, arch in enumerate(archs):
        k = key(arch)
        if k in rows:
            continue
        t0 = time.perf_counter()
        folder = a.out / f"arch{i}"
        (a.out / f"arch{i}.yaml").write_text(arch.to_yaml())
        metrics = retrain.run(cfg, retrain.RetrainInputs(a.data, str(a.out / f"arch{i}.yaml")), folder)
        rows[k] = {
            "cost": cost(arch),
            "inherited_valid_nll": inherited([arch])[0],
            "retrained_valid_nll": metrics["best_valid_loss"],
            "minutes": (time.perf_counter() - t0) / 60,
        }
        atomic_write_json(state_file, state)
        print(json.dumps(rows[k]), flush=True)

    picked = [rows[key(arch)] for arch in archs]
    x = np.array([r["inherited_valid_nll"] for r in picked])
    y = np.array([r["retrained_valid_nll"] for r in picked])
    state["kendall_tau"] = float(kendalltau(x, y).statistic)
    state["spearman"] = float(spearmanr(x, y).statistic)
    atomic_write_json(state_file, state)
    with figure(a.out / "supernet_rank.png", size=(6, 4.5)) as ax:
        sc = ax.scatter(x, y, c=[r["cost"] for r in picked], cmap="viridis")
        ax.figure.colorbar(sc, ax=ax, label=unit)
        ax.set_xlabel("validation NLL, inherited supernet weights")
        ax.set_ylabel(f"validation NLL after retraining ({a.updates} updates)")
        ax.set_title(f"Kendall's tau {state['kendall_tau']:.2f} over {len(picked)} archs")
    print(f"\n| arch | {unit} | inherited NLL | retrained NLL |\n|---|---|---|---|")
    for i, r in enumerate(picked):
        print(f"| {i} | {r['cost']:.3f} | {r['inherited_valid_nll']:.3f} | {r['retrained_valid_nll']:.3f} |")
    print(f"\nKendall's tau {state['kendall_tau']:.3f}, Spearman {state['spearman']:.3f} ({len(picked)} archs)")


if __name__ == "__main__":
    main()

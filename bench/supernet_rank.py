"""Does the supernet rank architectures where the search has to choose? Kendall's tau, with a
bootstrap interval, between inherited-weight validation loss (the search's fitness) and
validation loss after the pipeline's own policy: inherit the supernet slice, then fine-tune.

Picks `--archs` distinct architectures at nearly equal cost just under the search's budget
(params.yaml `search.budget`, costed as the search costs it: the predictor, or GFLOPs):
seeded uniform samples whose cost lies in [`--band` x budget, budget]. Comparing archs
spread over the whole cost range would reward "bigger is better", which is not the choice
a search under a budget faces. Each is scored with the supernet's weights on the first
`--valid-sentences` validation sentences, then fine-tuned from the supernet with the
retrain recipe (params.yaml `retrain.train`) for `--updates` updates and scored on the same
sentences. Results are kept per arch in `--out/rank.json`, so a killed run resumes with the
next arch.

    python bench/supernet_rank.py --data data/prepared --supernet models/supernet/supernet.pt \\
        --predictor models/predictor/predictor.pt --archs 12 --updates 165 --out results/supernet_rank
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
from automoe.model.supernet import SuperTransformer
from automoe.plots import figure
from automoe.search.evolution import key
from automoe.space import ArchConfig
from automoe.stages import retrain, search


def near_budget(space, n: int, cost, budget: float, band: float, seed: int = 0, pool: int = 4000) -> list[ArchConfig]:
    """`n` distinct archs drawn at random (seeded) among uniform samples costing between
    `band` x budget and the budget."""
    rng = np.random.default_rng(seed)
    inside = {}
    for _ in range(pool):
        arch = space.sample(rng)
        if band * budget <= cost(arch) <= budget:
            inside[key(arch)] = arch
    if len(inside) < n:
        raise SystemExit(
            f"only {len(inside)} distinct archs cost {band:g}-1 x the budget in {pool} samples; widen --band"
        )
    keys = sorted(inside)
    return [inside[keys[i]] for i in rng.choice(len(keys), n, replace=False)]


def bootstrap_tau(x: np.ndarray, y: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of Kendall's tau over archs resampled with replacement."""
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(rounds):
        i = rng.integers(len(x), size=len(x))
        t = kendalltau(x[i], y[i]).statistic
        if np.isfinite(t):
            taus.append(t)
    low, high = np.percentile(taus, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--supernet", type=Path, required=True)
    p.add_argument("--predictor", type=Path, help="predictor.pt (for a predicted-latency budget)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--archs", type=int, default=12)
    p.add_argument("--band", type=float, default=0.9, help="archs costing between band x budget and the budget")
    p.add_argument("--updates", type=int, default=165, help="fine-tuning updates per arch")
    p.add_argument("--valid-sentences", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/supernet_rank"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    params = read_yaml(a.params)
    data = PreparedData.open(a.data)
    supernet, _ = SuperTransformer.load(a.supernet)
    space = supernet.space
    scfg = search.load_config(params)
    cost, reference = search.cost_function(scfg, search.SearchInputs(a.data, a.supernet, a.predictor), supernet, data)
    budget, dense, _ = search.absolute_budget(scfg, cost, space, space, reference)
    unit = "ms" if scfg.budget.kind == "latency_ms" else "GFLOPs"
    archs = near_budget(space, a.archs, cost, budget, a.band)
    inherited = search.ValidLoss(supernet, data, a.valid_sentences, 4096)
    print(f"{len(archs)} archs at {a.band:g}-1 x the budget {budget:.2f} {unit} (dense {dense:.2f})", flush=True)
    del supernet

    section = {k: v for k, v in params.get("retrain", {}).items() if k != "train"}
    train = dict(params.get("retrain", {}).get("train", {}))  # the pipeline's fine-tuning recipe, shortened
    train |= {
        "warmup_updates": min(int(train.get("warmup_updates", 0)), a.updates // 3),
        "max_updates": a.updates,
        "valid_max_sentences": a.valid_sentences,
        "valid_interval": a.updates,
        "threads": a.threads,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "space.yaml").write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))  # the supernet's space
    cfg = retrain.load_config(
        {"retrain": section | {"space": str(a.out / "space.yaml"), "train": train, "init_from_supernet": True}}
    )
    setup = {"updates": a.updates, "valid_sentences": a.valid_sentences, "supernet": str(a.supernet),
             "policy": "inherit, then fine-tune", "budget": budget, "band": a.band}  # fmt: skip
    state_file = a.out / "rank.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("setup") != setup:
        state = {"setup": setup}
    rows = state.setdefault("rows", {})
    for i, arch in enumerate(archs):
        k = key(arch)
        if k in rows:
            continue
        t0 = time.perf_counter()
        (a.out / f"arch{i}.yaml").write_text(arch.to_yaml())
        inputs = retrain.RetrainInputs(a.data, str(a.out / f"arch{i}.yaml"), a.supernet)
        metrics = retrain.run(cfg, inputs, a.out / f"arch{i}")
        rows[k] = {
            "cost": cost(arch),
            "inherited_valid_nll": inherited([arch])[0],
            "fine_tuned_valid_nll": metrics["best_valid_loss"],
            "minutes": (time.perf_counter() - t0) / 60,
        }
        atomic_write_json(state_file, state)
        print(json.dumps(rows[k]), flush=True)

    picked = [rows[key(arch)] for arch in archs]
    x = np.array([r["inherited_valid_nll"] for r in picked])
    y = np.array([r["fine_tuned_valid_nll"] for r in picked])
    state["kendall_tau"] = float(kendalltau(x, y).statistic)
    state["kendall_tau_95"] = bootstrap_tau(x, y)
    state["spearman"] = float(spearmanr(x, y).statistic)
    atomic_write_json(state_file, state)
    low, high = state["kendall_tau_95"]
    with figure(a.out / "supernet_rank.png", size=(6, 4.5)) as ax:
        sc = ax.scatter(x, y, c=[r["cost"] for r in picked], cmap="viridis")
        ax.figure.colorbar(sc, ax=ax, label=f"cost ({unit})")
        ax.set_xlabel("validation NLL, inherited supernet weights")
        ax.set_ylabel(f"validation NLL after fine-tuning ({a.updates} updates)")
        ax.set_title(f"Kendall's tau {state['kendall_tau']:.2f} [{low:.2f}, {high:.2f}] over {len(picked)} archs")
    print(f"\n| arch | cost ({unit}) | inherited NLL | fine-tuned NLL |\n|---|---|---|---|")
    for i, r in enumerate(picked):
        print(f"| {i} | {r['cost']:.3f} | {r['inherited_valid_nll']:.4f} | {r['fine_tuned_valid_nll']:.4f} |")
    print(f"\nKendall's tau {state['kendall_tau']:.3f} (95% bootstrap interval {low:.3f} to {high:.3f}), "
          f"Spearman {state['spearman']:.3f} ({len(picked)} archs)")  # fmt: skip


if __name__ == "__main__":
    main()

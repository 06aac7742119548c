"""Does the supernet rank architectures where the search has to choose? Kendall's tau, with a
bootstrap interval, between inherited-weight validation loss (the search's fitness) and
validation loss after the pipeline's own policy: inherit the supernet slice, then fine-tune.

Picks `--archs` distinct architectures at nearly equal cost just under the search's budget
(params.yaml `search.budget`, costed as the search costs it: the predictor, or GFLOPs):
seeded uniform samples whose cost lies in [`--band` x budget, budget]. Comparing archs
spread over the whole cost range would reward "bigger is better", which is not the choice
a search under a budget faces. Each is scored with the supernet's weights on the first
`--valid-sentences` validation sentences, then fine-tuned from the supernet with the
retrain recipe (params.yaml `retrain.train`) for `--updates` updates, once per fine-tuning
seed (`--seeds`), and scored on the same sentences. With two or more seeds, the tau between
two seeds' fine-tuned losses is the noise ceiling: how well fine-tuning ranks the archs against
itself, which bounds what any supernet's ranking can reach at this length. Results are kept per
arch and seed in `--out/rank.json`, so a killed run resumes with the next one.

    python bench/supernet_rank.py --data data/prepared --supernet models/supernet/supernet.pt \\
        --predictor models/predictor/predictor.pt --archs 12 --updates 165 --seeds 1 2 --out results/supernet_rank
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
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="fine-tuning seeds per arch")
    p.add_argument("--lr", type=float, help="fine-tuning LR (default: params.yaml retrain.train.lr)")
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
    } | ({"lr": a.lr} if a.lr else {})
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "space.yaml").write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))  # the supernet's space
    configs = {
        seed: retrain.load_config(
            {
                "retrain": section
                | {"space": str(a.out / "space.yaml"), "train": train | {"seed": seed}, "init_from_supernet": True}
            }  # fmt: skip
        )
        for seed in a.seeds
    }
    setup = {"updates": a.updates, "valid_sentences": a.valid_sentences, "supernet": str(a.supernet),
             "policy": "inherit, then fine-tune", "budget": budget, "band": a.band, "rows": "by seed",
             "lr": train.get("lr")}  # fmt: skip
    state_file = a.out / "rank.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("setup") != setup:
        state = {"setup": setup}
    rows = state.setdefault("rows", {})
    for seed in a.seeds:  # every arch once per seed: a killed run has whole seeds to compare
        for i, arch in enumerate(archs):
            row = rows.setdefault(key(arch), {"cost": cost(arch), "by_seed": {}, "minutes": {}})
            if str(seed) in row["by_seed"]:
                continue
            t0 = time.perf_counter()
            if "inherited_valid_nll" not in row:
                row["inherited_valid_nll"] = inherited([arch])[0]
            (a.out / f"arch{i}.yaml").write_text(arch.to_yaml())
            inputs = retrain.RetrainInputs(a.data, str(a.out / f"arch{i}.yaml"), a.supernet)
            metrics = retrain.run(configs[seed], inputs, a.out / f"arch{i}_seed{seed}")
            row["by_seed"][str(seed)] = metrics["best_valid_loss"]
            row["minutes"][str(seed)] = (time.perf_counter() - t0) / 60
            atomic_write_json(state_file, state)
            print(json.dumps({"arch": i, "seed": seed} | row), flush=True)

    picked = [rows[key(arch)] for arch in archs]
    x = np.array([r["inherited_valid_nll"] for r in picked])
    by_seed = np.array([[r["by_seed"][str(s)] for s in a.seeds] for r in picked])  # [archs, seeds]
    y = by_seed.mean(axis=1)  # the fine-tuned loss, averaged over seeds
    state["kendall_tau"] = float(kendalltau(x, y).statistic)
    state["kendall_tau_95"] = bootstrap_tau(x, y)
    state["spearman"] = float(spearmanr(x, y).statistic)
    if len(a.seeds) > 1:  # the noise ceiling: fine-tuning's own ranking, seed against seed
        state["seed_vs_seed_tau"] = float(kendalltau(by_seed[:, 0], by_seed[:, 1]).statistic)
        state["seed_vs_seed_tau_95"] = bootstrap_tau(by_seed[:, 0], by_seed[:, 1])
        state["seed_sd"] = float(by_seed.std(axis=1, ddof=1).mean())
    atomic_write_json(state_file, state)
    low, high = state["kendall_tau_95"]
    with figure(a.out / "supernet_rank.png", size=(6, 4.5)) as ax:
        sc = ax.scatter(x, y, c=[r["cost"] for r in picked], cmap="viridis")
        ax.figure.colorbar(sc, ax=ax, label=f"cost ({unit})")
        ax.set_xlabel("validation NLL, inherited supernet weights")
        ax.set_ylabel(f"validation NLL after fine-tuning ({a.updates} updates, mean of {len(a.seeds)} seeds)")
        ax.set_title(f"Kendall's tau {state['kendall_tau']:.2f} [{low:.2f}, {high:.2f}] over {len(picked)} archs")
    seeds = " | ".join(f"seed {s}" for s in a.seeds)
    print(f"\n| arch | cost ({unit}) | inherited NLL | fine-tuned NLL: {seeds} | mean |\n|---|---|---|"
          + "---|" * len(a.seeds) + "---|")  # fmt: skip
    for i, (r, ys) in enumerate(zip(picked, by_seed, strict=True)):
        print(f"| {i} | {r['cost']:.3f} | {r['inherited_valid_nll']:.4f} | "
              + " | ".join(f"{v:.4f}" for v in ys) + f" | {ys.mean():.4f} |")  # fmt: skip
    print(f"\nKendall's tau {state['kendall_tau']:.3f} (95% bootstrap interval {low:.3f} to {high:.3f}), "
          f"Spearman {state['spearman']:.3f} ({len(picked)} archs)")  # fmt: skip
    if "seed_vs_seed_tau" in state:
        sl, sh = state["seed_vs_seed_tau_95"]
        print(f"Noise ceiling: seed {a.seeds[0]} against seed {a.seeds[1]}, Kendall's tau "
              f"{state['seed_vs_seed_tau']:.3f} ({sl:.3f} to {sh:.3f}); mean sd between seeds "
              f"{state['seed_sd']:.4f} nats")  # fmt: skip


if __name__ == "__main__":
    main()

"""Does evolution beat random search? Each search setting against a random search with the
same number of fitness evaluations, over several search seeds, judged on held-out data.

Both searches score archs by the supernet's validation loss on the first
`valid_sentences` validation sentences (the search stage's fitness) under the search
stage's budget (params.yaml `search.budget`, costed by the predictor). Each winner is then
scored on validation sentences neither search saw (`--held-out` sentences after the
largest fitness subset), so a search that only found an arch that is lucky on its own
fitness subset gains nothing. Evolution beats random search beyond noise when its mean
held-out winner loss is lower by more than the random search's own seed spread (its
standard deviation over the seeds). Results are kept per (setting, seed) in
`--out/results.json`, so a killed run resumes with the next one.

    python bench/search_vs_random.py --data data/prepared --supernet models/supernet/supernet.pt \\
        --predictor models/predictor/predictor.pt --seeds 1 2 3 --out results/search_vs_random
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from automoe.config import read_yaml
from automoe.data.dataset import PreparedData
from automoe.io import atomic_write_json
from automoe.model.supernet import SuperTransformer
from automoe.search.evolution import EvolutionConfig, evolve, random_search
from automoe.stages import search

# name -> (evolution setting, fitness sentences). "default": params.yaml's make run setting.
SETTINGS = {
    "default": (dict(population=30, parents=8, mutations=11, crossovers=11, mutation_prob=0.3, iterations=4), 200),
    "mutation 0.1, 8 iterations": (
        dict(population=30, parents=8, mutations=11, crossovers=11, mutation_prob=0.1, iterations=8),
        200,
    ),
    "mutation 0.1, 8 iterations, fitness on 500": (
        dict(population=30, parents=8, mutations=11, crossovers=11, mutation_prob=0.1, iterations=8),
        500,
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--supernet", type=Path, required=True)
    p.add_argument("--predictor", type=Path, required=True)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--held-out", type=int, default=400, help="validation sentences the winners are judged on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/search_vs_random"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = search.load_config(read_yaml(a.params))
    data = PreparedData.open(a.data)
    supernet, _ = SuperTransformer.load(a.supernet)
    inputs = search.SearchInputs(a.data, a.supernet, a.predictor)
    cost, reference = search.cost_function(cfg, inputs, supernet, data)
    budget, dense, _ = search.absolute_budget(cfg, cost, supernet.space, supernet.space, reference)
    start = max(n for _, n in SETTINGS.values())  # held-out sentences come after every fitness subset
    held_out = search.ValidLoss(supernet, data, a.held_out, cfg.max_tokens, start=start)
    fitness = {n: search.ValidLoss(supernet, data, n, cfg.max_tokens) for n in {SETTINGS[s][1] for s in a.settings}}
    print(f"budget {budget:.2f} ms ({cfg.budget.value:g} x dense {dense:.2f} ms); held out: sentences "
          f"{start}-{start + a.held_out - 1} of the valid split")  # fmt: skip

    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for setting in a.settings:
        evo_cfg, sentences = SETTINGS[setting]
        for seed in a.seeds:
            k = f"{setting} | seed {seed}"
            if k in results:
                continue
            t0 = time.perf_counter()
            evo = evolve(supernet.space, EvolutionConfig(**evo_cfg), fitness[sentences], cost, budget, seed)
            rnd = random_search(supernet.space, len(evo.evaluated), fitness[sentences], cost, budget, seed)
            results[k] = {
                "setting": setting,
                "seed": seed,
                "evaluations": len(evo.evaluated),
                "evolution_fitness": evo.best.fitness,
                "random_fitness": rnd.best.fitness,
                "evolution_held_out": held_out([evo.best.arch])[0],
                "random_held_out": held_out([rnd.best.arch])[0],
                "seconds": time.perf_counter() - t0,
            }
            atomic_write_json(path, results)
            r = results[k]
            print(f"{k}: {r['evaluations']} evaluations each, held-out loss evolution {r['evolution_held_out']:.4f} "
                  f"random {r['random_held_out']:.4f} ({r['seconds']:.0f} s)", flush=True)  # fmt: skip

    header = "setting | evaluations | seeds | held-out loss of the winner: evolution | random"
    header += " | random − evolution (mean) | random's seed sd | beyond noise"
    print(f"\n| {header} |\n" + "|---" * 8 + "|")
    for setting in a.settings:
        rows = [r for r in results.values() if r["setting"] == setting and r["seed"] in a.seeds]
        if len(rows) < 2:
            continue
        evo = [r["evolution_held_out"] for r in rows]
        rnd = [r["random_held_out"] for r in rows]
        gain = statistics.mean(rnd) - statistics.mean(evo)
        sd = statistics.stdev(rnd)
        print(
            f"| {setting} | {rows[0]['evaluations']} | {len(rows)} "
            f"| {statistics.mean(evo):.4f} ({', '.join(f'{x:.4f}' for x in evo)}) "
            f"| {statistics.mean(rnd):.4f} ({', '.join(f'{x:.4f}' for x in rnd)}) "
            f"| {gain:+.4f} | {sd:.4f} | {'yes' if gain > sd else 'no'} |"
        )


if __name__ == "__main__":
    main()

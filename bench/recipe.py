"""Training recipes compared at the same wall-clock minutes on this machine.

Each candidate retrains the same dense arch (the default space's largest dense model:
d=256, 3+3 layers, FFN 1,024) on the same prepared data for about `--minutes` of wall
time: two short probes measure the candidate's seconds per update and its fixed costs
(start-up, the final validation), and `max_updates` is set so the run fits (the LR
schedule then spans the whole run, as it would in a real budget). Results are read on
the validation split only: validation NLL and sacreBLEU (beam 4, length penalty 0.6) on
the first `--valid-sentences` validation sentences.

    python bench/recipe.py --data data/prepared --minutes 5 --out results/recipe
    python bench/recipe.py --data data/prepared --minutes 5 --only pre_ln_lr2e-3

Prints one table (markdown) and writes results/recipe/recipe.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import sacrebleu
import torch

from automoe.config import load_section
from automoe.data.dataset import PreparedData
from automoe.serving import DecodeConfig, Translator
from automoe.stages import retrain

# name -> retrain.train overrides (everything else: the retrain defaults of params.yaml's
# structure, one micro-batch of <= max_tokens padded tokens per update)
BASE = {
    "max_tokens": 2048,
    "tokens_per_update": 0,
    "valid_interval": 100000,  # validated once, at the end
    "valid_max_sentences": 1014,
    "label_smoothing": 0.1,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "threads": 2,
    "seed": 1,
    "precision": "fp32",
}
CANDIDATES = {
    # the CPU defaults before this comparison: post-LN, large updates (~2 micro-batches of 4,096)
    "post_ln_big_updates_lr2e-3_cosine": {
        "norm": "post",
        "lr": 2e-3,
        "schedule": "cosine",
        "warmup_updates": 16,
        "max_tokens": 4096,
        "tokens_per_update": 8192,
    },
    "post_ln_lr1e-3_isqrt_w100": {"norm": "post", "lr": 1e-3, "schedule": "inverse_sqrt", "warmup_updates": 100},
    "pre_ln_lr1e-3_isqrt_w100": {"norm": "pre", "lr": 1e-3, "schedule": "inverse_sqrt", "warmup_updates": 100},
    "pre_ln_lr2e-3_cosine_w100": {"norm": "pre", "lr": 2e-3, "schedule": "cosine", "warmup_updates": 100},
    "post_ln_lr2e-3_cosine_w100": {"norm": "post", "lr": 2e-3, "schedule": "cosine", "warmup_updates": 100},
    # the same recipe with bf16 autocast (CPUs with native bf16): more updates per minute
    "pre_ln_lr2e-3_cosine_w100_bf16": {
        "norm": "pre",
        "lr": 2e-3,
        "schedule": "cosine",
        "warmup_updates": 100,
        "precision": "bf16",
    },
    "pre_ln_lr2e-3_cosine_w100_avg3": {
        "norm": "pre",
        "lr": 2e-3,
        "schedule": "cosine",
        "warmup_updates": 100,
        "average_last": 3,
        "keep_last": 3,
        "valid_interval": "last_quarter",
    },
}


def config(overrides: dict, max_updates: int) -> retrain.RetrainConfig:
    train = BASE | overrides | {"max_updates": max_updates}
    if train.get("valid_interval") == "last_quarter":  # checkpoints to average: 3 in the last quarter
        train["valid_interval"] = max(1, max_updates // 12)
    return load_section(retrain.RetrainConfig, "retrain", {"retrain": {"space": "small", "train": train}})


def valid_bleu(folder: Path, data: PreparedData, n: int) -> float:
    split = data.split("valid")
    srcs = (data.root / "valid.src.txt").read_text().splitlines()[:n]
    refs = (data.root / "valid.tgt.txt").read_text().splitlines()[:n]
    assert len(split) >= n
    hyps = Translator.from_folder(folder, DecodeConfig(beam=4, length_penalty=0.6)).translate(srcs)
    return sacrebleu.corpus_bleu(hyps, [refs]).score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("results/recipe"))
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--valid-sentences", type=int, default=500)
    p.add_argument("--only", nargs="*", help="candidate names")
    a = p.parse_args()
    data = PreparedData.open(a.data)
    a.out.mkdir(parents=True, exist_ok=True)
    results_file = a.out / "recipe.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name, overrides in CANDIDATES.items():
        if a.only and name not in a.only:
            continue
        took = {}
        for n in (5, 25):  # two probes: their difference is the time of 20 updates without the fixed costs
            t0 = time.perf_counter()
            retrain.run(
                config(overrides, n), retrain.RetrainInputs(a.data, "largest_dense"), a.out / f"{name}.probe{n}"
            )
            took[n] = time.perf_counter() - t0
        per_update, fixed = (took[25] - took[5]) / 20, took[5] - 5 * (took[25] - took[5]) / 20
        updates = max(20, int((a.minutes * 60 - fixed) / per_update))
        folder = a.out / name
        t0 = time.perf_counter()
        metrics = retrain.run(config(overrides, updates), retrain.RetrainInputs(a.data, "largest_dense"), folder)
        minutes = (time.perf_counter() - t0) / 60
        bleu = valid_bleu(folder, data, a.valid_sentences)
        results[name] = {
            "overrides": overrides,
            "updates": updates,
            "minutes": round(minutes, 2),
            "target_tokens_seen": metrics["target_tokens_seen"],
            "valid_nll": round(metrics["best_valid_loss"], 4),
            "valid_bleu": round(bleu, 2),
        }
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({name: results[name]}), flush=True)
    head = f"valid BLEU ({a.valid_sentences} sent., beam 4)"
    print(f"\n| recipe | updates | minutes | target tokens | valid NLL | {head} |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        row = [name, r["updates"], r["minutes"], f"{r['target_tokens_seen']:,.0f}", r["valid_nll"], r["valid_bleu"]]
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()

"""Tables, figures and MLflow runs of a finished multi30k_fair run (run.sh), for BENCHMARKS.md.

    python configs/experiments/multi30k_fair/report.py [OUT] [--figures bench/figures] [--no-mlflow] [--metrics F]

Writes OUT/report.md (goals, models, dense curve, routing, the LR each family chose on
validation, the ablation with 95% intervals, searches against random search, stage times,
hardware), the figures `multi30k_fair_bleu_vs_latency.png`, `multi30k_fair_pareto.png` and
`multi30k_fair_valid_curves.png` (into OUT/figures, and copied to --figures), and logs them to
MLflow: a parent run `multi30k_fair` with the report and figures, one child run per model
with its arch, training record, test figures and training curves. The store is
MLFLOW_TRACKING_URI, else OUT/mlflow.db. `--metrics PATH` (run.sh: OUT/report.json) records
that the report was made, and the parent run's id.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
from pathlib import Path

import yaml

from automoe.io import atomic_write_json, atomic_write_text
from automoe.plots import figure
from automoe.train.trainer import read_valid_history

REF = "dense_d256_l3x3_f1024"
SEARCHES = {  # search (folders search/<search>_s<seed>) -> (label, budget as a fraction of the reference's latency)
    "het_b33": ("heterogeneous experts, 1/3", 1 / 3),
    "het_b50": ("heterogeneous experts, 1/2", 1 / 2),
    "hom_b50": ("homogeneous experts, 1/2", 1 / 2),
    "dense_b50": ("dense-only search (HAT), 1/2", 1 / 2),
}
ARMS = {"het_b50": "heterogeneous", "hom_b50": "homogeneous", "dense_b50": "dense-only (HAT)"}
SMALLEST = "dense_d192_l2x1_f256"  # the space's fastest arch: the floor of any budget
FIGURES = ("multi30k_fair_bleu_vs_latency.png", "multi30k_fair_pareto.png", "multi30k_fair_valid_curves.png")


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t975(dof: float) -> float:
    """Student's t two-sided 95% quantile; a fractional (Welch) dof rounds down (wider)."""
    if dof < 1:
        return float("nan")
    return T975[max(k for k in T975 if k <= int(dof))] if dof <= 30 else 1.96


def kind(name: str) -> tuple[str, str, int]:
    """(group, search or '', seed) of a retrain folder's name (a retry's `_t<try>` set aside)."""
    if name.startswith("dense_d"):
        return "dense", "", 1
    search, seed = name.rsplit("_s", 1)
    return "searched", search, int(seed.split("_t")[0])


def attempt(name: str) -> int:
    """Which search of its seed a model's is: 1, or the try of a retry over budget (`..._s1_t2`)."""
    return int(name.rsplit("_t", 1)[1]) if "_t" in name.rsplit("_s", 1)[-1] else 1


def final(models: dict[str, dict]) -> dict[str, dict]:
    """The models that stand: each search seed's last try (a model over its budget is replaced)."""
    return {n: m for n, m in models.items() if not (m.get("replaced") or m.get("unused"))}


def label(search: str) -> str:
    return SEARCHES[search][0] if search in SEARCHES else search


def family_lr(out: Path, m: dict) -> float | None:
    """The fine-tuning LR of a model's family (the dense models: the reference's), chosen on validation."""
    path = out / f"lr_{m['search'] or 'dense'}.json"
    return json.loads(path.read_text())["lr"] if path.is_file() else None


def load(out: Path) -> dict[str, dict]:
    """Every evaluated model: its test figures, and its latency relative to the reference
    measured in the same alternating rounds (`ratio`); the reference from all evaluations."""
    models: dict[str, dict] = {}
    ref_runs: list[dict] = []
    for path in sorted((out / "evaluate").glob("*/metrics.json")):
        m = json.loads(path.read_text())
        name = path.parent.name
        mine = {k[len("searched_") :]: v for k, v in m.items() if k.startswith("searched_")}
        ref = {k[len("dense_") :]: v for k, v in m.items() if k.startswith("dense_")}
        mine["ratio"] = mine["latency_ms"] / ref["latency_ms"]
        models[name] = mine | {"signature": m["bleu_signature"], "chrf_signature": m["chrf_signature"]}
        ref_runs.append(ref)
    if ref_runs:
        # the reference is one model, decoded deterministically: every evaluation must agree on its scores
        for key in ("bleu", "chrf"):
            seen = sorted({round(r[key], 6) for r in ref_runs})
            if len(seen) > 1:
                raise ValueError(f"{out / 'evaluate'}: the reference's {key} differs between evaluations: {seen}")
        ref = dict(ref_runs[0])
        for key in ("latency_ms", "encoder_ms", "decoder_ms", "translate_sentences_per_s"):
            ref[key] = statistics.median(r[key] for r in ref_runs)
        ref["ratio"] = 1.0
        ref["signature"] = next(iter(models.values()))["signature"]
        models[REF] = ref
    ref_ms = models[REF]["latency_ms"] if models else float("nan")
    for name, m in models.items():
        group, search, seed = kind(name)
        m |= {
            "group": group,
            "search": search,
            "seed": seed,
            "try": attempt(name),
            "latency_at_ref": m["ratio"] * ref_ms,
        }
        arch = out / "retrain" / name / "arch.yaml"
        m["arch"] = yaml.safe_load(arch.read_text()) if arch.is_file() else {}
        trained = out / "retrain" / name / "metrics.json"  # the validation figure models are chosen by
        m["valid_loss"] = json.loads(trained.read_text())["best_valid_loss"] if trained.is_file() else float("nan")
        m["lr"] = family_lr(out, m)
        verdict = out / f"budget_{name}.json"
        m["budget_verdict"] = json.loads(verdict.read_text()) if verdict.is_file() else None
    chains: dict[tuple[str, int], dict[int, dict]] = {}
    for m in models.values():
        m["replaced"] = m["unused"] = False
        if m["group"] == "searched":
            chains.setdefault((m["search"], m["seed"]), {})[m["try"]] = m
    for tries in chains.values():  # a try stands unless its verdict is over and the next try exists
        t = min(tries)
        while (tries[t]["budget_verdict"] or {}).get("over") and t + 1 in tries:
            tries[t]["replaced"], t = True, t + 1
        for later in (u for u in tries if u > t):
            tries[later]["unused"] = True  # after a try that stands (its verdict changed since)
    return dict(sorted(models.items(), key=lambda kv: (kv[1]["group"] != "dense", -kv[1]["ratio"], kv[0])))


def dense_curve(models: dict[str, dict]) -> list[tuple[float, float]]:
    """(latency ratio, BLEU) of the dense family, fastest first, kept only where BLEU rises
    with latency (the curve a user would pick from: a slower and worse model is dominated)."""
    points = sorted((m["ratio"], -m["bleu"]) for m in models.values() if m["group"] == "dense")
    front: list[tuple[float, float]] = []
    for x, neg_y in points:  # at one ratio, the best BLEU comes first and the others are dominated
        if not front or (-neg_y > front[-1][1] and x > front[-1][0]):
            front.append((x, -neg_y))
    return front


def curve_bleu(curve: list[tuple[float, float]], x: float) -> float | None:
    """The dense curve's BLEU at latency ratio x (linear between points, flat after the last;
    None below the fastest dense model, where the dense family has nothing to offer)."""
    if not curve or x < curve[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


def above_curve(curve: list[tuple[float, float]], m: dict) -> tuple[float | None, bool]:
    """(BLEU above the dense curve at m's latency, whether m is on or above the curve)."""
    y = curve_bleu(curve, m["ratio"])
    if y is None:  # faster than every dense model: above the curve if it beats the fastest one
        return m["bleu"] - curve[0][1], m["bleu"] >= curve[0][1]
    return m["bleu"] - y, m["bleu"] >= y


def seed_sd(models: dict[str, dict]) -> float | None:
    """The BLEU spread between runs of one searched configuration (pooled sd over the searches
    run with more than one seed), or None where no search was repeated."""
    groups: dict[str, list[float]] = {}
    for m in final(models).values():
        if m["group"] == "searched":
            groups.setdefault(m["search"], []).append(m["bleu"])
    repeated = [b for b in groups.values() if len(b) > 1]
    if not repeated:
        return None
    dof = sum(len(b) - 1 for b in repeated)
    return (sum(statistics.variance(b) * (len(b) - 1) for b in repeated) / dof) ** 0.5


def versus_curve(curve: list[tuple[float, float]], m: dict, sd: float | None) -> str:
    """'above', 'below' or 'within noise' of the dense curve: a difference of two single runs
    counts only beyond 1.96 * sqrt(2) * the seed sd; without a measured sd, 'unknown noise'."""
    diff = above_curve(curve, m)[0]
    if sd is None:
        return "unknown noise"
    margin = 1.96 * math.sqrt(2) * sd
    return "above" if diff > margin else "below" if diff < -margin else "within noise"


def chosen_on_validation(candidates: list[dict]) -> dict | None:
    """The model a user would pick without looking at the test set: the lowest validation loss."""
    known = [m for m in candidates if not math.isnan(m.get("valid_loss", float("nan")))]
    return min(known, key=lambda m: m["valid_loss"], default=None)


def describe(arch: dict) -> str:
    if not arch:
        return "-"
    enc, dec = arch["encoder_ffn"], arch["decoder_ffn"]

    def ffn(layers: list[list[int]]) -> str:
        return " ".join("/".join(str(s) for s in e) if len(e) > 1 else str(e[0]) for e in layers)

    return f"enc d={arch['encoder_embed_dim']} [{ffn(enc)}], dec d={arch['decoder_embed_dim']} [{ffn(dec)}]" + (
        f", top-{arch['top_k']}" if any(len(e) > 1 for e in enc + dec) else ""
    )


def models_table(models: dict[str, dict], curve: list[tuple[float, float]]) -> str:
    lines = [
        "| model | seed | arch (FFN per layer; a/b = experts) | BLEU | chrF | latency (ms) | × reference "
        "| enc / dec (ms) | GFLOPs | params active / total | test sent/s | vs dense curve "
        "| init, updates, target tokens | fine-tuning LR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sd = seed_sd(models)
    for name, m in models.items():
        title = name if m["group"] == "dense" else label(m["search"])
        if m["group"] == "searched" and m["try"] > 1:
            title += f", try {m['try']}"
        if m.get("replaced"):
            title += " (over budget: replaced)"
        if m.get("unused"):
            title += " (not used: an earlier try is within budget)"
        vs = "-" if m["group"] == "dense" else f"{above_curve(curve, m)[0]:+.2f} ({versus_curve(curve, m, sd)})"
        lines.append(
            f"| {title} | {m['seed']} | {describe(m['arch'])} | {m['bleu']:.2f} | {m['chrf']:.2f} "
            f"| {m['latency_ms']:.1f} | {m['ratio']:.3f} | {m['encoder_ms']:.1f} / {m['decoder_ms']:.1f} "
            f"| {m['gflops']:.3f} | {m['params_active'] / 1e6:.2f}M / {m['params_total'] / 1e6:.2f}M "
            f"| {m['translate_sentences_per_s']:.0f} | {vs} "
            f"| {m['init']}, {m['train_updates']:.0f}, {m['train_target_tokens'] / 1e6:.2f}M "
            f"| {m['lr'] if m.get('lr') is not None else '-'} |"
        )
    return "\n".join(lines)


def routing(models: dict[str, dict]) -> str:
    """Every MoE model at the routing measured on the test set (evaluate): GFLOPs and active
    parameters there against uniform routing's, and how unbalanced each layer is."""
    lines = [
        "| model | seed | GFLOPs: uniform / measured routing | params active: uniform / measured "
        "| busiest expert's share per MoE layer (balanced: 1/n) |",
        "|---|---|---|---|---|",
    ]
    for name, m in models.items():
        loads = m.get("expert_loads") or {}
        if not loads:
            continue
        busiest = ", ".join(f"{layer} {max(v):.2f} (1/{len(v)})" for layer, v in loads.items())
        title = label(m["search"]) if m["search"] else name
        title += (f", try {m['try']}" if m.get("try", 1) > 1 else "") + (" (replaced)" if m.get("replaced") else "")
        lines.append(
            f"| {title} | {m['seed']} "
            f"| {m['gflops']:.3f} / {m['gflops_routed']:.3f} "
            f"| {m['params_active'] / 1e6:.2f}M / {m['params_active_routed'] / 1e6:.2f}M | {busiest} |"
        )
    return "\n".join(lines) if len(lines) > 2 else "No model routes: every one is dense."


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean's 95% Student-t interval (nan bounds for a single value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def difference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): Welch's 95% interval of the difference of the means."""
    d = statistics.mean(a) - statistics.mean(b)
    if len(a) < 2 or len(b) < 2:
        return d, float("nan"), float("nan")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return d, d, d
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t975(dof) * math.sqrt(va + vb)
    return d, d - half, d + half


def arms(models: dict[str, dict]) -> dict[str, list[float]]:
    """The ablation's BLEU per arm, one value per independent run (search and fine-tuning seed)."""
    standing = final(models).values()
    return {
        arm: [m["bleu"] for m in standing if m["search"] == search]
        for search, arm in ARMS.items()
        if any(m["search"] == search for m in standing)
    }


def ablation(models: dict[str, dict]) -> str:
    lines = [
        "| space (budget 1/2) | runs | BLEU mean [95% interval] | sd | BLEU per run (seed 1, 2, ...) | chrF mean "
        "| latency × reference (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for search, arm in ARMS.items():
        ms = sorted((m for m in final(models).values() if m["search"] == search), key=lambda m: m["seed"])
        if not ms:
            continue
        b = [m["bleu"] for m in ms]
        mean, low, high = interval(b)
        sd = statistics.stdev(b) if len(b) > 1 else float("nan")
        lines.append(
            f"| {arm} | {len(ms)} | {mean:.2f} [{low:.2f}, {high:.2f}] | {sd:.2f} | {', '.join(f'{x:.2f}' for x in b)} "
            f"| {statistics.mean(m['chrf'] for m in ms):.2f} | {statistics.mean(m['ratio'] for m in ms):.3f} |"
        )
    return "\n".join(lines) + "\n\n" + ordering(models)


def ordering(models: dict[str, dict]) -> str:
    """The arms ranked by mean BLEU, each adjacent pair's difference with its Welch 95%
    interval, and whether the arms' own intervals overlap."""
    per_arm = arms(models)
    ranked = sorted(per_arm, key=lambda a: -statistics.mean(per_arm[a]))
    if len(ranked) < 2:
        return "Ordering: fewer than two arms."
    lines = ["Ordering by mean BLEU: " + " > ".join(ranked) + "."]
    for a, b in zip(ranked, ranked[1:], strict=False):
        d, low, high = difference(per_arm[a], per_arm[b])
        (_, la, _), (_, _, hb) = interval(per_arm[a]), interval(per_arm[b])
        if math.isnan(low):
            verdict = "not decided (an arm has a single run)"
        else:
            overlap = "overlap" if la <= hb else "do not overlap"
            verdict = (
                f"difference {d:+.2f} BLEU [{low:+.2f}, {high:+.2f}]: "
                + ("separated (excludes 0)" if low > 0 else "not separated (includes 0)")
                + f"; the arms' intervals {overlap}"
            )
        lines.append(f"- {a} vs {b}: {verdict}.")
    return "\n".join(lines)


def learning_rates(out: Path) -> str:
    """Each family's sweep (validation loss by LR) and the LR it chose."""
    rows = []
    for path in sorted(out.glob("lr_*.json")):
        chosen = json.loads(path.read_text())
        family = path.stem.removeprefix("lr_")
        losses = ", ".join(f"{lr}: {loss:.3f}" for lr, loss in chosen["valid_loss"].items())
        title = "dense family (the reference)" if family == "dense" else label(family)
        rows.append(f"| {title} | {losses} | {chosen['lr']} |")
    if not rows:
        return "No LR sweep."
    return "| family (sweep model) | validation loss by LR | chosen |\n|---|---|---|\n" + "\n".join(rows)


def floor(out: Path) -> str:
    """Why there is no 1/3 search, when the search refused it (run.sh keeps its one-line error)."""
    refused = out / "search_het_b33_s1.refused"
    return f"; the 1/3 search was refused: {refused.read_text().strip()}" if refused.is_file() else ""


def goals(models: dict[str, dict], curve: list[tuple[float, float]], out: Path | None = None) -> str:
    if REF not in models:
        return "(no evaluation yet)"
    ref = models[REF]
    searched = [m for m in final(models).values() if m["group"] == "searched"]
    fast = [m for m in searched if m["ratio"] <= 1 / 3]
    best = chosen_on_validation(fast)
    lines = [
        f"- Reference (d=256 3+3) >= 35 BLEU on test2016: **{'met' if ref['bleu'] >= 35 else 'missed'}** "
        f"({ref['bleu']:.2f}).",
        "- A searched model at <= 1/3 of the reference's measured latency within 0.5 BLEU of it: "
        + (
            f"**{'met' if ref['bleu'] - best['bleu'] <= 0.5 else 'missed'}** (of {len(fast)} such models, the one "
            f"with the lowest validation loss: {best['bleu']:.2f} BLEU at {best['ratio']:.3f}x, "
            f"{best['bleu'] - ref['bleu']:+.2f})."
            if best
            else "**missed** (no searched model measured at or under 1/3: "
            + ", ".join(f"{m['ratio']:.3f}x" for m in searched)
            + (f"; the space's fastest arch measured {models[SMALLEST]['ratio']:.3f}x" if SMALLEST in models else "")
            + (floor(out) if out else "")
            + ")."
        ),
    ]
    judged = [m for m in searched if m.get("budget_verdict")]
    if judged:
        over = [m for m in judged if m["budget_verdict"]["over"]]
        slack = judged[0]["budget_verdict"]["slack"]
        lines.append(
            f"- Every standing searched model within its budget on its fine-tuned routing ({slack:+.0%}): "
            f"**{'missed' if over else 'met'}** ({len(judged) - len(over)} of {len(judged)}; "
            f"{sum(m['try'] > 1 for m in judged)} after a retry"
            + (
                "; over: " + ", ".join(f"{label(m['search'])} seed {m['seed']} {m['ratio']:.3f}x" for m in over)
                if over
                else ""
            )
            + ")."
        )
    close = [m for m in searched if ref["bleu"] - m["bleu"] <= 0.5]
    fastest = min(close, key=lambda m: m["ratio"], default=None)
    if fastest:
        lines.append(
            f"- The fastest searched model within 0.5 BLEU of the reference: {fastest['ratio']:.3f}x its latency "
            f"({label(fastest['search'])}, seed {fastest['seed']}, {fastest['bleu']:.2f} BLEU)."
        )
    sd = seed_sd(models)
    where = [versus_curve(curve, m, sd) for m in searched]
    if sd is None:
        lines.append(
            "- Every searched point on or above the dense curve: **not decided** (no search was run with more "
            f"than one seed, so the noise is unknown; {sum(above_curve(curve, m)[1] for m in searched)} of "
            f"{len(searched)} at or above it by the point estimates)."
        )
    else:
        lines.append(
            f"- No searched point below the dense curve beyond the noise: **{'missed' if 'below' in where else 'met'}**"
            f" ({where.count('above')} above, {where.count('within noise')} within noise, {where.count('below')} "
            f"below, of {len(where)}; noise: ±{1.96 * math.sqrt(2) * sd:.2f} BLEU, 1.96·√2 × the seed sd {sd:.2f})."
        )
    per_arm = arms(models)
    if len(per_arm) > 1:
        ranked = sorted(per_arm, key=lambda a: -statistics.mean(per_arm[a]))
        paper = [a for a in ARMS.values() if a in per_arm]  # the paper's: heterogeneous > homogeneous > dense-only
        separated = [difference(per_arm[a], per_arm[b])[1] > 0 for a, b in zip(ranked, ranked[1:], strict=False)]
        lines.append(
            f"- Heterogeneous > homogeneous > dense-only (the paper's ordering): by the means "
            f"**{'as the paper' if ranked == paper else 'not as the paper'}** ({' > '.join(ranked)}); "
            f"{sum(separated)} of {len(separated)} adjacent differences separated by their 95% intervals "
            f"(runs per arm: {', '.join(str(len(v)) for v in per_arm.values())})."
        )
    return "\n".join(lines)


def searches(out: Path) -> str:
    lines = [
        "| search | seed | evaluations | budget (ms) | winner predicted (ms) | winner valid loss | random search best "
        "| evolution − random (nats) | winner measured in evaluate (× reference) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    gains: dict[str, list[float]] = {}
    for folder in sorted((out / "search").glob("*_s*"), key=lambda f: (f.name.rsplit("_s", 1)[0], f.name)):
        path = folder / "metrics.json"
        if not path.is_file():
            continue
        _, search, seed = kind(folder.name)
        tried = attempt(folder.name)
        m = json.loads(path.read_text())
        ev = out / "evaluate" / folder.name / "metrics.json"
        measured = "-"
        if ev.is_file():
            e = json.loads(ev.read_text())
            measured = f"{e['searched_latency_ms'] / e['dense_latency_ms']:.3f}"
        random_best = m.get("random_best_fitness", float("nan"))
        gain = random_best - m["best_fitness"]  # lower loss is better: > 0 where evolution found the better arch
        if not math.isnan(gain) and tried == 1:  # evolution vs random: the independent first searches
            gains.setdefault(search, []).append(gain)
        run = f"{seed} (try {tried})" if tried > 1 else f"{seed}"
        lines.append(
            f"| {label(search)} | {run} | {m['evaluations']:.0f} | {m['budget']:.1f} | {m['best_cost']:.1f} "
            f"| {m['best_fitness']:.3f} | {random_best:.3f} | {gain:+.4f} | {measured} |"
        )
    summary = []
    for search, g in gains.items():
        mean, low, high = interval(g)
        spread = (
            f"over {len(g)} search seeds [{low:+.4f}, {high:+.4f}]"
            + (" (beyond the seeds' noise)" if low > 0 else " (not beyond the seeds' noise)")
            if len(g) > 1
            else "with one search seed (no interval)"
        )
        summary.append(f"- {label(search)}: evolution's winner {mean:+.4f} nats better than random search's {spread}")
    return "\n".join(lines) + ("\n\n" + "\n".join(summary) if summary else "")


def budgets(models: dict[str, dict]) -> str:
    """Each searched model's latency on its served (fine-tuned) routing against its budget, and
    what followed: within it, or its search run again at a tighter fraction (budget_retry.py)."""
    lines = [
        "| model | seed | try | search's fraction | measured × reference | budget (+ slack) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in sorted(models.values(), key=lambda m: (m["search"], m["seed"], m["try"])):
        v = m.get("budget_verdict")
        if m["group"] != "searched" or not v:
            continue
        if not v["over"]:
            verdict = "within budget"
        elif m["replaced"]:
            verdict = f"over: searched again at {v['next_fraction']:.4f}"
        else:
            verdict = "**over, not replaced** (no try left, or the tighter search was refused)"
        lines.append(
            f"| {label(m['search'])} | {m['seed']} | {m['try']} | {v['fraction']:.4f} | {m['ratio']:.3f} "
            f"| {v['budget']:.4f} ({v['slack']:+.0%}) | {verdict} |"
        )
    if len(lines) == 2:
        return "No budget verdicts."
    standing = [m for m in final(models).values() if m["group"] == "searched" and m.get("budget_verdict")]
    within = sum(not m["budget_verdict"]["over"] for m in standing)
    return "\n".join(lines) + f"\n\n{within} of {len(standing)} standing searched models within their budget."


def times(out: Path) -> str:
    path = out / "times.tsv"
    if not path.is_file():
        return ""
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    total = sum(int(b) for _, b in rows)
    body = "\n".join(f"| {a} | {int(b)} |" for a, b in rows)
    return f"| step | seconds |\n|---|---|\n{body}\n| sum of steps (retrains ran two at a time) | {total} |"


def plots(out: Path, models: dict[str, dict], curve: list[tuple[float, float]], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f for f in FIGURES]
    ref_ms = models[REF]["latency_ms"] if REF in models else 1.0
    with figure(paths[0], size=(7.5, 5)) as ax:
        dense = sorted((m["latency_at_ref"], m["bleu"], n) for n, m in models.items() if m["group"] == "dense")
        ax.plot([d[0] for d in dense], [d[1] for d in dense], "s-", color="black", label="dense family")
        for x, y, n in dense:
            ax.annotate(n.removeprefix("dense_"), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        markers = {"het_b33": "D", "het_b50": "o", "hom_b50": "^", "dense_b50": "v"}
        replaced = [m for m in models.values() if m.get("replaced")]
        if replaced:
            ax.scatter(
                [m["latency_at_ref"] for m in replaced],
                [m["bleu"] for m in replaced],
                marker="x",
                color="grey",
                s=40,
                label="over budget after fine-tuning (replaced by a retry)",
            )
        for search, (title, _) in SEARCHES.items():
            ms = [m for m in final(models).values() if m["search"] == search]
            if ms:
                ax.scatter(
                    [m["latency_at_ref"] for m in ms],
                    [m["bleu"] for m in ms],
                    marker=markers[search],
                    s=50,
                    label=title + " (each run)",
                )
        for fraction in sorted({f for _, f in SEARCHES.values()}):
            ax.axvline(fraction * ref_ms, color="grey", ls=":", lw=1)
        ax.set_xlabel(f"latency (ms, batch 1, beam 5, 30+30 tokens; reference {ref_ms:.1f} ms; dotted: budgets)")
        ax.set_ylabel("BLEU (test2016, beam 4, lenpen 0.6)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    with figure(paths[1], size=(7.5, 4.5)) as ax:
        for name, (title, _) in SEARCHES.items():
            s = out / "search" / f"{name}_s1"  # one front per space: the seed-1 search
            if not (s / "pareto.csv").is_file():
                continue
            rows = []
            for f in ("population.csv", "random.csv"):
                if (s / f).is_file():
                    rows += list(csv.DictReader(open(s / f)))
            dots = ax.scatter([float(r["cost"]) for r in rows], [float(r["fitness"]) for r in rows], s=6, alpha=0.3)
            front = list(csv.DictReader(open(s / "pareto.csv")))
            ax.plot(
                [float(r["cost"]) for r in front],
                [float(r["fitness"]) for r in front],
                "o-",
                ms=3,
                color=dots.get_facecolor()[0][:3],
                label=title + " (seed 1)",
            )
            budget = json.loads((s / "metrics.json").read_text())["budget"]
            ax.axvline(budget, color=dots.get_facecolor()[0][:3], ls="--", lw=1)
        ax.set_xlabel("predicted latency (ms; dashed: each search's budget)")
        ax.set_ylabel("validation loss (inherited supernet weights)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    with figure(paths[2], size=(7.5, 4.5)) as ax:
        for name, m in models.items():
            path = out / "retrain" / name / "valid_curves.csv"
            if path.is_file():
                rows = read_valid_history(path)
                key = [k for k in rows[0] if k != "update"][0]
                style = "-" if m["group"] == "dense" else "--"
                ax.plot([r["update"] for r in rows], [r[key] for r in rows], style, marker=".", lw=1, label=name)
        ax.set_xlabel("fine-tuning update (one micro-batch of <= 2,048 padded tokens)")
        ax.set_ylabel("validation NLL per token")
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
    return paths


def report(out: Path, models: dict[str, dict], curve: list[tuple[float, float]]) -> str:
    parts = [
        "# multi30k_fair\n",
        "## Goals\n\n" + goals(models, curve, out),
        "## Models (test2016)\n\n" + models_table(models, curve),
        "Dense curve (latency × reference, BLEU): " + ", ".join(f"({x:.3f}, {y:.2f})" for x, y in curve),
        "## Routing (test2016)\n\n" + routing(models),
        "## Budgets on the fine-tuned routing\n\n" + budgets(models),
        "## Fine-tuning LR, chosen on validation\n\n" + learning_rates(out),
        "## Ablation at 1/2 of the reference's latency\n\n" + ablation(models),
        "## Searches\n\n" + searches(out),
        "## Stage wall times\n\n" + times(out),
    ]
    if models:
        parts.append(f"BLEU signature: `{models[REF]['signature']}`")
    for name in ("train_supernet", "measure_latency", "train_predictor"):
        path = out / f"{name}.json"
        if path.is_file():
            parts.append(f"{name}: `{json.dumps(json.loads(path.read_text()))}`")
    fp = out / "latency" / "hardware.json"
    if fp.is_file():
        parts.append(f"hardware: `{json.dumps(json.loads(fp.read_text()))}`")
    return "\n\n".join(parts) + "\n"


def log_to_mlflow(out: Path, models: dict[str, dict], figures: list[Path]) -> str:
    """A parent run with the report and figures, a child run per model; returns the parent id."""
    os.environ["AUTOMOE_TRACKING"] = "1"
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "multi30k_fair")
    from automoe import tracking

    parent = tracking.start_parent("multi30k_fair", tags={"automoe.experiment": "multi30k_fair"})
    with tracking.stage_run("report", parent) as run:
        run.log_artifact(out / "report.md")
        for path in figures:
            run.log_artifact(path, "figures")
        for folder in sorted((out / "search").glob("*_s*")):
            for f in ("pareto.csv", "best_arch.yaml", "metrics.json"):
                if (folder / f).is_file():
                    run.log_artifact(folder / f, f"search/{folder.name}")
    for name, m in models.items():
        with tracking.stage_run(name, parent) as run:
            run.log_params({"group": m["group"], "search": m["search"], "seed": m["seed"], "arch": m["arch"]})
            run.log_metrics({k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for f in ("training_curve.png", "valid_curves.csv", "curves.csv", "arch.yaml", "metrics.json"):
                if (out / "retrain" / name / f).is_file():
                    run.log_artifact(out / "retrain" / name / f, "retrain")
    return parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="results/experiments/multi30k_fair", type=Path)
    parser.add_argument("--figures", type=Path, help="also copy the figures here (BENCHMARKS.md: bench/figures)")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--metrics", type=Path, help="write a summary here when done")
    args = parser.parse_args()
    out = args.out.absolute()
    models = load(out)
    curve = dense_curve(models)
    figures = plots(out, models, curve, out / "figures")
    text = report(out, models, curve)
    atomic_write_text(out / "report.md", text)
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        for path in figures:
            shutil.copyfile(path, args.figures / path.name)
    parent = None if args.no_mlflow else log_to_mlflow(out, models, figures)
    if args.metrics:
        atomic_write_json(args.metrics, {"models": len(models), "mlflow_parent_run": parent})
    print(f"report: {out / 'report.md'} ({len(models)} models; MLflow parent run {parent})")


if __name__ == "__main__":
    main()

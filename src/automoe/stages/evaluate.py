"""evaluate: the searched model beside the dense baseline — sacreBLEU, chrF, latency, GFLOPs, params.

Each model translates the test split with batched beam search (beam 4, length penalty
0.6), is detokenised with SentencePiece and scored with sacreBLEU against the raw
references (BLEU and chrF, with signatures); its latency is measured with the
measure_latency protocol; GFLOPs, parameters (total, active, without embeddings) and a
per-token active-FLOPs histogram (the adaptive-computation view) are computed.
Latency is timed in `latency_rounds` alternating rounds (searched, dense, searched, ...)
with the kernel plan the latency table was timed with (`--latency`, model/kernels.py):
the ratio searched/dense of each round, its median and its range over the rounds are
what the promotion gate decides on. Output folder: `metrics.json` (DVC metrics),
`hyp.<name>.txt`, `report.md`, `flops_per_token.png`, `kernels.json` (the plan timed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sacrebleu
import torch
from tqdm import tqdm

from automoe.config import load_section
from automoe.data.dataset import PreparedData
from automoe.errors import DataError
from automoe.io import atomic_write_json, atomic_write_text, staged_dir
from automoe.latency import measure as m
from automoe.model import kernels
from automoe.model.counting import count, expert_shares, layer_name, per_token_flops
from automoe.plots import figure
from automoe.serving import DecodeConfig, Translator
from automoe.stages._cli import cli_run, component_run, guarded, stage_parser
from automoe.stages.retrain import initialisation, training_record
from automoe.train.trainer import shift_right

NAME = "evaluate"
ARTIFACTS = ["report.md", "metrics.json", "flops_per_token.png"]  # logged to MLflow


@dataclass(frozen=True)
class EvaluateConfig:
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    split: str = "test"
    max_sentences: int = 0  # 0 = the whole split
    latency_repeats: int = 10
    latency_warmup: int = 3
    latency_rounds: int = 5  # alternating rounds; the searched/dense ratio is reported with its range over them
    flops_sentences: int = 100  # test sentences whose routing gives FLOPs per token, expert loads, routed GFLOPs
    threads: int = 2

    def __post_init__(self) -> None:
        if self.max_sentences < 0 or self.latency_repeats < 1 or self.threads < 1 or self.latency_rounds < 1:
            raise ValueError("max_sentences must be >= 0; latency_repeats, latency_rounds and threads >= 1")


@dataclass(frozen=True)
class EvaluateInputs:
    data: Path
    model: Path  # retrain output folder (searched)
    baseline: Path | None = None  # retrain output folder (dense baseline)
    latency: Path | None = None  # measure_latency output folder (or its kernels.json): time with its kernel plan


def score(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def evaluate_model(
    name: str, folder: Path, translator: Translator, data: PreparedData, cfg: EvaluateConfig, out: Path
) -> dict[str, Any]:
    model = translator.model
    split = data.split(cfg.split)
    n = len(split) if not cfg.max_sentences else min(cfg.max_sentences, len(split))
    refs = data.raw_lines(cfg.split, "tgt")[:n]
    t0 = time.perf_counter()
    hyp_ids = translator.translate_ids([np.asarray(split.src[i], dtype=np.int64) for i in range(n)])
    seconds = time.perf_counter() - t0
    hyps = [translator.sp.decode(ids) for ids in hyp_ids]
    atomic_write_text(out / f"hyp.{name}.txt", "".join(h + "\n" for h in hyps))
    result = score(hyps, refs)
    args, arch = model.args, model.arch
    counts = count(arch, args.vocab_size, args.qkv_dim, pre_norm=args.pre_norm)
    tokens, loads = _routing(model, split, min(n, cfg.flops_sentences))
    routed = count(arch, args.vocab_size, args.qkv_dim, pre_norm=args.pre_norm, loads=loads)
    result |= {
        "gflops": counts.gflops,
        "gflops_no_embed": counts.gflops_no_embed,
        "gflops_routed": routed.gflops,  # the same 30 + 30 tokens at the routing measured on the test set
        "params_total": counts.params_total,
        "params_active": counts.params_active,
        "params_active_routed": routed.params_active,
        "params_total_no_embed": counts.params_total_no_embed,
        "params_active_no_embed": counts.params_active_no_embed,
        "expert_loads": _named_loads(loads, arch.encoder_layers),
        "sentences": n,
        "split": cfg.split,
        "split_sentences": len(split),
        "translate_sentences_per_s": n / seconds,
        "dense": arch.is_dense,
        "precision": cfg.decode.precision,  # the serving layout translated and timed
        "device": cfg.decode.device,
        "flops_per_token": tokens,
    } | _training(folder)
    return result


def _training(folder: Path) -> dict[str, Any]:
    """How the model was trained (its retrain metrics.json): the comparison is fair only when
    the searched model and the baseline share the initialisation and the budget."""
    trained = training_record(folder)
    return {
        "init": initialisation(trained),
        "train_updates": float(trained.get("updates", float("nan"))),
        "train_target_tokens": float(trained.get("target_tokens_seen", float("nan"))),
    }


@torch.inference_mode()
def _routing(model, split, n: int) -> tuple[list[float], list[np.ndarray | None]]:
    """Active MFLOPs of every source token of `n` test sentences, from their actual routing,
    and each layer's expert loads over them (share of token-expert assignments per expert;
    None for a dense layer)."""
    out: list[float] = []
    args = model.args
    device = next(model.parameters()).device
    assigned: list[np.ndarray | None] = [None] * (model.arch.encoder_layers + model.arch.decoder_layers)
    for i in range(n):
        src = torch.from_numpy(split.src[i].astype(np.int64))[None].to(device)
        tgt = torch.from_numpy(split.tgt[i].astype(np.int64))[None].to(device)
        _, stats = model(src, shift_right(tgt, args.bos_id, args.pad_id))
        src_f, _ = per_token_flops(model.arch, args.qkv_dim, src.shape[1], tgt.shape[1], args.vocab_size, stats)
        out += (src_f / 1e6).tolist()
        for layer, s in enumerate(stats):
            if s is not None:
                counts = s.tokens_per_expert.double().cpu().numpy()
                assigned[layer] = counts if assigned[layer] is None else assigned[layer] + counts
    return out, [None if a is None else expert_shares(a) for a in assigned]


def _named_loads(loads: list[np.ndarray | None], encoder_layers: int) -> dict[str, list[float]]:
    """{"enc0": [share per expert], ..., "dec1": [...]} for the layers that route."""
    return {
        layer_name(i, encoder_layers): [round(float(x), 4) for x in load]
        for i, load in enumerate(loads)
        if load is not None
    }


def latencies(models: dict[str, Any], data: PreparedData, cfg: EvaluateConfig) -> dict[str, dict[str, float]]:
    """The latency protocol for every model, in rounds, the models in alternation run by run
    within each (A, B, A, B, ...; latency.measure.measure_many), each figure the median over
    the rounds: a machine whose speed drifts (a shared host) moves all models alike, so their
    ratio, taken within each round, stays fair. With two models
    the searched model also gets `latency_ratio` (median of the per-round ratios) and its
    range over the rounds (`latency_ratio_low` / `_high`)."""
    sources = m.source_windows(data.split("valid"), 30, 8)
    runs: dict[str, list[m.Latency]] = {name: [] for name in models}
    for _ in tqdm(range(cfg.latency_rounds), desc=f"{NAME}: latency rounds", mininterval=5.0):
        lats = m.measure_many(  # the models in alternation, run by run
            list(models.values()), sources, 5, 30, cfg.latency_warmup, cfg.latency_repeats, cfg.decode.precision
        )
        for name, lat in zip(models, lats, strict=True):
            runs[name].append(lat)
    out = {
        name: {
            "latency_ms": float(np.median([r.total_ms for r in rs])),
            "encoder_ms": float(np.median([r.encoder_ms for r in rs])),
            "decoder_ms": float(np.median([r.decoder_ms for r in rs])),
            "latency_rounds": float(len(rs)),
        }
        for name, rs in runs.items()
    }
    if "dense" in runs:
        ratios = np.array([s.total_ms / d.total_ms for s, d in zip(runs["searched"], runs["dense"], strict=True)])
        out["searched"] |= {
            "latency_ratio": float(np.median(ratios)),
            "latency_ratio_low": float(ratios.min()),
            "latency_ratio_high": float(ratios.max()),
        }
    return out


def run(cfg: EvaluateConfig, inputs: EvaluateInputs, out_dir: Path) -> dict[str, float]:
    torch.set_num_threads(cfg.threads)
    data = PreparedData.open(inputs.data)
    if inputs.latency is not None:
        plan = inputs.latency / kernels.PLAN_FILE if inputs.latency.is_dir() else inputs.latency
        if not plan.is_file():
            raise DataError(f"{inputs.latency}: no {kernels.PLAN_FILE} (expected a measure_latency output folder)")
        kernels.use(plan)
    models = {"searched": inputs.model} | ({"dense": inputs.baseline} if inputs.baseline else {})
    with staged_dir(out_dir) as tmp:
        translators = {name: Translator.from_folder(folder, cfg.decode) for name, folder in models.items()}
        for name, translator in translators.items():
            data.check_vocab(translator.vocab, str(models[name]))
        results = {name: evaluate_model(name, Path(models[name]), t, data, cfg, tmp) for name, t in translators.items()}
        for name, lat in latencies({k: t.model for k, t in translators.items()}, data, cfg).items():
            results[name] |= lat
        _histogram(tmp / "flops_per_token.png", {k: v.pop("flops_per_token") for k, v in results.items()})
        metrics = _flat(results)
        atomic_write_json(tmp / "metrics.json", metrics)
        kernels.save(tmp / kernels.PLAN_FILE)
        atomic_write_text(tmp / "report.md", report(results, data))
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _flat(results: dict[str, dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, r in results.items():
        out |= {
            f"{name}_{k}": (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
            for k, v in r.items()
            if not k.endswith("signature") and k != "dense"
        }
    if "dense" in results:
        s, d = results["searched"], results["dense"]
        out["speedup"] = 1.0 / s["latency_ratio"]  # the per-round ratios' median (see `latencies`)
        out["gflops_reduction"] = d["gflops"] / s["gflops"]
        out["bleu_delta"] = s["bleu"] - d["bleu"]
    out["bleu_signature"] = results["searched"]["bleu_signature"]
    out["chrf_signature"] = results["searched"]["chrf_signature"]
    return out


def report(results: dict[str, dict], data: PreparedData) -> str:
    names = list(results)
    rows = [
        ("BLEU", "bleu", "{:.2f}"),
        ("chrF", "chrf", "{:.2f}"),
        ("latency (ms, batch 1; median of rounds)", "latency_ms", "{:.1f}"),
        ("  encoder (ms)", "encoder_ms", "{:.1f}"),
        ("  decoder (ms)", "decoder_ms", "{:.1f}"),
        ("GFLOPs (30+30 tokens; uniform routing)", "gflops", "{:.3f}"),
        ("  at the measured routing", "gflops_routed", "{:.3f}"),
        ("params total", "params_total", "{:,}"),
        ("params active (uniform routing)", "params_active", "{:,}"),
        ("  at the measured routing", "params_active_routed", "{:,}"),
        ("params active w/o embeddings", "params_active_no_embed", "{:,}"),
        ("test sentences / s (beam search)", "translate_sentences_per_s", "{:.1f}"),
        ("initialisation", "init", "{}"),
        ("training updates", "train_updates", "{:,.0f}"),
        ("training target tokens", "train_target_tokens", "{:,.0f}"),
    ]
    lines = [
        f"# automoe evaluation ({data.manifest['src_lang']}→{data.manifest['tgt_lang']})",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, k, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt.format(results[n][k]) for n in names) + " |")
    if "dense" in results:
        s, d = results["searched"], results["dense"]
        if (s["init"], s["train_updates"]) != (d["init"], d["train_updates"]):
            lines += ["", "**Warning: the two models were not trained the same way (see the last rows).**"]
        lines += [
            "",
            f"**Speedup vs dense: {1 / s['latency_ratio']:.2f}x** latency, "
            f"{d['gflops'] / s['gflops']:.2f}x fewer GFLOPs, BLEU {s['bleu'] - d['bleu']:+.2f}.",
            "",
            f"Latency ratio searched/dense: {s['latency_ratio']:.3f} (median of {s['latency_rounds']:.0f} alternating "
            f"rounds; range {s['latency_ratio_low']:.3f}-{s['latency_ratio_high']:.3f}).",
        ]
    for name in names:
        if results[name]["expert_loads"]:
            lines += ["", f"Expert loads of {name} (share of token-expert assignments per expert, test set):", ""]
            lines += [
                f"- {layer}: " + ", ".join(f"{x:.3f}" for x in load)
                for layer, load in results[name]["expert_loads"].items()
            ]
    lines += [
        "",
        f"BLEU signature: `{results['searched']['bleu_signature']}`",
        f"chrF signature: `{results['searched']['chrf_signature']}`",
        "",
        "![active FLOPs per token](flops_per_token.png)",
        "",
    ]
    return "\n".join(lines)


def _histogram(path: Path, per_model: dict[str, list[float]]) -> None:
    with figure(path, size=(6.5, 4)) as ax:
        for name, values in per_model.items():
            ax.hist(values, bins=40, alpha=0.6, label=name)
        ax.set_xlabel("active MFLOPs per source token (actual routing)")
        ax.set_ylabel("tokens")
        ax.legend()


def load_config(params: Any, overrides: Any = None) -> EvaluateConfig:
    return load_section(EvaluateConfig, NAME, params, overrides)


@guarded
def main(argv: list[str] | None = None) -> None:
    """automoe evaluate --data data/prepared --model models/retrain/searched --baseline models/retrain/dense"""
    parser = stage_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path, help="retrain output folder of the searched model")
    parser.add_argument("--baseline", type=Path, help="retrain output folder of the dense baseline")
    parser.add_argument(
        "--latency", type=Path, help="measure_latency output folder: time with the kernel plan its table was timed with"
    )
    args = parser.parse_args(argv)
    inputs = EvaluateInputs(args.data, args.model, args.baseline, args.latency)
    cli_run(NAME, load_config, args, lambda cfg, _: run(cfg, inputs, args.out), ARTIFACTS)


def component_main(
    params: str,
    overrides: list,
    data_path: str,
    model_path: str,
    baseline_path: str,
    out_path: str,
    metrics: Any,
    report_path: str = "",
    latency_path: str = "",
) -> None:
    inputs = EvaluateInputs(
        Path(data_path),
        Path(model_path),
        Path(baseline_path) if baseline_path else None,
        Path(latency_path) if latency_path else None,
    )
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
    if report_path:
        Path(report_path).write_text((Path(out_path) / "report.md").read_text())

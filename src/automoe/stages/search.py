"""search: evolutionary search for the SubTransformer with the lowest validation loss
(inherited supernet weights) under a latency or GFLOPs budget, with a random-search
baseline at the same number of evaluations.

Output folder: `best_arch.yaml`, `population.csv` (final population), `pareto.csv`
(loss vs cost over every evaluated arch), `history.csv` (per iteration), `random.csv`,
`pareto.png`, `convergence.png`, `metrics.json`, and `state.json` (resume point: a
killed search reruns only the unfinished iterations and ends with the same result).

With a predicted-latency budget the winner is confirmed on measurement (`confirm`): the
fittest archs within the predicted budget are timed with the measure_latency protocol in
alternating rounds beside the dense reference (the same engine: the table's kernel plan),
and the fittest one whose measured latency meets the budget wins (`confirmed.csv`). When
none does, further waves time the fittest under a predicted limit lowered by the bias just
measured. A predictor's error (the search seeks out the archs it underestimates) then
cannot carry the winner over the budget the promotion gate checks on measurement.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from automoe.config import load_section, to_dict
from automoe.data.dataset import PreparedData, TokenBatchSampler
from automoe.errors import ConfigError
from automoe.io import atomic_write_json, atomic_write_text, file_sha256
from automoe.latency import measure as m
from automoe.latency.predictor import LatencyPredictor
from automoe.model import kernels
from automoe.model.counting import count
from automoe.model.subnet import extract
from automoe.model.supernet import SuperTransformer
from automoe.plots import figure
from automoe.search.evolution import Candidate, EvolutionConfig, evolve, key, random_search
from automoe.search.pareto import pareto_front
from automoe.space import ArchConfig, load_space
from automoe.stages._cli import artifact_file, cli_run, component_run, guarded, html_images, stage_parser
from automoe.train.store import RunStore
from automoe.train.trainer import shift_right

NAME = "search"
ARTIFACTS = ["best_arch.yaml", "pareto.csv", "pareto.png", "convergence.png"]  # logged to MLflow


@dataclass(frozen=True)
class Budget:
    kind: Literal["latency_ms", "gflops"] = "latency_ms"
    value: float = 0.5
    relative_to_dense: bool = True  # value is a fraction of the largest dense arch's cost
    latency_source: Literal["predicted", "measured"] = "predicted"

    def __post_init__(self) -> None:
        if self.value <= 0:
            raise ValueError(f"budget.value must be > 0, got {self.value}")


@dataclass(frozen=True)
class SearchConfig:
    population: int = 125
    parents: int = 25
    mutations: int = 50
    crossovers: int = 50
    mutation_prob: float = 0.3
    iterations: int = 30
    budget: Budget = field(default_factory=Budget)
    valid_sentences: int = 200  # the fixed validation subset fitness is measured on
    max_tokens: int = 4096
    random_baseline: bool = True
    seed: int = 1
    threads: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where fitness runs (auto: the task's GPU if it has one)
    space: str = ""  # "" = the supernet's space; else a preset or YAML path inside it (ablations)
    confirm: int = 5  # predicted-latency budgets: time the N fittest archs within it, keep the best that fits (0: off)
    confirm_rounds: int = 3  # alternating rounds (dense reference, then each arch) for that measurement
    confirm_waves: int = 3  # none of a wave fits: the next N under a predicted limit lowered by the measured bias

    def evolution(self) -> EvolutionConfig:
        return EvolutionConfig(
            self.population, self.parents, self.mutations, self.crossovers, self.mutation_prob, self.iterations
        )

    def __post_init__(self) -> None:
        self.evolution()  # validates the evolution settings
        if self.valid_sentences < 1:
            raise ValueError("valid_sentences must be >= 1")
        if self.confirm < 0 or self.confirm_rounds < 1 or self.confirm_waves < 1:
            raise ValueError("confirm must be >= 0, confirm_rounds and confirm_waves >= 1")


@dataclass(frozen=True)
class SearchInputs:
    data: Path
    supernet: Path
    predictor: Path | None = None  # needed for a predicted-latency budget


class ValidLoss:
    """Fitness: per-token NLL of the supernet with an arch on a fixed validation subset (the
    first `sentences`; from sentence `start` for a subset disjoint from the search's)."""

    def __init__(
        self,
        supernet: SuperTransformer,
        data: PreparedData,
        sentences: int,
        max_tokens: int,
        device: torch.device | None = None,
        start: int = 0,
    ):
        device = device or torch.device("cpu")
        self.net = supernet.eval().to(device)
        split = data.split("valid")
        first, n = min(start, len(split)), min(start + sentences, len(split))
        if n <= first:
            raise ConfigError(f"validation subset from sentence {start}: the valid split has {len(split)}")
        lens = np.maximum(split.src.lengths[first:n], split.tgt.lengths[first:n])
        plan = TokenBatchSampler(lens, lens, max(max_tokens, int(lens.max())), seed=0, shuffle=False).plan(0)
        plan = [batch + first for batch in plan]  # sentence indices of the split
        args = supernet.args
        self.batches = [
            (src.to(device), shift_right(tgt, args.bos_id, args.pad_id).to(device), tgt.to(device))
            for src, tgt in (split.collate(b) for b in plan)
        ]

    @torch.inference_mode()
    def __call__(self, archs: list[ArchConfig]) -> list[float]:
        out = []
        pad = self.net.args.pad_id
        for arch in archs:
            nll, tokens = 0.0, 0
            for src, tgt_in, tgt in self.batches:
                logits, _ = self.net(src, tgt_in, arch)
                nll += float(
                    torch.nn.functional.cross_entropy(
                        logits.flatten(0, 1), tgt.flatten(), ignore_index=pad, reduction="sum"
                    )
                )
                tokens += int((tgt != pad).sum())
            out.append(nll / tokens)
        return out


def cost_function(cfg: SearchConfig, inputs: SearchInputs, supernet: SuperTransformer, data: PreparedData):
    """(cost of an arch under the budget's kind, cost of the budget's reference arch)."""
    space = supernet.space
    if cfg.budget.kind == "gflops":
        gflops = lambda a: count(a, supernet.args.vocab_size, space.qkv_dim).gflops  # noqa: E731
        return gflops, gflops
    if cfg.budget.latency_source == "predicted":
        if inputs.predictor is None:
            raise ConfigError("search.budget: a predicted-latency budget needs --predictor (train_predictor output)")
        predictor = LatencyPredictor.load(artifact_file(inputs.predictor, "predictor.pt"))
        predictor.check_space(space, str(inputs.predictor))
        # the budget's reference (the dense baseline) as the table measured it, when it did
        return (lambda a: float(predictor.predict([a])[0])), predictor.reference_ms
    sources = m.source_windows(data.split("valid"), 30, 4)
    cost = lambda a: m.measure(extract(supernet, a), sources, warmup=2, repeats=5).total_ms  # noqa: E731
    return cost, cost


def absolute_budget(cfg: SearchConfig, cost, space, baseline_space, reference=None) -> tuple[float, float, float]:
    """(budget, cost of the largest dense arch of `baseline_space` (the supernet's), lowest
    cost seen in `space` (the searched one)). `reference` costs the dense arch (default:
    `cost`); with a predictor it is the measured latency when the table has it, so a
    relative budget is a fraction of what the baseline really costs."""
    dense = (reference or cost)(baseline_space.largest_dense())
    rng = np.random.default_rng([cfg.seed, 7])
    floor = min([cost(space.smallest())] + [cost(space.sample(rng)) for _ in range(100)])
    budget = cfg.budget.value * dense if cfg.budget.relative_to_dense else cfg.budget.value
    unit = "ms" if cfg.budget.kind == "latency_ms" else "GFLOPs"
    if budget < floor:
        raise ConfigError(
            f"search.budget: {budget:.4g} {unit} is below the smallest the space reaches "
            f"(about {floor:.4g} {unit}; the largest dense arch costs {dense:.4g}); raise the budget"
        )
    return budget, dense, floor


def run(cfg: SearchConfig, inputs: SearchInputs, out_dir: Path) -> dict[str, float]:
    torch.set_num_threads(cfg.threads)
    data = PreparedData.open(inputs.data)
    supernet, vocab = SuperTransformer.load(artifact_file(inputs.supernet, "supernet.pt"))
    data.check_vocab(vocab, str(inputs.supernet))
    space = supernet.space
    if cfg.space:  # search part of the supernet's space; the budget stays relative to its dense baseline
        space = load_space(cfg.space)
        space.check_subspace_of(supernet.space, "search.space")
    cost, reference = cost_function(cfg, inputs, supernet, data)
    budget, dense_cost, floor = absolute_budget(cfg, cost, space, supernet.space, reference)
    fitness = ValidLoss(supernet, data, cfg.valid_sentences, cfg.max_tokens, search_device(cfg.device))
    out_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore.from_env(NAME, lambda: _identity(cfg, data, inputs))  # a retried task resumes from it
    if store is not None:
        fetched = store.pull(out_dir)
        print(f"{NAME}: run store {store.uri}: {len(fetched)} file(s) fetched", file=sys.stderr)
    with tqdm(total=cfg.iterations, desc=NAME, mininterval=5.0) as bar:
        result = evolve(
            space,
            cfg.evolution(),
            fitness,
            cost,
            budget,
            cfg.seed,
            out_dir / "state.json",
            progress=lambda it: bar.update(it - bar.n),
            on_save=store.push if store is not None else None,
        )
    confirmed: list[dict] = []
    if cfg.confirm and cfg.budget.kind == "latency_ms" and cfg.budget.latency_source == "predicted":
        precision, device = _use_kernel_plan(inputs)
        result.best, confirmed = confirm_on_measurement(
            cfg, supernet, data, result.evaluated, budget, precision, device
        )
    metrics = {
        "best_fitness": result.best.fitness,
        "best_cost": result.best.cost,
        "budget": budget,
        "dense_cost": dense_cost,
        "space_min_cost": floor,
        "evaluations": float(len(result.evaluated)),
    }
    baseline = None
    if confirmed:
        chosen = next(c for c in confirmed if c["chosen"])
        metrics |= {"best_measured_ms": chosen["measured_ms"], "best_measured_ratio": chosen["ratio"]}
        metrics["confirmed_archs"] = float(len(confirmed))
        atomic_write_text(out_dir / "confirmed.csv", _rows(confirmed))
    if cfg.random_baseline:
        baseline = random_search(space, len(result.evaluated), fitness, cost, budget, cfg.seed)
        metrics["random_best_fitness"] = baseline.best.fitness
        metrics["random_best_cost"] = baseline.best.cost
    write_outputs(out_dir, cfg, result, baseline, metrics)
    return metrics


def _identity(cfg: SearchConfig, data: PreparedData, inputs: SearchInputs) -> dict[str, Any]:
    """What a stored search state must match to be resumed: the config, the data and the supernet."""
    supernet = file_sha256(artifact_file(inputs.supernet, "supernet.pt"))
    return {"config": to_dict(cfg), "data": data.manifest["data_sha256"], "supernet": supernet}


def search_device(device: str) -> torch.device:
    """Where fitness runs: `auto` takes the task's GPU when it has one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("search.device: cuda was asked for but no GPU is visible")
    return torch.device(device)


def _use_kernel_plan(inputs: SearchInputs) -> tuple[str, torch.device]:
    """Time with the engine the latency table was timed with (its plan travels in the
    predictor's folder); returns the serving precision and the device the table measured."""
    assert inputs.predictor is not None  # a predicted budget: checked by cost_function
    folder = inputs.predictor if inputs.predictor.is_dir() else inputs.predictor.parent
    kernels.use(folder / kernels.PLAN_FILE)
    hardware = LatencyPredictor.load(artifact_file(inputs.predictor, "predictor.pt")).hardware
    device = str(hardware.get("device", "cpu"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{inputs.predictor}: its latency table was measured on a GPU; this task has none")
    return str(hardware.get("precision", "fp32")), torch.device(device)


def confirm_on_measurement(
    cfg: SearchConfig,
    supernet: SuperTransformer,
    data: PreparedData,
    evaluated: list[Candidate],
    budget: float,
    precision: str = "fp32",
    device: torch.device | None = None,
) -> tuple[Candidate, list[dict]]:
    """The fittest evaluated arch whose measured latency meets the budget (relative budgets:
    the measured ratio to the dense reference, per round, median over `confirm_rounds`
    alternating rounds; absolute: the median ms), timed in waves of `cfg.confirm` archs.
    Wave 1 takes the fittest within the predicted budget. When none of a wave fits, the
    predictor is biased there (a search seeks out the archs it underestimates), so the next
    wave takes the fittest not yet timed under the budget divided by that bias (the wave's
    median measured / predicted cost; at least 3% below the last limit), at most
    `cfg.confirm_waves` waves. When none
    fits, the fastest timed. Returns it and a row per timed arch."""
    sources = m.source_windows(data.split("valid"), 30, 8)
    device = device or torch.device("cpu")
    dense = extract(supernet, supernet.space.largest_dense()).to(device)
    timed: set[str] = set()
    rows: list[dict] = []
    picked: list[Candidate] = []
    by_fitness = sorted(evaluated, key=lambda c: c.fitness)
    # measured cost in the budget's units: the dense reference's cost x the ratio, or the ms
    dense_cost = budget / cfg.budget.value if cfg.budget.relative_to_dense else None
    limit = budget
    for wave in range(1, cfg.confirm_waves + 1):
        picks: list[Candidate] = []
        for c in by_fitness:
            if len(picks) == cfg.confirm:
                break
            if c.cost <= limit and key(c.arch) not in timed:
                timed.add(key(c.arch))
                picks.append(c)
        if not picks:
            break
        models = [dense] + [extract(supernet, c.arch).to(device) for c in picks]
        ms = np.zeros((cfg.confirm_rounds, len(models)))
        for r in tqdm(range(cfg.confirm_rounds), desc=f"{NAME}: confirming {len(picks)} archs", mininterval=5.0):
            lats = m.measure_many(models, sources, warmup=2, repeats=6, precision=precision)  # in alternation
            ms[r] = [lat.total_ms for lat in lats]
        ratios = np.median(ms[:, 1:] / ms[:, :1], axis=0)  # (archs,): per-round ratios, median over rounds
        measured = np.median(ms[:, 1:], axis=0)
        as_cost = ratios * dense_cost if dense_cost is not None else measured
        fits = as_cost <= budget
        picked += picks
        rows += [
            {
                "wave": wave,
                "fitness": c.fitness,
                "predicted_ms": c.cost,
                "limit_ms": limit,
                "measured_ms": float(measured[i]),
                "ratio": float(ratios[i]),
                "dense_ms": float(np.median(ms[:, 0])),
                "fits": bool(fits[i]),
                "chosen": False,
            }
            for i, c in enumerate(picks)
        ]
        if fits.any():
            break
        # none fits, so every measured cost > budget >= its prediction: bias > 1. An arch
        # meets the budget when its prediction x bias does; each wave at least 3% lower
        bias = float(np.median(as_cost / np.array([c.cost for c in picks])))
        limit = min(limit * 0.97, budget / bias)
        print(
            f"{NAME}: wave {wave}: none of {len(picks)} archs measured within the budget (measured / predicted "
            f"{bias:.2f}); next wave under a predicted {limit:.4g}"
        )
    fitting = [i for i, r in enumerate(rows) if r["fits"]]
    chosen = min(fitting, key=lambda i: rows[i]["fitness"]) if fitting else int(np.argmin([r["ratio"] for r in rows]))
    rows[chosen]["chosen"] = True
    if not fitting:
        print(
            f"{NAME}: none of the {len(rows)} archs timed measured within the budget; "
            f"keeping the fastest ({rows[chosen]['ratio']:.3f}x the dense reference)"
        )
    return picked[chosen], rows


def write_outputs(out_dir: Path, cfg: SearchConfig, result, baseline, metrics: dict[str, float]) -> None:
    unit = "latency (ms)" if cfg.budget.kind == "latency_ms" else "GFLOPs"
    everything = result.evaluated + (baseline.evaluated if baseline else [])
    front = pareto_front(everything, cost=lambda c: c.cost, loss=lambda c: c.fitness)
    atomic_write_text(out_dir / "population.csv", _csv(result.population))
    atomic_write_text(out_dir / "pareto.csv", _csv(front))
    atomic_write_text(out_dir / "history.csv", _rows(result.history))
    if baseline:
        atomic_write_text(out_dir / "random.csv", _csv(baseline.evaluated))
    _plots(out_dir, result, baseline, front, metrics["budget"], unit)
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_json(
        out_dir / "budget.json",
        {
            "kind": cfg.budget.kind,
            "value": metrics["budget"],
            "source": cfg.budget.latency_source,
            # a budget relative to the dense baseline: the gate checks the measured ratio
            "fraction_of_dense": cfg.budget.value if cfg.budget.relative_to_dense else None,
        },
    )
    atomic_write_text(out_dir / "best_arch.yaml", result.best.arch.to_yaml())


def _csv(cands: list[Candidate]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["fitness", "cost", "arch"])
    for c in cands:
        writer.writerow([f"{c.fitness:.6f}", f"{c.cost:.6f}", key(c.arch)])
    return buf.getvalue()


def _rows(rows: list[dict[str, float | bool]]) -> str:
    names = list(rows[0])
    fmt = lambda v: str(v) if isinstance(v, bool) else f"{v:.10g}"  # noqa: E731
    return "\n".join([",".join(names)] + [",".join(fmt(r[n]) for n in names) for r in rows]) + "\n"


def _plots(out_dir: Path, result, baseline, front, budget: float, unit: str) -> None:
    with figure(out_dir / "pareto.png") as ax:
        ax.scatter(
            [c.cost for c in result.evaluated],
            [c.fitness for c in result.evaluated],
            s=10,
            alpha=0.5,
            label="evolution",
        )
        if baseline:
            ax.scatter(
                [c.cost for c in baseline.evaluated],
                [c.fitness for c in baseline.evaluated],
                s=10,
                alpha=0.5,
                marker="x",
                label="random search",
            )
        ax.plot([c.cost for c in front], [c.fitness for c in front], "k-o", ms=3, label="Pareto front")
        ax.axvline(budget, color="red", ls="--", label="budget")
        ax.scatter([result.best.cost], [result.best.fitness], marker="*", s=200, c="gold", edgecolors="k", label="best")
        ax.set_xlabel(unit)
        ax.set_ylabel("validation loss (inherited weights)")
        ax.legend()
    with figure(out_dir / "convergence.png", size=(6.5, 4)) as ax:
        for name, res, style in (("evolution", result, "o-"), ("random search", baseline, "-")):
            if res is not None:
                ax.plot(
                    [h["evaluations"] for h in res.history],
                    [h["best_fitness"] for h in res.history],
                    style,
                    label=f"{name} (best)",
                )
        ax.set_xlabel("fitness evaluations")
        ax.set_ylabel("best validation loss")
        ax.legend()


def load_config(params: Any, overrides: Any = None) -> SearchConfig:
    return load_section(SearchConfig, NAME, params, overrides)


@guarded
def main(argv: list[str] | None = None) -> None:
    """automoe search --data data/prepared --supernet supernet.pt --predictor predictor.pt --out results/search"""
    parser = stage_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--supernet", required=True, type=Path)
    parser.add_argument("--predictor", type=Path, help="train_predictor's predictor.pt (predicted-latency budget)")
    args = parser.parse_args(argv)
    inputs = SearchInputs(args.data, args.supernet, args.predictor)
    cli_run(NAME, load_config, args, lambda cfg, _: run(cfg, inputs, args.out), ARTIFACTS)


def component_main(
    params: str,
    overrides: list,
    data_path: str,
    supernet_path: str,
    predictor_path: str,
    out_path: str,
    metrics: Any,
    plot_path: str = "",
) -> None:
    out = Path(out_path)
    inputs = SearchInputs(Path(data_path), Path(supernet_path), Path(predictor_path) if predictor_path else None)
    component_run(
        NAME,
        load_config,
        params,
        overrides,
        out_path,
        lambda cfg, _: run(cfg, inputs, out),
        ARTIFACTS,
        metrics,
    )
    if plot_path:
        Path(plot_path).write_text(html_images("Search", [out / "pareto.png", out / "convergence.png"]))

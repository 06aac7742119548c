"""register: publish the retrained model to the MLflow registry and run the promotion gate.

Logs the model as an MLflow pyfunc translator (code, SentencePiece model, arch, weights,
signature, input example) in this stage's run, registers a version tagged with BLEU,
chrF, latency, GFLOPs, the search budget, the data hash, the git commit and the pipeline
run, points alias `candidate` at it, and moves alias `champion` only when the gate
passes (BLEU and chrF at or above the floors `min_bleu` / `min_chrf`; BLEU not worse than
the champion beyond a tolerance; latency or GFLOPs within the budget). The previous
champion is recorded on the new one before the alias moves. The version also records how
the model was initialised (`automoe.init`: scratch or supernet). Output folder: `registration.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from automoe import registry, tracking
from automoe.config import load_section
from automoe.data.dataset import PreparedData
from automoe.errors import AutomoeError, ConfigError, DataError
from automoe.io import atomic_write_json, file_sha256
from automoe.model import kernels
from automoe.model.inference import Precision
from automoe.stages._cli import cli_run, component_run, guarded, stage_parser
from automoe.stages.retrain import initialisation, training_record

NAME = "register"
ARTIFACTS = ["registration.json"]  # logged to MLflow


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str = "automoe-en-de"
    bleu_tolerance: float = 0.5  # BLEU points a new model may lose against the champion
    cost_tolerance: float = 0.05  # measured latency may exceed the budget by this fraction (beyond its rounds' noise)
    min_bleu: float = 10.0  # floors: below either nothing becomes champion, whatever the champion was
    min_chrf: float = 30.0
    precision: Precision = "fp32"  # the registered model's serving layout (as measured and evaluated)
    # under `dvc exp run`: separate = into "<model_name>-experiments" (the shared model's aliases
    # stay where they are), shared = into model_name like any run, skip = register nothing
    experiments: Literal["separate", "shared", "skip"] = "separate"

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise ValueError("model_name must not be empty")
        if self.bleu_tolerance < 0 or self.cost_tolerance < 0:
            raise ValueError("tolerances must be >= 0")
        if self.min_bleu < 0 or self.min_chrf < 0:
            raise ValueError("min_bleu and min_chrf must be >= 0")

    def gate(self) -> registry.Gate:
        return registry.Gate(self.bleu_tolerance, self.cost_tolerance, self.min_bleu, self.min_chrf)


@dataclass(frozen=True)
class RegisterInputs:
    data: Path
    model: Path  # retrain output folder
    evaluation: Path  # evaluate output folder
    search: Path  # search output folder (for the budget)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def gate_cost(ev: dict, budget: dict) -> float:
    """The searched model's cost in the units of the search budget. A latency budget relative
    to the dense baseline is checked on the measured ratio to the dense baseline (both timed
    in the same evaluation, in alternation; the median of the per-round ratios): comparing a
    latency measured now with a budget predicted from a table measured earlier would mix two
    speeds of a machine whose speed drifts."""
    return gate_costs(ev, budget)["cost"]


def gate_costs(ev: dict, budget: dict) -> dict[str, float]:
    """`cost` (as gate_cost), its range over the timing rounds (`low`, `high`; equal to it
    where there is one figure) and the dense baseline's cost in the same unit
    (`reference`, NaN where unknown), in the budget's unit (`unit`)."""
    nan = float("nan")
    if budget["kind"] != "latency_ms":
        c = ev["searched_gflops"]
        return {"cost": c, "low": c, "high": c, "reference": ev.get("dense_gflops", nan), "unit": "GFLOPs"}
    fraction = budget.get("fraction_of_dense")
    if fraction and ev.get("dense_latency_ms"):
        scale = budget["value"] / fraction  # the dense baseline's latency the budget was a fraction of
        ratio = ev.get("searched_latency_ratio", ev["searched_latency_ms"] / ev["dense_latency_ms"])
        low, high = ev.get("searched_latency_ratio_low", ratio), ev.get("searched_latency_ratio_high", ratio)
        return {"cost": ratio * scale, "low": low * scale, "high": high * scale, "reference": scale, "unit": "ms"}
    c = ev["searched_latency_ms"]
    return {"cost": c, "low": c, "high": c, "reference": ev.get("dense_latency_ms", nan), "unit": "ms"}


def version_tags(
    inputs: RegisterInputs, data: PreparedData, run: tracking.StageRun, precision: str = "fp32"
) -> dict[str, str]:
    ev = _read_json(inputs.evaluation / "metrics.json")
    budget = _read_json(inputs.search / "budget.json")
    costs = gate_costs(ev, budget)
    evaluated = ev.get("searched_precision", "fp32")
    if evaluated != precision:
        raise ConfigError(
            f"register.precision: {precision}, but {inputs.evaluation} evaluated the model in {evaluated}; "
            "set evaluate.decode.precision and register.precision alike"
        )
    return {
        "automoe.model_sha256": file_sha256(inputs.model / "model.pt"),  # with the pipeline run: a retry's key
        "automoe.precision": precision,
        "automoe.device": str(ev.get("searched_device", "cpu")),  # where it was evaluated and is served
        "automoe.init": initialisation(training_record(inputs.model)),
        registry.BLEU: f"{ev['searched_bleu']:.4f}",
        registry.CHRF: f"{ev['searched_chrf']:.4f}",
        "automoe.latency_ms": f"{ev['searched_latency_ms']:.4f}",
        "automoe.gflops": f"{ev['searched_gflops']:.6f}",
        registry.COST: f"{costs['cost']:.6f}",
        registry.COST_LOW: f"{costs['low']:.6f}",
        registry.COST_HIGH: f"{costs['high']:.6f}",
        registry.REFERENCE: f"{costs['reference']:.6f}",
        registry.UNIT: costs["unit"],
        registry.BUDGET: f"{budget['value']:.6f}",
        "automoe.budget": f"{budget['kind']} <= {budget['value']:.4g} ({budget['source']})",
        "automoe.data_sha256": data.manifest["data_sha256"],
        "automoe.git_commit": tracking.git_commit(),
        "automoe.pipeline_run_id": run.parent_run_id or "",
        "automoe.stage_run_id": run.run_id or "",
        "automoe.bleu_signature": ev.get("bleu_signature", ""),
        # what the scores came from: a BLEU on 50 sentences is not a BLEU on the test set
        "automoe.eval_split": str(ev.get("searched_split", "test")),
        "automoe.eval_sentences": f"{ev.get('searched_sentences', float('nan')):.0f}",
        "automoe.eval_split_sentences": f"{ev.get('searched_split_sentences', float('nan')):.0f}",
    }


def run(cfg: RegisterConfig, inputs: RegisterInputs, out_dir: Path, run: tracking.StageRun) -> dict[str, float]:
    if run.run_id is None:
        raise AutomoeError("register: needs MLflow tracking (AUTOMOE_TRACKING is off)")
    data = PreparedData.open(inputs.data)
    if not (inputs.model / "model.pt").is_file():
        raise DataError(f"{inputs.model}: no model.pt (expected a retrain output folder)")
    tags = version_tags(inputs, data, run, cfg.precision)
    experiment = os.environ.get("DVC_EXP_NAME") or os.environ.get("DVC_EXP_BASELINE_REV")
    name = cfg.model_name
    if experiment:  # a `dvc exp run`: the shared registry's candidate and champion are not its to move
        tags["automoe.dvc_experiment"] = experiment
        if cfg.experiments == "skip":
            out_dir.mkdir(parents=True, exist_ok=True)
            result = {"model_name": name, "registered": False, "why": "register.experiments: skip (dvc exp run)"}
            atomic_write_json(out_dir / "registration.json", result)
            print(f"register: a dvc experiment ({experiment}): nothing registered (register.experiments: skip)")
            return {"promoted": 0.0}
        if cfg.experiments == "separate":
            name = f"{cfg.model_name}-experiments"
    plan = inputs.evaluation / kernels.PLAN_FILE  # the engine evaluate timed: served the same way
    client = tracking.registry_client()
    version = tracking.version_of_pipeline_run(client, name, tags)
    if version is None:
        version = tracking.log_translator(run, inputs.model, name, tags, cfg.precision, plan, tags["automoe.device"])
    else:  # a retried task (its first try registered, then failed): the same version, not a duplicate
        print(f"register: {name} v{version} already holds this pipeline run's model; not registered again")
    client.set_registered_model_alias(name, registry.CANDIDATE, str(version))
    decision = tracking.settle_champion(client, name, cfg.gate())
    promoted = decision["champion"] == version
    result = {
        "model_name": name,
        "registered": True,
        "version": version,
        "champion": decision["champion"],
        "promoted": promoted,
        "verdict": decision["verdicts"].get(version, "undecided"),
        "uri": f"models:/{name}@champion",
        "tracking_uri": tracking.tracking_uri(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "registration.json", result)
    mine = next(v for v in tracking.registry_versions(client, name)[1] if v.number == version)
    result["gate"] = registry.describe_cost(mine, cfg.gate())
    atomic_write_json(out_dir / "registration.json", result)
    champion = f"v{decision['champion']}" if decision["champion"] is not None else "none"
    print(f"register: {name} v{version}: {result['verdict']}; champion: {champion}")
    print(f"register: gate: {result['gate']}")
    if tracking.under_dvc():  # the last stage: the execution's parent run ends with its headline figures
        ev = _read_json(inputs.evaluation / "metrics.json")
        keys = ("searched_bleu", "dense_bleu", "searched_chrf", "dense_chrf", "speedup", "searched_latency_ratio")
        headline = {k: ev[k] for k in keys if isinstance(ev.get(k), (int, float))}
        headline |= {"registered_version": float(version), "promoted": float(promoted)}
        what = {"model_name": name, "budget": tags["automoe.budget"], "gate": result["verdict"]}
        tracking.end_workspace_parent("FINISHED", headline, what | {"git_commit": tags["automoe.git_commit"]})
    return {"version": float(version), "promoted": float(promoted)}


def load_config(params: Any, overrides: Any = None) -> RegisterConfig:
    return load_section(RegisterConfig, NAME, params, overrides)


@guarded
def main(argv: list[str] | None = None) -> None:
    """automoe register --data D --model models/retrain/searched --evaluation EVAL_DIR --search SEARCH_DIR"""
    parser = stage_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path, help="retrain output folder")
    parser.add_argument("--evaluation", required=True, type=Path, help="evaluate output folder")
    parser.add_argument("--search", required=True, type=Path, help="search output folder")
    args = parser.parse_args(argv)
    inputs = RegisterInputs(args.data, args.model, args.evaluation, args.search)
    cli_run(NAME, load_config, args, lambda cfg, tracker: run(cfg, inputs, args.out, tracker), ARTIFACTS)


def component_main(
    params: str,
    overrides: list,
    data_path: str,
    model_path: str,
    evaluation_path: str,
    search_path: str,
    out_path: str,
    metrics: Any,
) -> None:
    inputs = RegisterInputs(Path(data_path), Path(model_path), Path(evaluation_path), Path(search_path))
    component_run(
        NAME,
        load_config,
        params,
        overrides,
        out_path,
        lambda cfg, tracker: run(cfg, inputs, Path(out_path), tracker),
        ARTIFACTS,
        metrics,
    )

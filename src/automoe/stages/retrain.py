"""retrain: train one SubTransformer (the searched arch, or a baseline) as a compact model.

The model holds exactly the arch's weights (no supernet padding or unused experts). It
starts from scratch, or from its slice of a trained supernet with
`retrain.init_from_supernet: true`. Output folder: `model.pt` (weights + arch + model
args + vocabulary info), `spm.model` (so the folder translates on its own), `arch.yaml`,
`checkpoints/`, curves, `metrics.json`; the final
weights are the best checkpoint's (lowest validation NLL) or the average of the last N.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automoe.config import load_section
from automoe.data.corpus import SPM_FILE
from automoe.data.dataset import PreparedData
from automoe.errors import ConfigError
from automoe.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from automoe.model.subnet import SubTransformer, extract
from automoe.model.supernet import SuperTransformer
from automoe.space import ArchConfig, SearchSpace, load_space
from automoe.stages._cli import (
    artifact_file,
    cli_run,
    component_run,
    guarded,
    run_distributed,
    stage_parser,
    write_kfp_metrics,
)
from automoe.train import setup
from automoe.train.distributed import close_world, init_world
from automoe.train.trainer import MetricsHook, TrainConfig, train, write_curves

NAME = "retrain"
ARTIFACTS = ["training_curve.png", "arch.yaml"]  # logged to MLflow
NAMED_ARCHS = ("largest", "smallest", "largest_dense", "largest_dense_span1")


@dataclass(frozen=True)
class RetrainConfig:
    space: str = "small"  # the space the arch must belong to (the supernet's, when initialising from it)
    init_from_supernet: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class RetrainInputs:
    data: Path
    arch: str  # an arch YAML file, or one of NAMED_ARCHS of the space
    supernet: Path | None = None  # supernet.pt, needed with init_from_supernet


def check_arch_spec(spec: str) -> None:
    """A named arch or an existing path; else a one-line error with the names."""
    if spec not in NAMED_ARCHS and not Path(spec).exists():
        close = difflib.get_close_matches(spec, NAMED_ARCHS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"--arch {spec}: file not found, nor a named arch ({hint}named: {', '.join(NAMED_ARCHS)})")


def resolve_arch(spec: str, space: SearchSpace) -> ArchConfig:
    check_arch_spec(spec)
    if spec in NAMED_ARCHS:
        return getattr(space, spec)()
    return ArchConfig.from_yaml(artifact_file(spec, "best_arch.yaml")).validate(space)


def run(
    cfg: RetrainConfig, inputs: RetrainInputs, out_dir: Path, on_metrics: MetricsHook | None = None
) -> dict[str, float]:
    check_arch_spec(inputs.arch)  # a mistyped name before any data or supernet is read
    data = PreparedData.open(inputs.data)
    supernet = None
    if cfg.init_from_supernet:
        if inputs.supernet is None:
            raise ConfigError("retrain.init_from_supernet is true but no --supernet file was given")
        supernet, vocab = SuperTransformer.load(artifact_file(inputs.supernet, "supernet.pt"))
        data.check_vocab(vocab, str(inputs.supernet))
        space = supernet.space
        if supernet.args.pre_norm != (cfg.train.norm == "pre"):
            theirs = "pre" if supernet.args.pre_norm else "post"
            raise ConfigError(
                f"retrain.train.norm: {cfg.train.norm!r}, but the supernet {inputs.supernet} is {theirs}-LN "
                "(weights inherited from it keep its norm placement)"
            )
    else:
        space = load_space(cfg.space)
    arch = resolve_arch(inputs.arch, space)
    out_dir = setup.output_dir(out_dir)
    world = init_world(cfg.train.device)
    try:
        if supernet is not None:  # the supernet's shapes and weights, the fine-tuning's regularisation
            model = extract(supernet, arch, dropout=cfg.train.dropout, attention_dropout=cfg.train.attention_dropout)
            del supernet
        else:
            args = setup.model_args(space, data.vocab_size, cfg.train)
            model = setup.seeded(cfg.train.seed, lambda: SubTransformer(arch=arch, args=args))
        result = train(
            cfg.train,
            model,
            data,
            out_dir,
            world=world,
            archs_for_update=lambda _: [None],
            valid_archs={"model": None},
            identity=setup.identity(NAME, cfg, data, space=space.digest(), arch=arch.to_dict()),
            on_metrics=on_metrics,
            desc=NAME,
        )
        if world.is_main:
            model.load_state_dict(result.weights)
            model.cpu().save(out_dir / "model.pt", vocab=data.vocab_info())
            atomic_write_text(out_dir / "arch.yaml", arch.to_yaml())
            atomic_write_bytes(out_dir / SPM_FILE, (data.root / SPM_FILE).read_bytes())  # self-contained model
            write_curves(out_dir, result.history, result.valid_history, "retraining")
            result.metrics["init_from_supernet"] = float(cfg.init_from_supernet)  # the registered model records it
            atomic_write_json(out_dir / "metrics.json", result.metrics)
    finally:
        close_world(world)
    return result.metrics


def training_record(folder: Path) -> dict[str, Any]:
    """A retrain output folder's metrics.json ({} when there is none: a model from elsewhere)."""
    path = Path(folder) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def initialisation(record: dict[str, Any]) -> str:
    """'supernet', 'scratch' or 'unknown', from a training record."""
    return {0.0: "scratch", 1.0: "supernet"}.get(record.get("init_from_supernet"), "unknown")


def load_config(params: Any, overrides: Any = None) -> RetrainConfig:
    return load_section(RetrainConfig, NAME, params, overrides)


@guarded
def main(argv: list[str] | None = None) -> None:
    """automoe retrain --data data/prepared --arch best_arch.yaml --out models/retrained [--supernet supernet.pt]"""
    parser = stage_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="prepare_data output folder")
    parser.add_argument("--arch", required=True, help=f"arch YAML, or one of {', '.join(NAMED_ARCHS)}")
    parser.add_argument("--supernet", type=Path, help="supernet.pt (for retrain.init_from_supernet)")
    args = parser.parse_args(argv)
    inputs = RetrainInputs(args.data, args.arch, args.supernet)
    cli_run(
        NAME,
        load_config,
        args,
        lambda cfg, t: run(cfg, inputs, args.out, t.log_metrics),
        ARTIFACTS,
        run_name=run_name(args.arch),
    )


def run_name(arch: str) -> str:
    """The MLflow run's name: which model this retrain is (the pipeline retrains two)."""
    return "retrain/dense" if arch == "largest_dense" else f"retrain/{arch if arch in NAMED_ARCHS else 'searched'}"


def component_main(
    params: str,
    overrides: list,
    data_path: str,
    arch: str,
    supernet_path: str,
    out_path: str,
    metrics: Any,
    nproc: int = 0,
) -> None:
    """KFP component body; nproc > 1 runs the stage under torchrun, one worker per GPU."""
    if nproc > 1:
        args = ["--data", data_path, "--arch", arch, "--out", out_path]
        args += ["--supernet", supernet_path] if supernet_path else []
        write_kfp_metrics(metrics, run_distributed(NAME, nproc, params, overrides, args))
        return
    inputs = RetrainInputs(Path(data_path), arch, Path(supernet_path) if supernet_path else None)
    component_run(
        NAME,
        load_config,
        params,
        overrides,
        out_path,
        lambda cfg, t: run(cfg, inputs, Path(out_path), t.log_metrics),
        ARTIFACTS,
        metrics,
        run_name=run_name(arch),
    )

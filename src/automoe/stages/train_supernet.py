"""train_supernet: train the weight-sharing SuperTransformer, one sampled SubTransformer per update.

Output folder: `supernet.pt` (weights + search space + model args + vocabulary info),
`checkpoints/` (resumable), `curves.csv`, `valid_curves.csv`, `training_curve.png`,
`metrics.json`. The final weights are those of the best checkpoint: the lowest mean
validation NLL over the largest, the smallest and one fixed random SubTransformer (or
the average of the last N checkpoints with `train.average_last: N`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from automoe.config import load_section
from automoe.data.dataset import PreparedData
from automoe.io import atomic_write_json
from automoe.model.supernet import SuperTransformer
from automoe.space import ArchConfig, SearchSpace, load_space
from automoe.stages._cli import cli_run, component_run, guarded, run_distributed, stage_parser, write_kfp_metrics
from automoe.train import setup
from automoe.train.distributed import close_world, init_world
from automoe.train.trainer import MetricsHook, TrainConfig, train, write_curves

NAME = "train_supernet"
ARTIFACTS = ["training_curve.png", "curves.csv"]  # logged to MLflow
VALID_RANDOM_SEED = 2**31 - 1


@dataclass(frozen=True)
class TrainSupernetConfig:
    space: str = "small"  # a preset name under configs/spaces/ or a path to a space YAML
    sampling: Literal["uniform", "sandwich"] = "uniform"  # sandwich: largest + smallest + random per update
    # budget-aware sampling: 0 samples the whole space; f > 0 samples only archs whose GFLOPs
    # (analytic, 30 + 30 tokens) are at most f x the largest dense arch's, i.e. what a search
    # under about that budget can choose (GFLOPs are known before any latency is measured)
    sample_max_gflops: float = 0.0
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.sample_max_gflops < 0:
            raise ValueError(f"sample_max_gflops must be >= 0 (0: the whole space), got {self.sample_max_gflops}")


@dataclass(frozen=True)
class TrainSupernetInputs:
    data: Path  # a prepare_data output folder


def update_archs(space: SearchSpace, cfg: TrainSupernetConfig, update: int) -> list[ArchConfig]:
    """The SubTransformer(s) of an update, from the seed and the update count alone, so
    every worker and every resumed run trains the same ones."""
    rng = np.random.default_rng([cfg.train.seed, update])
    sampled = space.sample(rng)
    if cfg.sample_max_gflops:
        limit = cfg.sample_max_gflops * _gflops(space, space.largest_dense())
        for _ in range(10_000):  # redraw until under the limit (the smallest arch always is)
            if _gflops(space, sampled) <= limit:
                break
            sampled = space.sample(rng)
        else:
            sampled = space.smallest()
    return [space.largest(), space.smallest(), sampled] if cfg.sampling == "sandwich" else [sampled]


def _gflops(space: SearchSpace, arch: ArchConfig) -> float:
    from automoe.model.counting import count

    return count(arch, 1, space.qkv_dim).gflops_no_embed  # the vocabulary does not change the ranking


def valid_archs(space: SearchSpace, seed: int) -> dict[str, ArchConfig]:
    return {
        "largest": space.largest(),
        "smallest": space.smallest(),
        "random": space.sample(np.random.default_rng([seed, VALID_RANDOM_SEED])),
    }


def run(
    cfg: TrainSupernetConfig, inputs: TrainSupernetInputs, out_dir: Path, on_metrics: MetricsHook | None = None
) -> dict[str, float]:
    data = PreparedData.open(inputs.data)
    space = load_space(cfg.space)
    out_dir = setup.output_dir(out_dir)
    world = init_world(cfg.train.device)
    try:
        args = setup.model_args(space, data.vocab_size, cfg.train)
        net = setup.seeded(cfg.train.seed, lambda: SuperTransformer(space=space, args=args))
        result = train(
            cfg.train,
            net,
            data,
            out_dir,
            world=world,
            archs_for_update=lambda u: update_archs(space, cfg, u),
            valid_archs=valid_archs(space, cfg.train.seed),
            identity=setup.identity(NAME, cfg, data, space=space.digest()),
            on_metrics=on_metrics,
            desc=NAME,
        )
        if world.is_main:
            net.load_state_dict(result.weights)
            net.cpu().save(out_dir / "supernet.pt", vocab=data.vocab_info())
            write_curves(out_dir, result.history, result.valid_history, f"supernet training ({space.name})")
            atomic_write_json(out_dir / "metrics.json", result.metrics)
    finally:
        close_world(world)
    return result.metrics


def load_config(params: Any, overrides: Any = None) -> TrainSupernetConfig:
    return load_section(TrainSupernetConfig, NAME, params, overrides)


@guarded
def main(argv: list[str] | None = None) -> None:
    """automoe train_supernet --data data/prepared --out models/supernet [--set train_supernet.train.KEY=VALUE]"""
    parser = stage_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="prepare_data output folder")
    args = parser.parse_args(argv)
    cli_run(
        NAME,
        load_config,
        args,
        lambda cfg, t: run(cfg, TrainSupernetInputs(args.data), args.out, t.log_metrics),
        ARTIFACTS,
    )


def component_main(params: str, overrides: list, data_path: str, out_path: str, metrics: Any, nproc: int = 0) -> None:
    """KFP component body; nproc > 1 runs the stage under torchrun, one worker per GPU."""
    if nproc > 1:
        args = ["--data", data_path, "--out", out_path]
        write_kfp_metrics(metrics, run_distributed(NAME, nproc, params, overrides, args))
        return
    component_run(
        NAME,
        load_config,
        params,
        overrides,
        out_path,
        lambda cfg, t: run(cfg, TrainSupernetInputs(Path(data_path)), Path(out_path), t.log_metrics),
        ARTIFACTS,
        metrics,
    )

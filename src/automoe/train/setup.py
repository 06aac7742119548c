"""What both training stages need around the trainer: model args, seeded construction,
the run identity that decides whether checkpoints can be resumed, and the outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from automoe.config import to_dict
from automoe.data.dataset import PreparedData
from automoe.errors import AutomoeError
from automoe.model.transformer import ModelArgs
from automoe.space import SearchSpace
from automoe.train.trainer import TrainConfig

T = TypeVar("T")
# settings that do not change the trajectory: a resumed run may change them
VOLATILE = {"threads", "log_interval", "device", "keep_last", "average_last", "valid_interval"}


def model_args(space: SearchSpace, vocab_size: int, cfg: TrainConfig) -> ModelArgs:
    return ModelArgs(
        vocab_size=vocab_size,
        qkv_dim=space.qkv_dim,
        max_embed_dim=max(space.encoder_embed_dim + space.decoder_embed_dim),
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        pre_norm=cfg.norm == "pre",
    )


def seeded(seed: int, build: Callable[[], T]) -> T:
    """Build with a seeded torch RNG without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def identity(stage: str, cfg: Any, data: PreparedData, **extra: Any) -> dict[str, Any]:
    """Checkpoints resume only into a run with the same identity."""
    config = to_dict(cfg)
    config["train"] = {k: v for k, v in config["train"].items() if k not in VOLATILE}
    return {"stage": stage, "config": config, "data_sha256": data.manifest["data_sha256"], **extra}


def output_dir(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutomoeError(f"{out_dir}: cannot write output folder ({exc.strerror or exc})") from None
    return out_dir

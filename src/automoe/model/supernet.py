"""The SuperTransformer: one set of weights whose front slices are every SubTransformer.

    supernet = SuperTransformer(space=space, args=args)
    logits, stats = supernet(src, tgt_in, arch)      # arch: an ArchConfig of the space

The weights have the shape of the space's largest arch with the most experts, each of
the largest hidden size; an arch uses the first L layers, the first n experts of a
layer, and W[:out, :in] of every matrix. Experts share no weights with each other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automoe.config import from_dict
from automoe.model import artifact
from automoe.model.transformer import DecoderCache, EncoderOut, ModelArgs, Transformer
from automoe.space import ArchConfig, SearchSpace

FORMAT = "automoe.supernet/1"


class SuperTransformer(nn.Module):
    def __init__(self, *, space: SearchSpace, args: ModelArgs):
        super().__init__()
        self.space = space
        self.core = Transformer(shape=space.largest(), args=args)

    @property
    def args(self) -> ModelArgs:
        return self.core.args

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, arch: ArchConfig, capacity_factor: float | None = None):
        return self.core(src, tgt, arch, capacity_factor)

    def encode(self, src: torch.Tensor, arch: ArchConfig) -> EncoderOut:
        return self.core.encode(src, arch)

    def decode(self, tgt: torch.Tensor, enc: EncoderOut, arch: ArchConfig, cache: DecoderCache | None = None):
        logits, cache, _ = self.core.decode(tgt, enc, arch, cache)
        return logits, cache

    def save(self, path: Path | str, vocab: dict[str, Any] | None = None) -> None:
        """Weights, the search space, model args and vocabulary info in one file."""
        artifact.save(
            path,
            FORMAT,
            {
                "space": self.space.to_dict(),
                "args": dataclasses.asdict(self.args),
                "vocab": dict(vocab or {}),
                "state_dict": artifact.cpu_state(self),
            },
        )

    @classmethod
    def load(cls, path: Path | str, map_location: str | torch.device = "cpu") -> tuple[SuperTransformer, dict]:
        payload = artifact.load(path, FORMAT, map_location)
        space = from_dict(SearchSpace, payload["space"], f"{path}: space")
        model = cls(space=space, args=ModelArgs(**payload["args"]))
        model.load_state_dict(payload["state_dict"])
        return model, payload["vocab"]

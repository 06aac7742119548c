"""The compact SubTransformer: one architecture, exactly its own weights.

`extract(supernet, arch)` copies the slices the arch uses out of the supernet; the
result gives the same outputs as `supernet(src, tgt, arch)` and carries no unused
layers, experts or padding. A saved SubTransformer rebuilds itself from its file:
weights, arch, model args and vocabulary info (loaded with `weights_only=True`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automoe.model import artifact
from automoe.model.supernet import SuperTransformer
from automoe.model.transformer import DecoderCache, EncoderOut, ModelArgs, Transformer
from automoe.space import ArchConfig

FORMAT = "automoe.subtransformer/1"


class SubTransformer(nn.Module):
    def __init__(self, *, arch: ArchConfig, args: ModelArgs):
        super().__init__()
        self.arch = arch
        self.core = Transformer(shape=arch, args=args)

    @property
    def args(self) -> ModelArgs:
        return self.core.args

    def forward(
        self, src: torch.Tensor, tgt: torch.Tensor, arch: ArchConfig | None = None, capacity_factor: float | None = None
    ):
        return self.core(src, tgt, self._own(arch), capacity_factor)

    def encode(self, src: torch.Tensor, arch: ArchConfig | None = None) -> EncoderOut:
        return self.core.encode(src, self._own(arch))

    def decode(
        self, tgt: torch.Tensor, enc: EncoderOut, arch: ArchConfig | None = None, cache: DecoderCache | None = None
    ):
        step = getattr(self, "fused_step", None)  # set on a serving-layout copy (model/inference.py)
        if step is not None and step.usable(tgt, cache):
            self._own(arch)
            return step(tgt, enc, cache)
        logits, cache, _ = self.core.decode(tgt, enc, self._own(arch), cache)
        return logits, cache

    def _own(self, arch: ArchConfig | None) -> ArchConfig:
        if arch is not None and arch != self.arch:
            raise ValueError("a SubTransformer runs only its own architecture")
        return self.arch

    # -- persistence ----------------------------------------------------------------

    def save(self, path: Path | str, vocab: dict[str, Any] | None = None) -> None:
        """One self-describing file: weights, arch, model args, vocabulary info."""
        artifact.save(
            path,
            FORMAT,
            {
                "arch": self.arch.to_dict(),
                "args": dataclasses.asdict(self.args),
                "vocab": dict(vocab or {}),
                "state_dict": artifact.cpu_state(self),
            },
        )

    @classmethod
    def load(cls, path: Path | str, map_location: str | torch.device = "cpu") -> tuple[SubTransformer, dict]:
        """The model and its vocabulary info."""
        payload = artifact.load(path, FORMAT, map_location)
        model = cls(arch=ArchConfig.from_dict(payload["arch"], f"{path}: arch"), args=ModelArgs(**payload["args"]))
        model.load_state_dict(payload["state_dict"])
        return model, payload["vocab"]


@torch.no_grad()
def extract(
    supernet: SuperTransformer,
    arch: ArchConfig,
    *,
    dropout: float | None = None,
    attention_dropout: float | None = None,
) -> SubTransformer:
    """Copy the front slices `arch` uses into a standalone SubTransformer, with the supernet's
    dropout unless a fine-tuning gives its own."""
    arch.validate(supernet.space)
    args = supernet.args
    args = dataclasses.replace(
        args,
        dropout=args.dropout if dropout is None else dropout,
        attention_dropout=args.attention_dropout if attention_dropout is None else attention_dropout,
    )
    sub = SubTransformer(arch=arch, args=args)
    source = supernet.state_dict()
    for name, target in sub.state_dict().items():
        weight = source[name]
        target.copy_(weight[tuple(slice(0, n) for n in target.shape)])  # every shared weight is a front slice
    return sub.train(supernet.training)

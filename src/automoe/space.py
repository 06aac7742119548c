"""Search space and architecture values.

`SearchSpace` is data (a validated YAML preset under configs/spaces/). `ArchConfig` is
one SubTransformer of a space: an immutable value passed to the model's forward. Each
FFN sublayer is a tuple of expert hidden sizes: `(1024,)` is a dense FFN, `(2048, 512)`
two heterogeneous experts. Genes are fixed-length integer vectors (choice indices);
genes of inactive layers and experts ride along, so mutation and crossover always give
a valid architecture and expert lists are repaired when a count changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from automoe.config import from_dict, read_yaml
from automoe.errors import ConfigError

SPACE_DIR = "configs/spaces"


@dataclass(frozen=True)
class SearchSpace:
    name: str
    encoder_embed_dim: tuple[int, ...]
    decoder_embed_dim: tuple[int, ...]
    encoder_layers: tuple[int, ...]
    decoder_layers: tuple[int, ...]
    ffn_dim: tuple[int, ...]
    self_attn_heads: tuple[int, ...]
    ende_attn_heads: tuple[int, ...]
    ende_span: tuple[int, ...]
    n_experts: tuple[int, ...]
    top_k: tuple[int, ...]
    qkv_dim: int
    heterogeneous: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                if not value:
                    raise ValueError(f"{f.name}: needs at least one choice")
                if any(v < 1 for v in value) or len(set(value)) != len(value):
                    raise ValueError(f"{f.name}: choices must be distinct positive integers, got {list(value)}")
        for heads in self.self_attn_heads + self.ende_attn_heads:
            if self.qkv_dim % heads:
                raise ValueError(f"qkv_dim: {self.qkv_dim} is not divisible by {heads} heads")
        if max(self.top_k) > max(self.n_experts):
            raise ValueError(f"top_k: {max(self.top_k)} exceeds the largest n_experts {max(self.n_experts)}")
        if min(self.ende_span) > min(self.encoder_layers):
            raise ValueError("ende_span: the smallest span exceeds the smallest encoder depth")

    # -- identity ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(self)
            if (v := getattr(self, f.name)) is not None
        }

    def digest(self) -> str:
        """A hash of the space's content: predictors and checkpoints refuse another space."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def check_subspace_of(self, outer: SearchSpace, what: str) -> None:
        """Refuse a space with an arch `outer` cannot run (a search restricted to part of a
        supernet's space: homogeneous experts, dense layers only)."""
        if self.qkv_dim != outer.qkv_dim:
            raise ConfigError(f"{what}: qkv_dim {self.qkv_dim} differs from the supernet's {outer.qkv_dim}")
        if self.heterogeneous and not outer.heterogeneous:
            raise ConfigError(f"{what}: heterogeneous experts, but the supernet's space {outer.name!r} is homogeneous")
        for f in dataclasses.fields(self):
            inner = getattr(self, f.name)
            if isinstance(inner, tuple) and not set(inner) <= set(getattr(outer, f.name)):
                extra = sorted(set(inner) - set(getattr(outer, f.name)))
                raise ConfigError(f"{what}: {f.name} choices {extra} are not in the supernet's space {outer.name!r}")

    # -- extremes ---------------------------------------------------------------

    def largest(self) -> ArchConfig:
        """Every dimension at its maximum: the SuperTransformer's own shape."""
        enc, dec = max(self.encoder_layers), max(self.decoder_layers)
        experts = (max(self.ffn_dim),) * max(self.n_experts)
        return ArchConfig(
            encoder_embed_dim=max(self.encoder_embed_dim),
            decoder_embed_dim=max(self.decoder_embed_dim),
            encoder_ffn=(experts,) * enc,
            decoder_ffn=(experts,) * dec,
            encoder_self_heads=(max(self.self_attn_heads),) * enc,
            decoder_self_heads=(max(self.self_attn_heads),) * dec,
            decoder_ende_heads=(max(self.ende_attn_heads),) * dec,
            decoder_ende_span=(min(max(self.ende_span), enc),) * dec,
            top_k=max(self.top_k),
        )

    def smallest(self) -> ArchConfig:
        enc, dec = min(self.encoder_layers), min(self.decoder_layers)
        expert = ((min(self.ffn_dim),) * min(self.n_experts),)
        return ArchConfig(
            encoder_embed_dim=min(self.encoder_embed_dim),
            decoder_embed_dim=min(self.decoder_embed_dim),
            encoder_ffn=expert * enc,
            decoder_ffn=expert * dec,
            encoder_self_heads=(min(self.self_attn_heads),) * enc,
            decoder_self_heads=(min(self.self_attn_heads),) * dec,
            decoder_ende_heads=(min(self.ende_attn_heads),) * dec,
            decoder_ende_span=(min(self.ende_span),) * dec,
            top_k=min(self.top_k),
        )

    def largest_dense(self) -> ArchConfig:
        """The largest dense Transformer of the space: the baseline AutoMoE is compared with."""
        big = self.largest()
        return dataclasses.replace(
            big,
            encoder_ffn=((max(self.ffn_dim),),) * big.encoder_layers,
            decoder_ffn=((max(self.ffn_dim),),) * big.decoder_layers,
            top_k=1,
        )

    def largest_dense_span1(self) -> ArchConfig:
        """The largest dense arch whose decoder layers attend to the last encoder layer only:
        the vanilla Transformer, the dense form CTranslate2 runs (automoe export_ct2)."""
        dense = self.largest_dense()
        return dataclasses.replace(dense, decoder_ende_span=(1,) * dense.decoder_layers).validate(self)

    # -- genes ------------------------------------------------------------------

    def gene_choices(self) -> list[tuple[int, ...]]:
        """The choices of each gene position, in gene order."""
        e_max, choices = max(self.n_experts), []
        choices += [
            self.encoder_embed_dim,
            self.decoder_embed_dim,
            self.encoder_layers,
            self.decoder_layers,
            self.top_k,
        ]
        for _ in range(max(self.encoder_layers)):
            choices += [self.self_attn_heads, self.n_experts] + [self.ffn_dim] * e_max
        for _ in range(max(self.decoder_layers)):
            choices += [self.self_attn_heads, self.ende_attn_heads, self.ende_span, self.n_experts]
            choices += [self.ffn_dim] * e_max
        return choices

    def decode(self, gene: list[int] | np.ndarray) -> ArchConfig:
        """Gene (choice indices) -> ArchConfig, repairing what depends on other genes:
        expert lists take their first n sizes (all equal to the first in homogeneous
        mode), top-k is capped by each layer's expert count, the enc-dec span by the
        encoder depth."""
        choices = self.gene_choices()
        if len(gene) != len(choices):
            raise ConfigError(f"gene: expected {len(choices)} positions for space {self.name!r}, got {len(gene)}")
        values = []
        for i, (g, options) in enumerate(zip(gene, choices, strict=True)):
            if not 0 <= int(g) < len(options):
                raise ConfigError(f"gene[{i}]: index {int(g)} out of range 0..{len(options) - 1}")
            values.append(options[int(g)])
        it = iter(values)
        enc_d, dec_d, enc_l, dec_l, top_k = (next(it) for _ in range(5))
        e_max = max(self.n_experts)

        def experts(n: int, sizes: list[int]) -> tuple[int, ...]:
            return tuple(sizes[:n]) if self.heterogeneous else (sizes[0],) * n

        enc_heads, enc_ffn, dec_heads, ende_heads, spans, dec_ffn = [], [], [], [], [], []
        for _ in range(max(self.encoder_layers)):
            h, n, sizes = next(it), next(it), [next(it) for _ in range(e_max)]
            enc_heads.append(h)
            enc_ffn.append(experts(n, sizes))
        for _ in range(max(self.decoder_layers)):
            h, eh, span, n, sizes = next(it), next(it), next(it), next(it), [next(it) for _ in range(e_max)]
            dec_heads.append(h)
            ende_heads.append(eh)
            spans.append(min(span, enc_l))
            dec_ffn.append(experts(n, sizes))
        return ArchConfig(
            encoder_embed_dim=enc_d,
            decoder_embed_dim=dec_d,
            encoder_ffn=tuple(enc_ffn[:enc_l]),
            decoder_ffn=tuple(dec_ffn[:dec_l]),
            encoder_self_heads=tuple(enc_heads[:enc_l]),
            decoder_self_heads=tuple(dec_heads[:dec_l]),
            decoder_ende_heads=tuple(ende_heads[:dec_l]),
            decoder_ende_span=tuple(spans[:dec_l]),
            top_k=top_k,
        )

    def encode(self, arch: ArchConfig, rng: np.random.Generator | None = None) -> list[int]:
        """ArchConfig -> gene. Inactive positions (layers and experts the arch does not use)
        get choice 0, or with `rng` a random choice: mutation and crossover encode with an
        rng, so a layer or expert they switch on gets sizes drawn from the space, not the
        first choice of every list (AutoMoE's repair extends expert lists at random)."""
        arch.validate(self)
        e_max = max(self.n_experts)

        def idx(options: tuple[int, ...], value: int) -> int:
            return options.index(value)

        def filler(options: tuple[int, ...], count: int = 1) -> list[int]:
            return [0 if rng is None else int(rng.integers(len(options))) for _ in range(count)]

        def expert_genes(sizes: tuple[int, ...]) -> list[int]:
            return [idx(self.ffn_dim, s) for s in sizes] + filler(self.ffn_dim, e_max - len(sizes))

        gene = [
            idx(self.encoder_embed_dim, arch.encoder_embed_dim),
            idx(self.decoder_embed_dim, arch.decoder_embed_dim),
            idx(self.encoder_layers, arch.encoder_layers),
            idx(self.decoder_layers, arch.decoder_layers),
            idx(self.top_k, arch.top_k),
        ]
        for i in range(max(self.encoder_layers)):
            if i < arch.encoder_layers:
                ffn = arch.encoder_ffn[i]
                gene += [idx(self.self_attn_heads, arch.encoder_self_heads[i]), idx(self.n_experts, len(ffn))]
                gene += expert_genes(ffn)
            else:
                gene += filler(self.self_attn_heads) + filler(self.n_experts) + filler(self.ffn_dim, e_max)
        for i in range(max(self.decoder_layers)):
            if i < arch.decoder_layers:
                ffn = arch.decoder_ffn[i]
                gene += [
                    idx(self.self_attn_heads, arch.decoder_self_heads[i]),
                    idx(self.ende_attn_heads, arch.decoder_ende_heads[i]),
                    idx(self.ende_span, arch.decoder_ende_span[i]),
                    idx(self.n_experts, len(ffn)),
                ]
                gene += expert_genes(ffn)
            else:
                gene += filler(self.self_attn_heads) + filler(self.ende_attn_heads) + filler(self.ende_span)
                gene += filler(self.n_experts) + filler(self.ffn_dim, e_max)
        return gene

    # -- sampling and evolution ---------------------------------------------------

    def random_gene(self, rng: np.random.Generator) -> list[int]:
        return [int(rng.integers(len(options))) for options in self.gene_choices()]

    def sample(self, rng: np.random.Generator) -> ArchConfig:
        """A random SubTransformer, uniform per factor as in HAT: each dimension (widths,
        depths, top-k, then each active layer's heads, span, expert count and expert sizes)
        is drawn uniformly from its choices, independently, except that a decoder layer's
        enc-dec span is drawn uniformly from the spans its encoder depth allows. (Redrawing
        whole genes until every span fit made shallow encoders and deep decoders rare: in
        the small space encoder depth 2 came a third of the time, not half.) This is not
        uniform over distinct architectures: a deep decoder has more per-layer combinations
        than a shallow one but is drawn as often."""
        e_max = max(self.n_experts)
        start = 5 + max(self.encoder_layers) * (2 + e_max)  # the first decoder layer's genes
        while True:
            gene = self.random_gene(rng)
            enc_layers, dec_layers = self.encoder_layers[gene[2]], self.decoder_layers[gene[3]]
            allowed = [j for j, span in enumerate(self.ende_span) if span <= enc_layers]
            if not allowed:  # no span fits this encoder depth: draw the depths again
                continue
            for i in range(dec_layers):
                gene[start + i * (4 + e_max) + 2] = int(allowed[rng.integers(len(allowed))])
            return self.decode(gene)

    def mutate(self, arch: ArchConfig, prob: float, rng: np.random.Generator) -> ArchConfig:
        """Resample each gene with probability `prob`; genes of layers and experts the arch
        does not use are random, so whatever the mutation switches on is a random draw."""
        gene = self.encode(arch, rng)
        choices = self.gene_choices()
        for i, options in enumerate(choices):
            if rng.random() < prob:
                gene[i] = int(rng.integers(len(options)))
        return self.decode(gene)

    def crossover(self, a: ArchConfig, b: ArchConfig, rng: np.random.Generator) -> ArchConfig:
        """Uniform crossover: each gene from either parent with probability 1/2 (unused
        positions random, as in `mutate`)."""
        ga, gb = self.encode(a, rng), self.encode(b, rng)
        return self.decode([x if rng.random() < 0.5 else y for x, y in zip(ga, gb, strict=True)])

    # -- predictor features ---------------------------------------------------------

    def features(self, arch: ArchConfig) -> np.ndarray:
        """Architecture features for the latency predictor, in FEATURE_NAMES order."""
        return arch_features(arch)


# The decoder's depth and width, and where batch-1 decoding time goes as sums over layers
# of per-token work: the decoder runs once per generated token (its depth x width terms
# dominate on a CPU), the encoder once (its depth and width enter through its totals).
# Heads are left out: with a fixed q/k/v width they do not change the work. On the
# 102-arch Multi30k table (BENCHMARKS.md), 8-fold cross-validated MAPE: linear model
# 6.3% (8.7% with the earlier per-layer means and totals), the paper's MLP 11.0% (11.5%),
# before the encoder's MoE count was a feature. Routing costs per MoE layer (router,
# dispatch, a product per expert used) on both sides: without the encoder's count its MoE
# cost was spread over every arch and dense encoders were over-predicted (make run's
# 43-arch table, 8-fold linear: mean error on its 2 dense archs +16.6% -> +8.9%, MAPE
# over 5 fold orders 9.4% -> 9.0%). An expert's active width is its layer's mean (uniform
# top-k routing): the table's trained routing is learnt in the coefficients; it is not
# known per arch.
FEATURE_NAMES = (
    "decoder_layers",
    "decoder_embed_dim",
    "decoder_width_total",  # sum of d over decoder layers
    "decoder_width_sq_total",  # sum of d^2: lets the cost bend with width (an empirical term)
    "decoder_ffn_total",  # sum of d x active FFN hidden units (top-k experts' widths)
    "decoder_moe_layers",  # layers that route (router + dispatch)
    "decoder_ende_span_total",
    "decoder_ende_width_total",  # sum of d x span: encoder-decoder attention length
    "encoder_width_total",
    "encoder_ffn_total",
    "encoder_moe_layers",
)


def arch_features(arch: ArchConfig) -> np.ndarray:
    def active(experts) -> float:  # hidden units a token runs through under uniform top-k routing
        return min(arch.top_k, len(experts)) * float(np.mean(experts))

    d, n, d_enc = arch.decoder_embed_dim, arch.decoder_layers, arch.encoder_embed_dim
    return np.array(
        [
            n,
            d,
            n * d,
            n * d * d,
            sum(d * active(e) for e in arch.decoder_ffn),
            sum(len(e) > 1 for e in arch.decoder_ffn),
            sum(arch.decoder_ende_span),
            sum(d * span for span in arch.decoder_ende_span),
            arch.encoder_layers * d_enc,
            sum(d_enc * active(e) for e in arch.encoder_ffn),
            sum(len(e) > 1 for e in arch.encoder_ffn),
        ],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class ArchConfig:
    """One SubTransformer. Per-layer tuples have one entry per active layer."""

    encoder_embed_dim: int
    decoder_embed_dim: int
    encoder_ffn: tuple[tuple[int, ...], ...]  # per encoder layer: the hidden size of each expert
    decoder_ffn: tuple[tuple[int, ...], ...]
    encoder_self_heads: tuple[int, ...]
    decoder_self_heads: tuple[int, ...]
    decoder_ende_heads: tuple[int, ...]
    decoder_ende_span: tuple[int, ...]  # attend to the last 1, 2 or 3 encoder layers
    top_k: int = 1

    @property
    def encoder_layers(self) -> int:
        return len(self.encoder_ffn)

    @property
    def decoder_layers(self) -> int:
        return len(self.decoder_ffn)

    @property
    def is_dense(self) -> bool:
        return all(len(e) == 1 for e in self.encoder_ffn + self.decoder_ffn)

    def validate(self, space: SearchSpace) -> ArchConfig:
        """Raise ConfigError naming the first field outside `space`."""

        def check(field: str, value: int, options: tuple[int, ...]) -> None:
            if value not in options:
                raise ConfigError(f"arch.{field}: {value} is not in the space's choices {list(options)}")

        check("encoder_embed_dim", self.encoder_embed_dim, space.encoder_embed_dim)
        check("decoder_embed_dim", self.decoder_embed_dim, space.decoder_embed_dim)
        check("encoder_layers", self.encoder_layers, space.encoder_layers)
        check("decoder_layers", self.decoder_layers, space.decoder_layers)
        check("top_k", self.top_k, space.top_k)
        for name, n in (
            ("encoder_self_heads", self.encoder_layers),
            ("decoder_self_heads", self.decoder_layers),
            ("decoder_ende_heads", self.decoder_layers),
            ("decoder_ende_span", self.decoder_layers),
        ):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"arch.{name}: expected {n} entries (one per layer), got {len(getattr(self, name))}")
        for side in ("encoder", "decoder"):
            for i, experts in enumerate(getattr(self, f"{side}_ffn")):
                check(f"{side}_ffn[{i}] (number of experts)", len(experts), space.n_experts)
                for j, size in enumerate(experts):
                    check(f"{side}_ffn[{i}][{j}]", size, space.ffn_dim)
                if not space.heterogeneous and len(set(experts)) > 1:
                    raise ConfigError(f"arch.{side}_ffn[{i}]: experts differ in size but the space is homogeneous")
        for i, h in enumerate(self.encoder_self_heads):
            check(f"encoder_self_heads[{i}]", h, space.self_attn_heads)
        for i, h in enumerate(self.decoder_self_heads):
            check(f"decoder_self_heads[{i}]", h, space.self_attn_heads)
        for i, h in enumerate(self.decoder_ende_heads):
            check(f"decoder_ende_heads[{i}]", h, space.ende_attn_heads)
        for i, s in enumerate(self.decoder_ende_span):
            check(f"decoder_ende_span[{i}]", s, space.ende_span)
            if s > self.encoder_layers:
                raise ConfigError(f"arch.decoder_ende_span[{i}]: {s} exceeds the {self.encoder_layers} encoder layers")
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                [list(v) for v in value]
                if f.name.endswith("_ffn")
                else (list(value) if isinstance(value, tuple) else value)
            )
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_dict(cls, data: Any, where: str = "arch") -> ArchConfig:
        arch = from_dict(cls, data, where)
        for side in ("encoder_ffn", "decoder_ffn"):
            if not getattr(arch, side):
                raise ConfigError(f"{where}.{side}: needs at least one layer")
            for i, experts in enumerate(getattr(arch, side)):
                if not experts:
                    raise ConfigError(f"{where}.{side}[{i}]: needs at least one expert")
        return arch

    @classmethod
    def from_yaml(cls, path: Path | str) -> ArchConfig:
        return cls.from_dict(read_yaml(path), str(path))


def load_space(name_or_path: str | Path) -> SearchSpace:
    """A preset name (`space0`, `small`) or a path to a space YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = _find_preset(str(name_or_path))
    return from_dict(SearchSpace, read_yaml(path), str(path))


def _find_preset(name: str) -> Path:
    here = Path(__file__).resolve()
    roots = [Path.cwd(), *here.parents]
    for root in roots:
        candidate = root / SPACE_DIR / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for r in roots for p in (r / SPACE_DIR).glob("*.yaml")})
    raise ConfigError(f"space {name!r}: no such preset (known: {', '.join(known) or 'none found'})")

"""CPU inference layout for compact models: linear layers on oneDNN with packed weights.

Incremental decoding multiplies a few rows (beam x batch) by every weight matrix at every
step. For such small products PyTorch's default CPU GEMM (MKL in the official wheels)
is slow on these AMD CPUs: oneDNN with the weight reordered once into its blocked layout
ran the same products 2-5x faster here (bench/profile_decode.py shows the effect on whole
decoding). `for_inference(model)` returns a copy of a compact SubTransformer whose linear
layers and tied output projection run that way, with the expert's ReLU fused into its
first layer; outputs equal the original's to fp32 rounding (tests/test_inference.py).
Its incremental decoding steps run fused (model/fused.py): direct kernel calls on 2-D
activations, no module dispatch.

`precision="int8"` quantizes instead: every linear layer and the output projection hold
int8 weights, one scale per output channel (symmetric, from the channel's largest
magnitude), and quantize their input per call (dynamic, one scale per tensor); products
run in FBGEMM's int8 kernels with int32 accumulation and come out as fp32. Embedding
lookups, layer norms, softmax and the router stay fp32. Outputs follow fp32 to within
quantization error (tests/test_inference.py bounds it; BENCHMARKS.md gives the BLEU).
The input's range depends on the CPU (`int8_reduce_range`): FBGEMM's kernel for CPUs
without AVX-512 VNNI or AMX adds pairs of u8 x s8 products in saturating 16-bit lanes, so
there the input is quantized to 7 bits (as PyTorch's own dynamic quantization does on x86),
and to the full 8 bits only where VNNI/AMX accumulate in 32 bits.

`precision="fp16"` or `"bf16"` (GPU serving) casts a copy of the model to that dtype: every
product runs in half precision on the GPU's tensor cores; the decoder's log-softmax and beam
scores stay fp32 (model/decode.py) and the router's logits too (model/moe.py). On a CPU the
cast runs (the tests use it) but is slower than fp32; the stages serve half precision on a
GPU only (`device_error`).

Inference only: the copy has no gradients and is not for saving. Where oneDNN is not
available or the model is not on the CPU, fp32 comes back as it is; int8 needs the CPU and
is refused elsewhere.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from automoe.cpu import int8_reduce_range
from automoe.model import compiled, kernels
from automoe.model.attention import KV, Attention, split_heads
from automoe.model.fused import FusedStep
from automoe.model.layers import ElasticLinear, SharedEmbedding, sinusoid
from automoe.model.moe import Expert


def available(model: nn.Module) -> bool:
    device = next(model.parameters()).device
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return device.type == "cpu" and onednn


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), None)


PROBE_ROWS = (1, 2, 4, 8, 16, 32)


def small_rows(weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Up to how many rows PyTorch's default GEMM (MKL) beats the packed oneDNN kernel for
    this weight shape at the current thread count: measured once per machine and kept in
    its kernel plan (model/kernels.py), so every process times the same engine.
    Incremental decoding multiplies batch x beam rows: on AMD CPUs oneDNN won from one row
    (section 2 of BENCHMARKS.md), on an Intel Xeon MKL won up to 8-16 rows except for the
    output projection. Both compute the same product (fp32 rounding apart)."""

    def probe() -> int:
        rows = 0
        for m in PROBE_ROWS:
            x = torch.full((m, weight.shape[1]), 0.5)  # the values do not matter; the global RNG stays untouched
            mkl = _seconds(lambda x=x: F.linear(x, weight, bias))
            onednn = _seconds(lambda x=x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""))
            if mkl >= onednn:
                break
            rows = m
        return rows

    return kernels.choice(kernels.key(*weight.shape, bias is not None, torch.get_num_threads()), probe)


def _seconds(fn, calls: int = 20, rounds: int = 3) -> float:
    """Best of `rounds` of the mean time of `calls` calls, after a warm-up."""
    import time

    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


class PackedLinear(nn.Module):
    """An ElasticLinear at its full size on the faster CPU GEMM for the number of rows: the
    weight packed for oneDNN, or as it is for PyTorch's default GEMM up to `small_rows`
    rows (measured per shape, see `small_rows`); `activation` fused."""

    def __init__(self, linear: ElasticLinear, activation: str = "none"):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.weight = linear.weight.detach().float().contiguous()  # plain attributes: layouts, not state
        self.packed = _pack(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.activation = activation
        self.small_rows = small_rows(self.weight, self.packed, self.bias)
        self._run = self._bind()  # built once: the module path and the fused step both call it

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        if out_features not in (None, self.out_features) or x.shape[-1] != self.in_features:
            raise ValueError("a packed linear layer runs at its full size only (compact models)")
        return self._run(x)

    def kernel(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This layer as one call, its GEMM choice by rows included (model/fused.py)."""
        return self._run

    def _bind(self) -> Callable[[torch.Tensor], torch.Tensor]:
        op, packed, bias, act = torch.ops.mkldnn._linear_pointwise, self.packed, self.bias, self.activation
        weight, small = self.weight, self.small_rows * self.in_features  # up to `small` elements: the default GEMM
        if act == "relu":
            return lambda x: (
                F.relu(F.linear(x, weight, bias)) if x.numel() <= small else op(x, packed, bias, act, [], "")
            )
        return lambda x: F.linear(x, weight, bias) if x.numel() <= small else op(x, packed, bias, act, [], "")


def _quantize(weight: torch.Tensor, bias: torch.Tensor | None):
    """FBGEMM's packed int8 weight: symmetric, one scale per output channel (row)."""
    w = weight.detach().float().contiguous()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # quantized tensors are deprecated as a user API, the kernels are not
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scale, torch.zeros(len(w), dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())


class Int8Linear(nn.Module):
    """An ElasticLinear at its full size: int8 weights per output channel, the input
    quantized per call (dynamic), int32 accumulation, fp32 out; `activation` fused."""

    def __init__(self, linear: ElasticLinear, activation: str = "none", reduce_range: bool = True):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.packed = _quantize(linear.weight, linear.bias)  # a plain attribute: an opaque layout
        self.op = (
            torch.ops.quantized.linear_relu_dynamic if activation == "relu" else torch.ops.quantized.linear_dynamic
        )
        self.reduce_range = reduce_range  # the input in 7 bits where the CPU's kernel sums in int16 (above)

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        if out_features not in (None, self.out_features) or x.shape[-1] != self.in_features:
            raise ValueError("an int8 linear layer runs at its full size only (compact models)")
        return self.op(x, self.packed, self.reduce_range)

    def kernel(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This layer as one call (model/fused.py)."""
        op, packed, reduce_range = self.op, self.packed, self.reduce_range
        return lambda x: op(x, packed, reduce_range)


Precision = Literal["fp32", "int8", "fp16", "bf16"]
PRECISIONS = ("fp32", "int8", "fp16", "bf16")
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}  # GPU serving: the model cast to this dtype


def device_error(precision: str, device: str) -> str | None:
    """Why `precision` cannot be served on `device` ("cpu" or "cuda"), or None where it can."""
    if precision == "int8" and device != "cpu":
        return "int8 serving runs on the CPU only (device: cpu)"
    if precision in HALF and device != "cuda":
        return f"{precision} serving runs on a GPU only (device: cuda)"
    return None


@dataclass(frozen=True)
class Layout:
    """How a model's linear layers are served: fp32 packed for oneDNN, or int8 with the input
    in 7 bits (`reduce_range`) or 8 (see `int8_reduce_range`)."""

    precision: Precision = "fp32"
    reduce_range: bool = True

    def linear(self, linear: ElasticLinear, activation: str = "none") -> nn.Module:
        if self.precision == "int8":
            return Int8Linear(linear, activation, self.reduce_range)
        return PackedLinear(linear, activation)


class PackedExpert(nn.Module):
    """Expert FFN: ReLU fused into fc1."""

    def __init__(self, expert: Expert, layout: Layout):
        super().__init__()
        self.fc1 = layout.linear(expert.fc1, activation="relu")
        self.fc2 = layout.linear(expert.fc2)

    def forward(self, x: torch.Tensor, hidden: int, dropout: float = 0.0) -> torch.Tensor:
        return self.fc2(self.fc1(x, hidden), x.shape[-1])


class PackedAttention(nn.Module):
    """Self-attention with q/k/v fused into one packed product; encoder-decoder attention
    with its query and its k/v (fused) packed."""

    def __init__(self, attn: Attention, self_attention: bool, layout: Layout):
        super().__init__()
        self.out_proj = layout.linear(attn.out_proj)
        if self_attention:
            self.qkv = _fused(layout, attn.q_proj, attn.k_proj, attn.v_proj)
        else:
            self.q_proj, self.kv = layout.linear(attn.q_proj), _fused(layout, attn.k_proj, attn.v_proj)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv(x).chunk(3, dim=-1)  # (B, T, 3 * qkv) -> 3 x (B, T, qkv)

    def project_kv(self, kv_input: torch.Tensor, heads: int) -> KV:
        k, v = self.kv(kv_input).chunk(2, dim=-1)  # (B, S, 2 * qkv) -> 2 x (B, S, qkv)
        return split_heads(k, heads), split_heads(v, heads)

    forward = Attention.forward  # encoder-decoder attention: project the query, attend
    attend = Attention.attend


def _fused(layout: Layout, *linears: ElasticLinear) -> nn.Module:
    # the concatenated weights as a plain holder: a new ElasticLinear would draw its init from the global RNG
    fused = SimpleNamespace(
        weight=torch.cat([x.weight.detach() for x in linears]), bias=torch.cat([x.bias.detach() for x in linears])
    )
    return layout.linear(fused)  # per-channel scales: fusing changes no int8 weight


class PackedEmbedding(nn.Module):
    """The shared table for lookups; a packed copy of its used columns for the logits."""

    def __init__(self, embed: SharedEmbedding, dim: int, layout: Layout, positions: int = 1024):
        super().__init__()
        self.table = embed
        self.dim = dim
        self.int8 = layout.precision == "int8"
        self.reduce_range = layout.reduce_range
        self.weight = embed.weight.detach()[:, :dim].contiguous()
        self.packed = _quantize(self.weight, None) if self.int8 else _pack(self.weight)
        self.small_rows = 0 if self.int8 else small_rows(self.weight, self.packed, None)
        self.positions = sinusoid(torch.arange(positions), dim)  # (P, d): not recomputed every step

    def forward(self, tokens: torch.Tensor, dim: int) -> torch.Tensor:
        return self.embed(tokens, dim, 0)

    def embed(self, tokens: torch.Tensor, dim: int, start: int) -> torch.Tensor:
        end = start + tokens.shape[1]
        if dim != self.dim or end > len(self.positions):
            return self.table.embed(tokens, dim, start)
        x = F.embedding(tokens, self.table.weight[:, :dim], padding_idx=self.table.pad_id) * math.sqrt(dim)
        return x + self.positions[start:end]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            return F.linear(x, self.table.weight[:, : x.shape[-1]])
        if self.int8:
            return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)
        if x.numel() <= self.small_rows * self.dim:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def for_inference(model: nn.Module, precision: Precision = "fp32", reduce_range: bool | None = None) -> nn.Module:
    """A packed (fp32) or quantized (int8) copy of a compact SubTransformer for CPU decoding,
    or a half-precision copy (fp16, bf16) for GPU decoding (see the module doc). A model
    already in a serving layout comes back as it is.
    `reduce_range` (int8): None = what this CPU needs (`int8_reduce_range`); tests force either."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    done = getattr(model, "packed_for_inference", None)
    if done:
        if done != precision:
            raise ValueError(f"this model is already in the {done} serving layout, not {precision}")
        return model.eval()
    if precision == "int8" and not int8_available(model):
        raise ValueError("precision int8: needs a CPU model and PyTorch's FBGEMM int8 kernels (x86)")
    if precision in HALF:
        out = copy.deepcopy(model).to(HALF[precision]).eval().requires_grad_(False)
        out.packed_for_inference = precision
        return out
    if precision == "fp32" and not available(model):
        return model.eval()
    layout = Layout(precision, int8_reduce_range() if reduce_range is None else reduce_range)
    out = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for parent in list(out.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Attention):
                    setattr(parent, name, PackedAttention(child, name == "self_attn", layout))
                elif isinstance(child, Expert):
                    setattr(parent, name, PackedExpert(child, layout))
                elif isinstance(child, ElasticLinear):
                    setattr(parent, name, layout.linear(child))
                elif isinstance(child, SharedEmbedding):
                    setattr(parent, name, PackedEmbedding(child, out.arch.decoder_embed_dim, layout))
    out.packed_for_inference = precision
    out.serving_layout = layout
    out.fused_step = FusedStep(out.core, out.arch)  # incremental steps as direct kernel calls (model/fused.py)
    out.compiled = compiled.engine(out)  # beam search in one C++ loop where the extension is built
    return out


def int8_available(model: nn.Module) -> bool:
    engines = torch.backends.quantized.supported_engines
    cpu = next(model.parameters()).device.type == "cpu"
    return cpu and any(e in engines for e in ("x86", "fbgemm")) and hasattr(torch.ops.quantized, "linear_dynamic")

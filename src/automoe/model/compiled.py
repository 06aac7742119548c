"""The compiled decoder: beam search over a CPU serving-layout model in one C++ loop.

`beam_search` (model/decode.py) on a model from `for_inference` encodes, projects each
decoder layer's encoder keys/values once per sentence (the serving layout's products) and
hands the rest to `Engine` (csrc/decoder.cpp): every incremental step and all of the beam
bookkeeping (log-softmax, top-k over beam x vocabulary, finished hypotheses, length
penalty, cache reorders) with no Python per operator. Its products are the serving layout's own kernels
with the same per-shape choice (model/kernels.py), so it times and serves the engine the
latency table measured; the rest are loops over the rows. The architecture is data: an
Engine is built from a model's weights in milliseconds, nothing is compiled per arch.

The extension is built once per torch and Python version and source (`make install` runs
`python -m automoe.model.compiled`, the image's build too) into
`<sys.prefix>/share/automoe/`; `AUTOMOE_DECODER` names another folder, or `off` for the
Python path. Where no build is there, decoding takes the Python path (the fused step,
model/fused.py) with one warning line; the latency fingerprint records which engine timed
a table (`decoder: compiled <tag>`, the tag of its source and build), so a table is not
reused by another engine.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("csrc") / "decoder.cpp"
NAME = "automoe_decoder"
_STATE: dict[str, ModuleType | None | bool] = {"loaded": False, "module": None}


@functools.cache
def _tag() -> str:
    """This source, torch and Python ABI (read once per process)."""
    key = SOURCE.read_bytes() + torch.__version__.encode() + sysconfig.get_config_var("SOABI").encode()
    return hashlib.sha256(key).hexdigest()[:12]


def build_dir() -> Path | None:
    """Where this source, torch and Python's build lives (None: `AUTOMOE_DECODER=off`)."""
    env = os.environ.get("AUTOMOE_DECODER", "")
    if env.lower() == "off":
        return None
    base = Path(env) if env else Path(sys.prefix) / "share" / "automoe"
    return base / f"decoder-{_tag()}"


def _library(folder: Path) -> Path | None:
    found = sorted(folder.glob(f"{NAME}*.so")) if folder.is_dir() else []
    return found[0] if found else None


def build(verbose: bool = False) -> Path:
    """Compile the extension (g++ and ninja; about 40 s) unless this version is built."""
    from torch.utils import cpp_extension

    folder = build_dir()
    if folder is None:
        raise RuntimeError("AUTOMOE_DECODER=off: nothing to build")
    if (lib := _library(folder)) is not None:
        return lib
    work = folder.with_name(folder.name + f".tmp{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=NAME, sources=[str(SOURCE)], build_directory=str(work), extra_cflags=["-O3"], verbose=verbose
        )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # no half-built folder left behind
        raise
    try:
        work.rename(folder)  # atomic: a half-built folder is never taken for a build
    except OSError:  # another process finished first
        if _library(folder) is None:
            raise
    lib = _library(folder)
    assert lib is not None
    return lib


def module() -> ModuleType | None:
    """The built extension, or None (one warning line, once per process) where there is none."""
    if not _STATE["loaded"]:
        _STATE["loaded"] = True
        folder = build_dir()
        lib = None if folder is None else _library(folder)
        if lib is not None:
            loader = importlib.machinery.ExtensionFileLoader(NAME, str(lib))
            spec = importlib.util.spec_from_loader(NAME, loader)
            mod = importlib.util.module_from_spec(spec)
            loader.exec_module(mod)
            _STATE["module"] = mod
        elif folder is not None:
            warnings.warn(
                "the compiled decoder is not built for this torch/Python (make install builds it): "
                "decoding takes the Python path",
                stacklevel=2,
            )
    return _STATE["module"]  # type: ignore[return-value]


def reset() -> None:
    """Look for the extension again (tests)."""
    _STATE.update(loaded=False, module=None)


def version() -> str:
    """What a latency table records: "compiled <source and build tag>" (another source times
    another engine)."""
    return f"compiled {_tag()}" if build_dir() is not None else "python"


def active() -> bool:
    """Whether CPU serving-layout models decode through the compiled engine in this process."""
    return module() is not None


class Engine:
    """A serving-layout SubTransformer's decoder as the extension's Engine (see the module doc)."""

    def __init__(self, model, ext: ModuleType):
        from automoe.model.inference import Int8Linear

        core, arch, args = model.core, model.arch, model.args
        d = arch.decoder_embed_dim

        def linear(layer, relu: bool = False):
            if isinstance(layer, Int8Linear):  # the extension packs its own copy of the int8 weight
                return ext.int8_linear(*torch.ops.quantized.linear_unpack(layer.packed), relu, layer.reduce_range)
            small = layer.small_rows * layer.in_features
            return ext.fp32_linear(layer.weight, layer.packed, layer.bias, small, relu)

        embed, step = core.embed, model.fused_step  # the fused step's tables, norms and plans, as they are
        if embed.int8:
            head = ext.int8_linear(*torch.ops.quantized.linear_unpack(embed.packed), False, embed.reduce_range)
        else:
            head = ext.fp32_linear(embed.weight, embed.packed, None, embed.small_rows * embed.dim, False)
        final = [] if step.final_norm is None else list(step.final_norm[:2])
        eps = 0.0 if step.final_norm is None else step.final_norm[2]
        self.engine = ext.Engine(step.table, step.positions, head, final, eps, args.qkv_dim, args.pre_norm, arch.top_k)
        for i, plan in enumerate(step.layers):
            layer = core.decoder[i]
            experts = layer.moe.experts[: len(plan.experts)]
            self.engine.add_layer(
                linear(layer.self_attn.qkv),
                linear(layer.self_attn.out_proj),
                plan.self_heads,
                linear(layer.ende_attn.q_proj),
                linear(layer.ende_attn.out_proj),
                plan.ende_heads,
                [t for norm in plan.norms for t in norm[:2]],
                [norm[2] for norm in plan.norms],
                [linear(e.fc1, relu=True) for e in experts],
                [linear(e.fc2) for e in experts],
                None if plan.moe is None else plan.moe.router.weight.detach()[: len(experts), :d].float().contiguous(),
            )
        self.core, self.arch, self.args = core, arch, args  # the encoder keys/values are projected per search
        self.positions = len(embed.positions)
        self.vocab = args.vocab_size

    def usable(self, beam: int, longest: int) -> bool:
        """Whether it decodes this search: up to `longest` target tokens, 2 x beam candidates."""
        return longest < self.positions and self.vocab >= 2 * beam

    def beam_search(self, enc, limits, beam, length_penalty, min_len):
        """(tokens, score) per sentence from the encoder's output (one row per sentence)."""
        ende_k, ende_v, masks = [], [], []
        no_padding = bool(enc.mask.all())
        for i in range(self.arch.decoder_layers):
            span = self.arch.decoder_ende_span[i]
            memory = torch.cat(enc.states[-span:], dim=1)  # (B, span * S, d_enc)
            k, v = self.core.decoder[i].ende_attn.project_kv(memory, self.arch.decoder_ende_heads[i])  # (B, H, S', Dh)
            ende_k.append(k)
            ende_v.append(v)
            masks.append(None if no_padding else enc.mask.repeat(1, 1, 1, span))  # (B, 1, 1, span * S)
        args = self.args
        return self.engine.beam_search(
            ende_k, ende_v, masks, limits, beam, length_penalty, min_len, args.bos_id, args.eos_id, args.pad_id
        )


def engine(model) -> Engine | None:
    """The compiled engine for a CPU fp32/int8 serving-layout model, or None (Python path)."""
    if getattr(model, "packed_for_inference", None) not in ("fp32", "int8") or not hasattr(model, "serving_layout"):
        return None
    if next(model.parameters()).device.type != "cpu":
        return None
    ext = module()
    return None if ext is None else Engine(model, ext)


if __name__ == "__main__":  # make install: build for this torch and Python
    path = build(verbose="-v" in sys.argv)
    print(f"compiled decoder: {path.parent.name}")

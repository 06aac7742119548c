"""CTranslate2 serving for dense models: export a compact model, translate without torch.

`export(folder, out)` converts a retrain output folder holding a dense SubTransformer
(one expert per FFN) into a CTranslate2 Transformer model folder (`model.bin`,
`config.json`, the shared vocabulary) plus the SentencePiece model and `automoe.json`
(arch, vocabulary info, source model hash, pad/EOS ids). The layout maps one to one:
post-LayerNorm layers, ReLU FFN, sqrt(d)-scaled embeddings tied to the output
projection, and our sinusoidal table stored as the position encodings.

CTranslate2 runs a standard Transformer, so an arch exports when it is dense, has one
width for encoder, decoder and q/k/v, one head count per stack, and every decoder layer
attends to the last encoder layer only (ende_span 1); anything else is refused with the
reason. `Ct2Translator` imports neither torch nor the model code: torch loaded in the
same process slows CTranslate2 down on these CPUs, so serving and the bench keep them apart.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automoe.data.corpus import SPM_FILE
from automoe.errors import AutomoeError
from automoe.textio import clean_lines

META_FILE = "automoe.json"
MAX_POSITIONS = 1024


def check_exportable(arch, qkv_dim: int) -> None:
    """Raise AutomoeError naming everything in `arch` that CTranslate2's Transformer cannot run."""
    reasons = []
    if not arch.is_dense:
        reasons.append("it has Mixture-of-Experts layers (CTranslate2 runs dense FFNs only)")
    if not arch.encoder_embed_dim == arch.decoder_embed_dim == qkv_dim:
        reasons.append(f"encoder/decoder/qkv widths {arch.encoder_embed_dim}/{arch.decoder_embed_dim}/{qkv_dim} differ")
    if len(set(arch.encoder_self_heads)) > 1:
        reasons.append("encoder layers have different head counts")
    if len(set(arch.decoder_self_heads + arch.decoder_ende_heads)) > 1:
        reasons.append("decoder attention layers have different head counts")
    if any(span != 1 for span in arch.decoder_ende_span):
        reasons.append("a decoder layer attends to more than the last encoder layer (ende_span > 1)")
    if reasons:
        raise AutomoeError("CTranslate2 export: the arch cannot be exported: " + "; ".join(reasons))


def build_spec(model, pieces: list[str]):
    """A ctranslate2 TransformerSpec holding `model`'s weights (fp32)."""
    import numpy as np
    import torch
    from ctranslate2.specs import common_spec, transformer_spec

    from automoe.model.layers import sinusoid

    arch, args = model.arch, model.args
    check_exportable(arch, args.qkv_dim)
    if len(pieces) != args.vocab_size:
        raise AutomoeError(f"CTranslate2 export: {len(pieces)} vocabulary pieces for a {args.vocab_size}-token model")
    spec = transformer_spec.TransformerSpec.from_config(
        (arch.encoder_layers, arch.decoder_layers),
        arch.encoder_self_heads[0],
        pre_norm=args.pre_norm,
        activation=common_spec.Activation.RELU,
    )
    if arch.decoder_self_heads[0] != arch.encoder_self_heads[0]:
        spec.decoder.num_heads = np.dtype("int16").type(arch.decoder_self_heads[0])

    def t(x: torch.Tensor) -> np.ndarray:
        return x.detach().float().contiguous().numpy().copy()

    def linear(dst, src) -> None:
        dst.weight = t(src.weight)
        if src.bias is not None:
            dst.bias = t(src.bias)

    def fused(dst, *srcs) -> None:
        dst.weight = np.concatenate([t(s.weight) for s in srcs])
        dst.bias = np.concatenate([t(s.bias) for s in srcs])

    def norm(dst, src) -> None:
        dst.gamma, dst.beta = t(src.weight), t(src.bias)

    core = model.core
    d = arch.encoder_embed_dim
    table = t(sinusoid(torch.arange(MAX_POSITIONS), d))  # (positions, d), row p = position p
    embed = t(core.embed.weight[:, :d])
    for stack in (spec.encoder, spec.decoder):
        (stack.embeddings[0] if isinstance(stack.embeddings, list) else stack.embeddings).weight = embed
        stack.position_encodings.encodings = table
        stack.scale_embeddings = True
    spec.decoder.projection.weight = embed  # tied output projection, no bias

    for dst, layer in zip(spec.encoder.layer, core.encoder, strict=True):
        a = layer.self_attn
        fused(dst.self_attention.linear[0], a.q_proj, a.k_proj, a.v_proj)
        linear(dst.self_attention.linear[1], a.out_proj)
        norm(dst.self_attention.layer_norm, layer.self_attn_norm)
        _ffn(dst.ffn, layer, linear, norm)
    for dst, layer in zip(spec.decoder.layer, core.decoder, strict=True):
        a, c = layer.self_attn, layer.ende_attn
        fused(dst.self_attention.linear[0], a.q_proj, a.k_proj, a.v_proj)
        linear(dst.self_attention.linear[1], a.out_proj)
        norm(dst.self_attention.layer_norm, layer.self_attn_norm)
        linear(dst.attention.linear[0], c.q_proj)
        fused(dst.attention.linear[1], c.k_proj, c.v_proj)
        linear(dst.attention.linear[2], c.out_proj)
        norm(dst.attention.layer_norm, layer.ende_attn_norm)
        _ffn(dst.ffn, layer, linear, norm)

    if args.pre_norm:
        norm(spec.encoder.layer_norm, core.encoder_norm)
        norm(spec.decoder.layer_norm, core.decoder_norm)

    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    spec.config.unk_token = pieces[1]
    spec.config.bos_token = pieces[args.bos_id]
    spec.config.eos_token = pieces[args.eos_id]
    spec.config.decoder_start_token = pieces[args.bos_id]
    spec.config.layer_norm_epsilon = core.encoder[0].self_attn_norm.eps
    return spec


def _ffn(dst, layer, linear, norm) -> None:
    expert = layer.moe.experts[0]
    linear(dst.linear_0, expert.fc1)
    linear(dst.linear_1, expert.fc2)
    norm(dst.layer_norm, layer.ffn_norm)


def export(folder: Path | str, out: Path | str) -> dict[str, Any]:
    """Retrain output folder (model.pt + spm.model) -> CTranslate2 model folder `out`."""
    import ctranslate2.converters
    import sentencepiece as spm

    from automoe.io import staged_dir
    from automoe.model.subnet import SubTransformer

    folder, out = Path(folder), Path(out)
    model_file, spm_file = folder / "model.pt", folder / SPM_FILE
    for f in (model_file, spm_file):
        if not f.is_file():
            raise AutomoeError(f"{folder}: no {f.name} here (expected a retrain output folder)")
    model, vocab = SubTransformer.load(model_file)
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    spec = build_spec(model.eval(), pieces)

    class _Converter(ctranslate2.converters.Converter):
        def _load(self):
            return spec

    meta = {
        "format": "ctranslate2",
        "arch": model.arch.to_dict(),
        "vocab": vocab,
        "source_model_sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(),
        "pad_id": model.args.pad_id,
        "eos_id": model.args.eos_id,
        "bos_id": model.args.bos_id,
    }
    with staged_dir(out) as tmp:
        _Converter().convert(str(tmp / "ct2"), force=True)
        for f in (tmp / "ct2").iterdir():
            f.rename(tmp / f.name)
        (tmp / "ct2").rmdir()
        shutil.copyfile(spm_file, tmp / SPM_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def is_ct2_folder(folder: Path | str) -> bool:
    return (Path(folder) / META_FILE).is_file() and (Path(folder) / "model.bin").is_file()


@dataclass(frozen=True)
class Ct2Decode:
    beam: int = 4
    length_penalty: float = 0.6
    max_len_a: float = 1.2  # max target length = a * source length + b, as our beam search
    max_len_b: int = 10
    max_batch_size: int = 32  # sentences per call: the length limit follows each call's longest source
    max_source_len: int = 256
    compute_type: str = "default"  # CTranslate2's: default (the model's float32), int8, ...


class Ct2Translator:
    """Text in, text out with CTranslate2 (no torch in the process)."""

    def __init__(self, folder: Path | str, decode: Ct2Decode | None = None, threads: int = 0):
        import ctranslate2
        import sentencepiece as spm

        folder = Path(folder)
        if not is_ct2_folder(folder):
            raise AutomoeError(f"{folder}: not a CTranslate2 export (run: automoe export_ct2)")
        self.meta = json.loads((folder / META_FILE).read_text())
        self.decode = decode or Ct2Decode()
        self.sp = spm.SentencePieceProcessor(model_file=str(folder / SPM_FILE))
        self.model = ctranslate2.Translator(
            str(folder), device="cpu", inter_threads=1, intra_threads=threads, compute_type=self.decode.compute_type
        )

    def translate_pieces(self, sources: list[list[str]]) -> list[list[str]]:
        """Source pieces (EOS included) -> best hypothesis pieces, in input order."""
        d = self.decode
        out: list[list[str]] = []
        for start in range(0, len(sources), d.max_batch_size):
            chunk = sources[start : start + d.max_batch_size]
            limit = int(d.max_len_a * max(len(s) for s in chunk) + d.max_len_b)
            results = self.model.translate_batch(
                chunk,
                beam_size=d.beam,
                length_penalty=d.length_penalty,
                max_decoding_length=limit,
                suppress_sequences=[[self.sp.id_to_piece(self.meta.get("bos_id", 2))]],  # as ours: never BOS
            )
            out += [r.hypotheses[0] for r in results]
        return out

    def translate(self, lines: Iterable[str | bytes]) -> list[str]:
        lines, _ = clean_lines(lines)  # invalid UTF-8 -> U+FFFD: every line is translated
        if not lines:
            return []
        eos = self.sp.id_to_piece(self.meta["eos_id"])
        cut = self.decode.max_source_len - 1
        sources = [pieces[:cut] + [eos] for pieces in self.sp.encode(lines, out_type=str)]
        return [self.sp.decode_pieces(h) for h in self.translate_pieces(sources)]


def main(argv: list[str] | None = None) -> int:
    """export_ct2: a dense retrain output folder -> a CTranslate2 model folder (serving option)."""
    from automoe.stages._cli import guarded

    return guarded(_export_cli)(argv)


def _export_cli(argv: list[str] | None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="automoe export_ct2", description=main.__doc__)
    parser.add_argument("--model", required=True, type=Path, help="retrain output folder of a dense model")
    parser.add_argument("--out", required=True, type=Path, help="CTranslate2 model folder to write")
    args = parser.parse_args(argv)
    meta = export(args.model, args.out)
    layers = f"{len(meta['arch']['encoder_ffn'])}+{len(meta['arch']['decoder_ffn'])}"
    print(f"export_ct2: {args.model} -> {args.out} ({layers} layers, CTranslate2 fp32)")

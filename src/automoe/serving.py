"""Text in, text out: a compact SubTransformer with its SentencePiece model.

`Translator.from_folder(path)` loads a retrain output folder (or any folder holding
`model.pt` and `spm.model`); `translate(lines)` runs batched beam search. The MLflow
pyfunc model and `automoe translate` both use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import sentencepiece as spm
import torch

from automoe.data.corpus import EOS, SPM_FILE
from automoe.data.dataset import pad
from automoe.errors import AutomoeError
from automoe.model.decode import beam_search
from automoe.model.inference import PRECISIONS, Precision, device_error, for_inference
from automoe.model.subnet import SubTransformer
from automoe.textio import clean_lines

MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class DecodeConfig:
    beam: int = 4
    length_penalty: float = 0.6
    max_len_a: float = 1.2
    max_len_b: int = 10
    max_tokens: int = 2048  # source tokens per batch (times the beam in the decoder)
    max_source_len: int = 256  # longer inputs are cut (a translation service must not blow up)
    # the serving layout: fp32 (oneDNN-packed on CPU) or int8 on the CPU, fp16 or bf16 on a GPU
    precision: Precision = "fp32"
    device: Literal["cpu", "cuda"] = "cpu"  # where the model decodes

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: expected cpu or cuda")
        reason = device_error(self.precision, self.device)
        if reason:
            raise ValueError(f"precision {self.precision} on {self.device}: {reason}")


class Translator:
    def __init__(
        self,
        model: SubTransformer,
        sp: spm.SentencePieceProcessor,
        decode: DecodeConfig | None = None,
        vocab: dict | None = None,
    ):
        self.decode = decode or DecodeConfig()
        if self.decode.device == "cuda" and not torch.cuda.is_available():
            raise AutomoeError("decode.device: cuda was asked for but no GPU is visible")
        self.device = torch.device(self.decode.device)
        self.model, self.sp = for_inference(model.to(self.device), self.decode.precision), sp  # the serving layout
        self.vocab = dict(vocab or {})  # what the model was trained with (SentencePiece hash, languages)

    @classmethod
    def from_files(cls, model_path: Path | str, spm_path: Path | str, decode: DecodeConfig | None = None) -> Translator:
        model, vocab = SubTransformer.load(model_path)
        spm_path = Path(spm_path)
        if not spm_path.is_file():
            raise AutomoeError(f"{spm_path}: SentencePiece model not found")
        digest = hashlib.sha256(spm_path.read_bytes()).hexdigest()
        if vocab.get("spm_sha256") not in (None, digest):
            raise AutomoeError(f"{spm_path}: not the SentencePiece model {model_path} was trained with")
        return cls(model, spm.SentencePieceProcessor(model_file=str(spm_path)), decode, vocab)

    @classmethod
    def from_folder(cls, folder: Path | str, decode: DecodeConfig | None = None) -> Translator:
        folder = Path(folder)
        if not (folder / MODEL_FILE).is_file():
            raise AutomoeError(f"{folder}: no {MODEL_FILE} here (expected a retrain output folder)")
        return cls.from_files(folder / MODEL_FILE, folder / SPM_FILE, decode)

    def encode(self, lines: list[str]) -> list[np.ndarray]:
        cut = self.decode.max_source_len - 1
        return [np.asarray(ids[:cut] + [EOS], dtype=np.int64) for ids in self.sp.encode(list(lines))]

    @torch.inference_mode()
    def translate_ids(self, sources: list[np.ndarray]) -> list[list[int]]:
        """Token ids in, best hypotheses out, in input order; batches sorted by length."""
        order = np.argsort([len(s) for s in sources], kind="stable")
        out: list[list[int]] = [[] for _ in sources]
        d = self.decode
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(sources[order[end]]) <= d.max_tokens:
                end += 1
            idx = order[start:end]
            hyps = beam_search(
                self.model,
                pad([sources[i] for i in idx]).to(self.device),
                beam=d.beam,
                length_penalty=d.length_penalty,
                max_len_a=d.max_len_a,
                max_len_b=d.max_len_b,
            )
            for i, h in zip(idx, hyps, strict=True):
                out[i] = h.tokens
            start = end
        return out

    def translate(self, lines: Iterable[str | bytes]) -> list[str]:
        lines, _ = clean_lines(lines)  # invalid UTF-8 -> U+FFFD: every line is translated
        if not lines:
            return []
        return [self.sp.decode(ids) for ids in self.translate_ids(self.encode(lines))]

"""Parallel text -> joint SentencePiece -> compact token arrays, in bounded memory.

The pieces prepare_data streams a corpus through: a SentencePiece trainer fed from an
iterator (a sample of the cleaned training text), chunk encoders that run in worker
processes, a vectorised length filter and token files appended chunk by chunk.
"""

from __future__ import annotations

import io
import shutil
from collections import Counter
from collections.abc import Iterable
from itertools import chain
from pathlib import Path

import numpy as np
import sentencepiece as spm

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPM_FILE = "spm.model"


def train_sentencepiece(
    sentences: Iterable[str],
    out_dir: Path,
    vocab_size: int,
    model_type: str,
    num_threads: int = 1,
    extremely_large: bool = False,
) -> Path:
    """One joint model over the sentences given (both sides of the training split, or a
    sample of them); ids 0..3 are pad/unk/bos/eos. The model is a function of the
    sentences, their order and `num_threads` (unigram EM splits its sums by thread)."""
    options = {}
    if extremely_large:  # 64-bit suffix array: past 2^31 characters of input
        options["train_extremely_large_corpus"] = True
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        pad_id=PAD,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        hard_vocab_limit=False,
        num_threads=num_threads,
        minloglevel=2,
        **options,
    )
    path = out_dir / SPM_FILE
    path.write_bytes(model.getvalue())
    return path


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32)


def encode_flat(sp: spm.SentencePieceProcessor, lines: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths): the lines' ids, each followed by EOS, back to back."""
    ids = sp.encode(lines)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(x + [EOS] for x in ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


# --- worker processes: each loads the model once, then encodes chunk after chunk ---
_worker_sp: spm.SentencePieceProcessor | None = None


def init_worker(model_proto: bytes) -> None:
    global _worker_sp
    _worker_sp = spm.SentencePieceProcessor(model_proto=model_proto)


def encode_job(job: tuple[list[str], list[str], str]):
    src, tgt, dtype = job
    assert _worker_sp is not None, "init_worker was not called"
    return encode_flat(_worker_sp, src, np.dtype(dtype)), encode_flat(_worker_sp, tgt, np.dtype(dtype))


def length_mask(
    src_lens: np.ndarray, tgt_lens: np.ndarray, max_len: int, max_ratio: float, drops: Counter
) -> np.ndarray:
    """Pairs within `max_len` tokens per side and a src/tgt length ratio of `max_ratio`."""
    too_long = (src_lens > max_len) | (tgt_lens > max_len)
    unbalanced = ~too_long & (np.maximum(src_lens, tgt_lens) > max_ratio * np.minimum(src_lens, tgt_lens))
    for reason, mask in (("too_long", too_long), ("length_ratio", unbalanced)):
        if mask.any():
            drops[reason] += int(mask.sum())
    return ~(too_long | unbalanced)


class TokenFile:
    """`{split}.{side}.tokens.npy` (every sequence back to back) + `.offsets.npy` (n + 1),
    appended chunk by chunk through a raw scratch file, so memory holds one chunk and
    the lengths (4 bytes a sentence)."""

    def __init__(self, out_dir: Path, scratch: Path, split: str, side: str, dtype: np.dtype):
        self.out_dir, self.name, self.dtype = out_dir, f"{split}.{side}", dtype
        self.raw_path = scratch / f"{self.name}.tokens.raw"
        self._raw = open(self.raw_path, "wb")  # noqa: SIM115 - closed in finish
        self._lengths: list[np.ndarray] = []

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self._raw.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(lengths.astype(np.int32))  # 4 bytes a sentence until the end

    def finish(self) -> int:
        """Write the .npy pair; the number of sequences."""
        self._raw.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        self._lengths = []
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (total,)}
        with open(self.out_dir / f"{self.name}.tokens.npy", "wb") as out, open(self.raw_path, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)  # what np.save writes, then the data as it is
            shutil.copyfileobj(raw, out, 1 << 24)  # plain writes: no mapped pages piling up in memory
        np.save(self.out_dir / f"{self.name}.offsets.npy", offsets)
        self.raw_path.unlink()
        return len(lengths)

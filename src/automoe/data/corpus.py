"""Parallel text -> cleaned pairs -> joint SentencePiece -> compact token arrays."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from automoe.errors import DataError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPM_FILE = "spm.model"


@dataclass(frozen=True)
class Pairs:
    src: list[str]
    tgt: list[str]

    def __len__(self) -> int:
        return len(self.src)


def align(src: list[str], tgt: list[str], src_uri: str, tgt_uri: str) -> Pairs:
    if len(src) != len(tgt):
        raise DataError(f"{src_uri} has {len(src)} lines but {tgt_uri} has {len(tgt)}: misaligned corpus")
    if not src:
        raise DataError(f"{src_uri}: empty corpus")
    return Pairs(src, tgt)


def drop_empty_and_duplicates(pairs: Pairs, dedupe: bool, drops: Counter) -> Pairs:
    src, tgt, seen = [], [], set()
    for s, t in zip(pairs.src, pairs.tgt, strict=True):
        if not s or not t:
            drops["empty"] += 1
            continue
        if dedupe:
            if (s, t) in seen:
                drops["duplicate"] += 1
                continue
            seen.add((s, t))
        src.append(s)
        tgt.append(t)
    return Pairs(src, tgt)


def train_sentencepiece(pairs: Pairs, out_dir: Path, vocab_size: int, model_type: str) -> Path:
    """One joint model over both sides of the training split; ids 0..3 are pad/unk/bos/eos.
    Every sentence is used (no sampling), so the model is a function of the data."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(pairs.src + pairs.tgt),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        pad_id=PAD,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    path = out_dir / SPM_FILE
    path.write_bytes(model.getvalue())
    return path


def encode(sp: spm.SentencePieceProcessor, lines: list[str]) -> list[list[int]]:
    """Token ids of each line followed by EOS."""
    return [ids + [EOS] for ids in sp.encode(lines)]


def filter_lengths(
    src: list[list[int]], tgt: list[list[int]], max_len: int, max_ratio: float, drops: Counter
) -> np.ndarray:
    """Indices of pairs within `max_len` tokens and a src/tgt length ratio of `max_ratio`."""
    keep = []
    for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
        if len(s) > max_len or len(t) > max_len:
            drops["too_long"] += 1
        elif max(len(s), len(t)) > max_ratio * min(len(s), len(t)):
            drops["length_ratio"] += 1
        else:
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def save_tokens(out_dir: Path, split: str, side: str, seqs: list[list[int]], vocab_size: int) -> None:
    """`{split}.{side}.tokens.npy` (all sequences back to back) + `.offsets.npy` (n+1)."""
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((tok for s in seqs for tok in s), dtype=dtype, count=int(offsets[-1]))
    np.save(out_dir / f"{split}.{side}.tokens.npy", flat)
    np.save(out_dir / f"{split}.{side}.offsets.npy", offsets)

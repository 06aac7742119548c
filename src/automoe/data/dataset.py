"""Reading prepared data: memory-mapped token arrays and the token-budget batch sampler."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from automoe.data.corpus import PAD, SPM_FILE
from automoe.errors import DataError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Side:
    tokens: np.ndarray  # (total_tokens,) all sequences back to back
    offsets: np.ndarray  # (n + 1,)

    @cached_property
    def lengths(self) -> np.ndarray:
        """Computed once: at WMT scale np.diff over every offset takes tens of ms."""
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


@dataclass(frozen=True)
class ParallelSplit:
    src: Side
    tgt: Side

    def __len__(self) -> int:
        return len(self.src.offsets) - 1

    def collate(self, indices: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, S) source and (B, T) target id tensors, in the given order."""
        return pad([self.src[i] for i in indices]), pad([self.tgt[i] for i in indices])


def pad(seqs: list[np.ndarray]) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=torch.long)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
    return out


@dataclass(frozen=True)
class PreparedData:
    """A prepare_data output folder: manifest, SentencePiece model, splits."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: Path | str) -> PreparedData:
        root = Path(root)
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except FileNotFoundError:
            raise DataError(f"{root}: not a prepared-data folder ({MANIFEST} missing; run prepare_data)") from None
        except (json.JSONDecodeError, OSError) as exc:
            raise DataError(f"{root / MANIFEST}: unreadable manifest ({exc})") from None
        return cls(root, manifest)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def vocab_info(self) -> dict[str, str | int]:
        """What a model trained on this data must match: the SentencePiece model and languages."""
        return {
            "vocab_size": self.vocab_size,
            "spm_sha256": hashlib.sha256((self.root / SPM_FILE).read_bytes()).hexdigest(),
            "src_lang": self.manifest["src_lang"],
            "tgt_lang": self.manifest["tgt_lang"],
        }

    def check_vocab(self, vocab: dict, what: str) -> None:
        """Raise if `what` (a model or checkpoint) was trained with another vocabulary."""
        mine = self.vocab_info()
        for key in ("spm_sha256", "vocab_size", "src_lang", "tgt_lang"):
            if key in vocab and vocab[key] != mine[key]:
                raise DataError(
                    f"{what}: its vocabulary ({key} {vocab[key]}) differs from the prepared data's "
                    f"({mine[key]}) in {self.root}"
                )

    def sentencepiece(self) -> spm.SentencePieceProcessor:
        return spm.SentencePieceProcessor(model_file=str(self.root / SPM_FILE))

    def split(self, name: str) -> ParallelSplit:
        def side(which: str) -> Side:
            try:
                return Side(
                    np.load(self.root / f"{name}.{which}.tokens.npy", mmap_mode="r"),
                    np.load(self.root / f"{name}.{which}.offsets.npy"),
                )
            except FileNotFoundError as exc:
                raise DataError(f"{self.root}: split {name!r} is missing ({Path(exc.filename).name})") from None

        return ParallelSplit(side("src"), side("tgt"))

    def raw_lines(self, split: str, side: str) -> list[str]:
        """The cleaned raw text of a split (references for BLEU), one line per example."""
        path = self.root / f"{split}.{side}.txt"
        if not path.is_file():
            raise DataError(
                f"{self.root}: split {split!r} has no text (training text is kept only with "
                "prepare_data.keep_train_text=true)"
            )
        return path.read_text(encoding="utf-8").split("\n")[:-1]


def _greedy_cuts(sorted_lens: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the greedy cut of ascending lengths into batches of at most
    `max_tokens` padded tokens: a batch grows while rows x its last (longest) length fits.
    Vectorised per run of equal lengths, so the cost is the number of distinct lengths
    and batches, not a Python step per example."""
    n = len(sorted_lens)
    # runs of equal length: [run_start[r], run_start[r + 1]) all have length run_len[r]
    run_start = np.flatnonzero(np.r_[True, sorted_lens[1:] != sorted_lens[:-1]])
    run_len = sorted_lens[run_start]
    run_end = np.r_[run_start[1:], n]
    starts, ends = [], []
    start, r = 0, 0
    while start < n:
        while run_end[r] <= start:
            r += 1
        # extend over runs while the whole run fits; then take what fits of the next one
        end = start
        while r < len(run_len):
            cap = max_tokens // int(run_len[r])  # rows a batch may hold at this length
            room = start + cap  # the batch may end (exclusive) here at this length
            if room >= run_end[r]:
                end, r = int(run_end[r]), r + 1
                continue
            end = max(end, int(room))
            break
        starts.append(start)
        ends.append(end)
        start = end
        r = min(r, len(run_len) - 1)
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


class TokenBatchSampler:
    """Length-bucketed batches whose padded size (rows x longest side) fits `max_tokens`.

    The plan of an epoch depends only on (seed, epoch): shuffle, stable-sort by length
    (so equal lengths stay shuffled), cut greedily, shuffle the batch order. Every
    example appears exactly once per epoch. `state_dict()` is the position (epoch,
    batch); loading it continues with the very next batch.
    """

    def __init__(self, src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int, seed: int, shuffle=True):
        self.lens = np.maximum(np.asarray(src_lens), np.asarray(tgt_lens)).astype(np.int64)
        if len(self.lens) == 0:
            raise DataError("batch sampler: no examples")
        longest = int(self.lens.max())
        if longest > max_tokens:
            raise DataError(f"batch sampler: max_tokens={max_tokens} is smaller than the longest example ({longest})")
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.epoch, self.position = 0, 0
        self._plan: list[np.ndarray] | None = None

    def plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lens)) if self.shuffle else np.arange(len(self.lens))
        order = order[np.argsort(self.lens[order], kind="stable")]
        batches = [order[a:b] for a, b in zip(*_greedy_cuts(self.lens[order], self.max_tokens), strict=True)]
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[np.ndarray]:
        """Endless stream of batches, epoch after epoch, from the current position."""
        while True:
            if self._plan is None:
                self._plan = self.plan(self.epoch)
            while self.position < len(self._plan):
                batch = self._plan[self.position]
                self.position += 1
                yield batch
            self.epoch, self.position, self._plan = self.epoch + 1, 0, None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "max_tokens": self.max_tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["max_tokens"] != self.max_tokens:
            raise DataError("batch sampler: resume state was made with another seed or max_tokens")
        self.epoch, self.position, self._plan = int(state["epoch"]), int(state["position"]), None

"""Text in, text out: a compact SubTransformer with its SentencePiece model.

`Translator.from_folder(path)` loads a retrain output folder (or any folder holding
`model.pt` and `spm.model`); `translate(lines)` runs batched beam search. The MLflow
pyfunc model and `automoe translate` both use it.

Serving adds two things on top (`automoe.server` and the pyfunc use them):
`Limits` checks a request (lines, characters per line, strings only) before any work, and
`Batcher` decodes requests that arrive together in one batch, on worker threads (one per
core by default, each single-threaded).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
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
        return self.encode_reporting(lines)[0]

    def encode_reporting(self, lines: list[str]) -> tuple[list[np.ndarray], list[int]]:
        """Token ids per line, and the indices of the lines cut to the model's source length."""
        cut = self.decode.max_source_len - 1
        ids = self.sp.encode(list(lines))
        cut_lines = [i for i, x in enumerate(ids) if len(x) > cut]
        return [np.asarray(x[:cut] + [EOS], dtype=np.int64) for x in ids], cut_lines

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
        return self.translate_reporting(lines)[0]

    def translate_reporting(
        self, lines: Iterable[str | bytes], decode_ids: Callable[[list[np.ndarray]], list[list[int]]] | None = None
    ) -> tuple[list[str], list[int]]:
        """Translations, and the indices of the lines cut to the model's source length. A
        blank line translates to an empty line. `decode_ids` (a `Batcher.translate_ids`)
        decodes; by default this translator, in this thread."""
        prepared = self.prepare(lines)
        return self.finish(prepared, (decode_ids or self.translate_ids)(prepared.sources)), prepared.cut

    def prepare(self, lines: Iterable[str | bytes]) -> Prepared:
        """Lines -> what to decode: valid text (invalid UTF-8 -> U+FFFD), blank lines set
        aside, token ids cut to the model's source length."""
        lines, _ = clean_lines(lines)
        keep = [i for i, line in enumerate(lines) if line.strip()]
        sources, cut = self.encode_reporting([lines[i] for i in keep]) if keep else ([], [])
        return Prepared(len(lines), keep, sources, [keep[j] for j in cut])

    def finish(self, prepared: Prepared, hyps: list[list[int]]) -> list[str]:
        out = [""] * prepared.lines
        for i, ids in zip(prepared.keep, hyps, strict=True):
            out[i] = self.sp.decode(ids)
        return out


@dataclass(frozen=True)
class Prepared:
    lines: int  # lines in the request
    keep: list[int]  # the non-blank ones, decoded in this order
    sources: list[np.ndarray]  # their token ids
    cut: list[int]  # lines cut to the model's source length


# -- serving: limits on a request, batching across requests -----------------------------------


class RequestError(AutomoeError):
    """A request the server refuses (HTTP 4xx), its message naming the input and the limit."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_lines: int = 64  # lines per request
    max_chars: int = 1000  # characters per line
    # lines longer than the model's source length (decode.max_source_len tokens): cut and
    # reported per line (True), or the request refused (False)
    truncate: bool = True

    def __post_init__(self) -> None:
        for name in ("max_lines", "max_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_env(cls) -> Limits:
        """AUTOMOE_SERVE_MAX_LINES, AUTOMOE_SERVE_MAX_CHARS, AUTOMOE_SERVE_TRUNCATE (0: refuse long lines)."""
        return cls(
            _env_int("AUTOMOE_SERVE_MAX_LINES", cls.max_lines),
            _env_int("AUTOMOE_SERVE_MAX_CHARS", cls.max_chars),
            os.environ.get("AUTOMOE_SERVE_TRUNCATE", "1") != "0",
        )

    def check(self, lines: object) -> list[str]:
        """The request's lines, or RequestError naming what is wrong: a list of strings, at
        most max_lines of them, none longer than max_chars characters."""
        if isinstance(lines, str | bytes) or not isinstance(lines, Sequence):
            raise RequestError(f"inputs: expected a list of strings, got {type(lines).__name__}")
        if not lines:
            raise RequestError("inputs: an empty list (send at least one line)")
        if len(lines) > self.max_lines:
            raise RequestError(f"inputs: {len(lines)} lines, over the limit of {self.max_lines} per request", 413)
        for i, line in enumerate(lines):
            if not isinstance(line, str):
                raise RequestError(f"inputs[{i}]: expected a string, got {type(line).__name__} {line!r:.40}")
            if len(line) > self.max_chars:
                raise RequestError(f"inputs[{i}]: {len(line)} characters, over the limit of {self.max_chars}", 413)
        return list(lines)


@dataclass(frozen=True)
class BatchConfig:
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_lines: int = 128  # lines decoded together at most (a request is never split)
    # decoding threads, each with its share of the cores (0: one per core on the CPU, one on
    # a GPU): on 2 cores two single-threaded batches at once decode 1.5x the sentences/s of
    # one batch on two threads (small batches leave the second core idle; BENCHMARKS.md 12)
    workers: int = 0

    def __post_init__(self) -> None:
        if self.max_wait_ms < 0 or self.max_lines < 1 or self.workers < 0:
            raise ValueError(f"batching: max_wait_ms >= 0, max_lines >= 1 and workers >= 0, got {self}")

    @classmethod
    def from_env(cls) -> BatchConfig:
        """AUTOMOE_SERVE_BATCH_WAIT_MS, AUTOMOE_SERVE_BATCH_LINES, AUTOMOE_SERVE_WORKERS."""
        try:
            wait = float(os.environ.get("AUTOMOE_SERVE_BATCH_WAIT_MS", cls.max_wait_ms))
        except ValueError:
            raise AutomoeError("AUTOMOE_SERVE_BATCH_WAIT_MS: expected a number of milliseconds") from None
        return cls(
            wait, _env_int("AUTOMOE_SERVE_BATCH_LINES", cls.max_lines), _env_int("AUTOMOE_SERVE_WORKERS", cls.workers)
        )


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise AutomoeError(f"{name}: expected a whole number, got {os.environ[name]!r}") from None


class BatcherClosed(RuntimeError):
    """A request handed to a batcher that is closing (the server then uses its successor)."""


class Batcher:
    """Requests that arrive together are decoded together. Callers (any number of threads)
    hand token ids to `translate_ids` and wait. Worker threads (`workers`, each on its share
    of the cores) take turns collecting a batch: a worker takes what is queued, leaving an
    equal share to each idle worker, waits up to `max_wait_ms` for more while the batch is
    under `max_lines` (only when the previous batch held more than one request: a lone
    client never waits), decodes it with `decode` (sorted by length, in max_tokens batches)
    and hands each caller its share. Under load, requests queue while batches decode and go
    together into the next ones."""

    def __init__(
        self,
        decode: Callable[[list[np.ndarray]], list[list[int]]],
        config: BatchConfig | None = None,
        device: str = "cpu",
    ):
        self.decode, self.config = decode, config or BatchConfig()
        cores = torch.get_num_threads()
        self.workers = self.config.workers or (cores if device == "cpu" else 1)
        self.threads = max(1, cores // self.workers)  # intra-op threads of each worker
        self._queue: queue.SimpleQueue[tuple[list[np.ndarray], Future] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # one worker collects a batch at a time
        self._count_lock = threading.Lock()
        self._closing = threading.Lock()  # no request is queued after the end marker
        self.closed = False
        self.batches = 0  # decoded batches and requests so far (for logs and tests)
        self.requests = 0
        self._last_requests = 0
        self._busy = 0  # workers decoding now
        self._threads = [
            threading.Thread(target=self._loop, name=f"automoe-batcher-{i}", daemon=True) for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, sources: list[np.ndarray]) -> Future:
        """Queue a request; BatcherClosed once `close` has begun (nothing queued is dropped)."""
        future: Future = Future()
        with self._closing:
            if self.closed:
                raise BatcherClosed("this batcher is closed")
            self._queue.put((list(sources), future))
        return future

    def translate_ids(self, sources: list[np.ndarray]) -> list[list[int]]:
        return self.submit(sources).result()

    def close(self) -> None:
        """Stop after what is queued."""
        with self._closing:
            self.closed = True
            self._queue.put(None)  # each worker that meets it puts it back for the next
        for thread in self._threads:
            thread.join(timeout=60)

    def _take(self) -> list[tuple[list[np.ndarray], Future]] | None:
        first = self._queue.get()
        if first is None:
            return None
        taken, lines = [first], len(first[0])
        # wait for company only when the last batch had some: a lone client is not slowed
        wait = self.config.max_wait_ms / 1000 if self._last_requests > 1 else 0.0
        deadline = time.monotonic() + wait
        idle = self.workers - self._busy  # this worker included
        while lines < self.config.max_lines:
            if len(taken) >= -(-(len(taken) + self._queue.qsize()) // idle):  # the rest is for the idle workers
                break
            try:
                item = self._queue.get_nowait()  # already queued: no wait
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:  # closing: finish this batch, then stop
                self._queue.put(None)
                break
            taken.append(item)
            lines += len(item[0])
        return taken

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's share of the cores (OpenMP: per thread)
        while True:
            with self._lock:
                taken = self._take()
            if taken is None:
                self._queue.put(None)
                return
            with self._count_lock:
                self._busy += 1
            sources = [s for part, _ in taken for s in part]
            try:
                hyps = self.decode(sources) if sources else []
            except BaseException as exc:  # every caller of the batch hears of it
                for _, future in taken:
                    future.set_exception(exc)
                continue
            finally:
                with self._count_lock:
                    self._busy -= 1
            start = 0
            for part, future in taken:
                future.set_result(hyps[start : start + len(part)])
                start += len(part)
            with self._count_lock:
                self.batches += 1
                self.requests += len(taken)
                self._last_requests = len(taken)

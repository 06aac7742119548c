"""prepare_data: raw parallel corpus -> cleaned text, joint SentencePiece, token arrays.

Streams: every source is read line by line (S3 through a temporary download, HTTP as a
stream), the cleaned training pairs go to scratch files, SentencePiece learns from a
seeded sample of them, and worker processes encode chunk after chunk straight into the
token files. Memory is bounded by the chunk, the sample and 8-16 bytes a pair.

Output folder (built in a temp sibling and renamed at the end, so a failed or killed
run leaves no partial output):

    manifest.json                 sources, file hashes, counts, drops per reason, vocab, sample, timings
    spm.model                     joint SentencePiece model (pad=0 unk=1 bos=2 eos=3)
    {valid,test}.{src,tgt}.txt    cleaned raw text (test references for sacreBLEU)
    train.{src,tgt}.txt           only with keep_train_text (no later stage reads it)
    {split}.{src,tgt}.tokens.npy  token ids of all sentences back to back (EOS-terminated)
    {split}.{src,tgt}.offsets.npy sentence boundaries, n + 1 entries
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from automoe.config import load_section, to_dict
from automoe.data import corpus, sources
from automoe.data.dataset import MANIFEST
from automoe.errors import ConfigError, DataError
from automoe.io import atomic_write_json, staged_dir
from automoe.redact import redact, redact_all
from automoe.stages._cli import cli_run, component_run, guarded, stage_parser

NAME = "prepare_data"
SPLITS = ("train", "valid", "test")
CHUNK_PAIRS = 20_000  # pairs a worker encodes at a time


@dataclass(frozen=True)
class SplitPaths:
    """Per-split sources: one file template or a list of them (read in order, e.g. the
    several corpora of a WMT training set); `{lang}` is replaced by the language code.
    Each may be a local path (plain or .gz), s3://bucket/key or an http(s) URL."""

    train: str | tuple[str, ...] = ""
    valid: str | tuple[str, ...] = ""
    test: str | tuple[str, ...] = ""


@dataclass(frozen=True)
class PrepareDataConfig:
    source: Literal["multi30k", "paths"] = "multi30k"
    mirror: str = "auto"  # multi30k: a local folder, "auto" (../shared/data/multi30k if present) or "none"
    paths: SplitPaths = field(default_factory=SplitPaths)
    src_lang: str = "en"
    tgt_lang: str = "de"
    max_train_pairs: int = 0  # 0 = all; a prefix for quick runs
    max_len: int = 128  # tokens per side, EOS included
    max_len_ratio: float = 3.0
    dedupe: bool = False
    vocab_size: int = 8000
    spm_model_type: Literal["unigram", "bpe"] = "unigram"
    spm_input_sentence_size: int = 500_000  # sentences SentencePiece learns from (a seeded sample); 0 = all
    spm_num_threads: int = 1  # the model depends on it: a fixed count keeps the output the same on every machine
    seed: int = 0  # the SentencePiece sample
    num_workers: int = 0  # encoding processes; 0 = the CPU cores this process may use
    keep_train_text: bool = False

    def __post_init__(self) -> None:
        for name in ("max_len", "vocab_size"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name} must be at least 8, got {getattr(self, name)}")
        for name in ("max_train_pairs", "spm_input_sentence_size", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.spm_num_threads < 1:
            raise ValueError(f"spm_num_threads must be at least 1, got {self.spm_num_threads}")
        if self.max_len_ratio < 1.0:
            raise ValueError(f"max_len_ratio must be >= 1, got {self.max_len_ratio}")
        if self.src_lang == self.tgt_lang:
            raise ValueError(f"src_lang and tgt_lang are both {self.src_lang!r}")


def resolve_uris(cfg: PrepareDataConfig) -> dict[str, list[tuple[str, str]]]:
    """split -> [(src uri, tgt uri), ...] in reading order."""
    if cfg.source == "multi30k":
        if cfg.mirror == "auto":
            mirror = sources.default_mirror()
        elif cfg.mirror == "none":
            mirror = None
        else:
            mirror = Path(cfg.mirror)
            if not mirror.is_dir():
                raise DataError(f"prepare_data.mirror: {cfg.mirror}: folder not found")
        return {
            s: [(sources.multi30k_uri(s, cfg.src_lang, mirror), sources.multi30k_uri(s, cfg.tgt_lang, mirror))]
            for s in SPLITS
        }
    uris = {}
    for split in SPLITS:
        given = getattr(cfg.paths, split)
        templates = [given] if isinstance(given, str) else list(given)
        if not templates or not all(templates):
            raise ConfigError(f"prepare_data.paths.{split}: expected a path template containing {{lang}} (or a list)")
        for template in templates:
            if "{lang}" not in template:
                raise ConfigError(f"prepare_data.paths.{split}: {redact(template)}: the template has no {{lang}}")
        uris[split] = [(t.format(lang=cfg.src_lang), t.format(lang=cfg.tgt_lang)) for t in templates]
    return uris


def read_pairs(cfg: PrepareDataConfig, src_uri: str, tgt_uri: str, files: dict[str, str], limit: int = 0):
    """Aligned (src, tgt) lines of one file pair, streamed; at the end the line counts are
    compared and the files' hashes recorded (and checked, for Multi30k)."""
    n, misaligned = 0, False
    with sources.open_lines(src_uri) as src, sources.open_lines(tgt_uri) as tgt:
        for s, t in zip_longest(src, tgt):
            if s is None or t is None:
                misaligned = True  # read on, to name both counts
                continue
            if limit and n >= limit:
                break
            n += 1
            yield s, t
    if misaligned:
        raise DataError(f"{src_uri} has {src.lines_read} lines but {tgt_uri} has {tgt.lines_read}: misaligned corpus")
    if n == 0:
        raise DataError(f"{src_uri}: empty corpus")
    for reader in (src, tgt):
        if cfg.source == "multi30k":
            sources.verify_multi30k(reader.uri, reader.sha256)
        files[reader.uri] = reader.sha256


@dataclass
class Gathered:
    """The cleaned training pairs in scratch files (one line each, in corpus order)."""

    raw: int  # pairs read
    lines: int  # pairs written to scratch
    keep: np.ndarray | None  # first occurrences (dedupe) or None for all
    chars: int  # characters of both sides

    @property
    def pairs(self) -> int:
        return self.lines if self.keep is None else int(self.keep.sum())


def gather_train(cfg, uris, files, scratch: Path, drops: Counter, progress) -> Gathered:
    """Read every training file pair; drop empty pairs (and repeats, by 64-bit hash)."""
    raw = lines = chars = 0
    hashes = array("Q")
    with open(scratch / "train.src", "wb") as out_src, open(scratch / "train.tgt", "wb") as out_tgt:
        for src_uri, tgt_uri in uris:
            left = cfg.max_train_pairs - raw if cfg.max_train_pairs else 0
            if cfg.max_train_pairs and left <= 0:
                break
            for s, t in read_pairs(cfg, src_uri, tgt_uri, files, limit=left):
                raw += 1
                if raw % 10_000 == 0:
                    progress.update(10_000)
                if not s or not t:
                    drops["empty"] += 1
                    continue
                sb, tb = s.encode(), t.encode()
                if cfg.dedupe:
                    hashes.append(int.from_bytes(hashlib.blake2b(sb + b"\n" + tb, digest_size=8).digest(), "little"))
                out_src.write(sb + b"\n")
                out_tgt.write(tb + b"\n")
                lines += 1
                chars += len(s) + len(t)
    keep = None
    if cfg.dedupe:
        _, first = np.unique(np.frombuffer(hashes, dtype=np.uint64), return_index=True)
        if len(first) < lines:
            drops["duplicate"] += lines - len(first)
        keep = np.zeros(lines, dtype=bool)
        keep[first] = True
    return Gathered(raw, lines, keep, chars)


def scratch_pairs(scratch: Path, keep: np.ndarray | None) -> Iterator[tuple[str, str]]:
    with open(scratch / "train.src", "rb") as src, open(scratch / "train.tgt", "rb") as tgt:
        for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
            if keep is None or keep[i]:
                yield s[:-1].decode(), t[:-1].decode()


def spm_sentences(scratch: Path, keep: np.ndarray | None, chosen: np.ndarray | None) -> Iterator[str]:
    """Every source sentence, then every target one (the order the model depends on),
    or the `chosen` ones of those."""
    index = 0
    for side in ("src", "tgt"):
        with open(scratch / f"train.{side}", "rb") as lines:
            for i, line in enumerate(lines):
                if keep is not None and not keep[i]:
                    continue
                if chosen is None or chosen[index]:
                    yield line[:-1].decode()
                index += 1


def sentencepiece_sample(cfg: PrepareDataConfig, gathered: Gathered) -> tuple[np.ndarray | None, dict[str, Any]]:
    """A seeded uniform sample of the training sentences (both sides), or None for all."""
    total = 2 * gathered.pairs
    size = cfg.spm_input_sentence_size
    chosen = None
    if size and size < total:
        chosen = np.zeros(total, dtype=bool)
        chosen[np.random.default_rng(cfg.seed).choice(total, size=size, replace=False)] = True
    used = total if chosen is None else size
    chars = gathered.chars * used // max(total, 1)
    info = {
        "sentences": used,
        "of": total,
        "seed": cfg.seed,
        "num_threads": cfg.spm_num_threads,
        "extremely_large_corpus": chars > 2**30,  # SentencePiece's 32-bit suffix array ends at 2^31 characters
    }
    return chosen, info


def workers(cfg: PrepareDataConfig) -> int:
    if cfg.num_workers:
        return cfg.num_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def chunks(pairs: Iterator[tuple[str, str]], size: int) -> Iterator[tuple[list[str], list[str]]]:
    src, tgt = [], []
    for s, t in pairs:
        src.append(s)
        tgt.append(t)
        if len(src) == size:
            yield src, tgt
            src, tgt = [], []
    if src:
        yield src, tgt


class Encoder:
    """Encodes chunks in worker processes (in order, a few chunks in flight) or in this one."""

    def __init__(self, model_file: Path, processes: int, dtype: np.dtype):
        self.dtype = dtype
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.pool = None
        if processes > 1:
            context = multiprocessing.get_context("spawn")
            try:
                self.pool = context.Pool(processes, corpus.init_worker, (model_file.read_bytes(),))
            except OSError as exc:  # no /dev/shm for the pool's semaphores, process limits
                print(f"note: encoding in this process only ({exc.strerror or exc})", file=sys.stderr)
                processes = 1
        self.processes, self.depth = processes, 2 * processes

    def map(self, jobs: Iterator[tuple[list[str], list[str]]]):
        """(job, ((src tokens, src lengths), (tgt tokens, tgt lengths))) in job order."""
        if self.pool is None:
            for src, tgt in jobs:
                encoded = corpus.encode_flat(self.sp, src, self.dtype), corpus.encode_flat(self.sp, tgt, self.dtype)
                yield (src, tgt), encoded
            return
        pending: deque = deque()
        for src, tgt in jobs:
            pending.append(((src, tgt), self.pool.apply_async(corpus.encode_job, ((src, tgt, self.dtype.str),))))
            if len(pending) >= self.depth:
                job, result = pending.popleft()
                yield job, result.get()
        while pending:
            job, result = pending.popleft()
            yield job, result.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def encode_split(
    cfg: PrepareDataConfig,
    split: str,
    pairs: Iterator[tuple[str, str]],
    encoder: Encoder,
    out: Path,
    scratch: Path,
    drops: Counter | None,
    progress: Callable[[int], Any],
) -> int:
    """Encode `pairs` into the split's token files (and text, unless training text is not
    kept); with `drops`, pairs too long or unbalanced are left out and counted."""
    files = {side: corpus.TokenFile(out, scratch, split, side, encoder.dtype) for side in ("src", "tgt")}
    write_text = split != "train" or cfg.keep_train_text
    texts = {side: open(out / f"{split}.{side}.txt", "wb") for side in ("src", "tgt")} if write_text else {}
    try:
        for (src, tgt), ((src_tok, src_len), (tgt_tok, tgt_len)) in encoder.map(chunks(pairs, CHUNK_PAIRS)):
            if drops is not None:
                mask = corpus.length_mask(src_len, tgt_len, cfg.max_len, cfg.max_len_ratio, drops)
                if not mask.all():
                    src_tok, tgt_tok = src_tok[np.repeat(mask, src_len)], tgt_tok[np.repeat(mask, tgt_len)]
                    src_len, tgt_len = src_len[mask], tgt_len[mask]
                    src = [line for line, k in zip(src, mask, strict=True) if k]
                    tgt = [line for line, k in zip(tgt, mask, strict=True) if k]
            files["src"].append(src_tok, src_len)
            files["tgt"].append(tgt_tok, tgt_len)
            for side, lines in (("src", src), ("tgt", tgt)):
                if side in texts:
                    texts[side].write("".join(line + "\n" for line in lines).encode())
            progress(len(mask) if drops is not None else len(src))
    finally:
        for handle in texts.values():
            handle.close()
    kept = files["src"].finish()
    files["tgt"].finish()
    return kept


def run(cfg: PrepareDataConfig, inputs: None, out_dir: Path) -> dict[str, float]:
    """Read, clean, learn SentencePiece, encode; write `out_dir` atomically."""
    t0 = time.perf_counter()
    uris = resolve_uris(cfg)
    for split in SPLITS:  # a missing local file fails now, not after hours on the others
        for pair in uris[split]:
            for uri in pair:
                sources.check_readable(uri)
    files: dict[str, str] = {}
    drops: Counter = Counter()
    counts: dict[str, dict[str, int]] = {}
    with staged_dir(out_dir) as tmp:
        scratch = tmp / ".scratch"
        scratch.mkdir()
        with tqdm(desc="prepare_data: read", unit=" pairs", mininterval=5, disable=None) as bar:
            gathered = gather_train(cfg, uris["train"], files, scratch, drops, bar)
        if gathered.pairs == 0:
            raise DataError(f"{uris['train'][0][0]}: empty corpus (no training pairs left after cleaning)")
        t_read = time.perf_counter()

        chosen, sample = sentencepiece_sample(cfg, gathered)
        corpus.train_sentencepiece(
            spm_sentences(scratch, gathered.keep, chosen),
            tmp,
            cfg.vocab_size,
            cfg.spm_model_type,
            cfg.spm_num_threads,
            sample["extremely_large_corpus"],
        )
        del chosen
        vocab_size = spm.SentencePieceProcessor(model_file=str(tmp / corpus.SPM_FILE)).get_piece_size()
        t_spm = time.perf_counter()

        encoder = Encoder(tmp / corpus.SPM_FILE, workers(cfg), corpus.token_dtype(vocab_size))
        try:
            train = scratch_pairs(scratch, gathered.keep)
            bar = tqdm(total=gathered.pairs, desc="prepare_data: encode", unit=" pairs", mininterval=5, disable=None)
            with bar:
                kept = encode_split(cfg, "train", train, encoder, tmp, scratch, drops, bar.update)
            if kept == 0:
                raise DataError(f"{uris['train'][0][0]}: empty corpus (every pair is too long or unbalanced)")
            counts["train"] = {"raw": gathered.raw, "kept": kept}
            for split in ("valid", "test"):
                n = 0
                for src_uri, tgt_uri in uris[split]:
                    pairs = read_pairs(cfg, src_uri, tgt_uri, files)
                    n += encode_split(cfg, split, pairs, encoder, tmp, scratch, None, lambda _: None)
                counts[split] = {"raw": n, "kept": n}
        finally:
            encoder.close()
        shutil.rmtree(scratch)
        t_end = time.perf_counter()
        manifest = {
            "stage": NAME,
            "source": cfg.source,
            "src_lang": cfg.src_lang,
            "tgt_lang": cfg.tgt_lang,
            "files": {uri: {"sha256": digest} for uri, digest in sorted(files.items())},
            "counts": counts,
            "drops": dict(sorted(drops.items())),
            "vocab_size": vocab_size,
            "special_ids": {"pad": corpus.PAD, "unk": corpus.UNK, "bos": corpus.BOS, "eos": corpus.EOS},
            "sentencepiece_sample": sample,
            "train_text": cfg.keep_train_text,
            "encode_workers": encoder.processes,
            "config": to_dict(cfg),
            "timings_s": {
                "read": round(t_read - t0, 3),
                "sentencepiece": round(t_spm - t_read, 3),
                "encode": round(t_end - t_spm, 3),
                "total": round(t_end - t0, 3),
            },
        }
        manifest = redact_all(manifest)  # URLs without their credentials (user:password@, signed queries)
        manifest["data_sha256"] = _folder_digest(tmp)
        atomic_write_json(tmp / MANIFEST, manifest)
    return {
        "train_pairs": counts["train"]["kept"],
        "valid_pairs": counts["valid"]["kept"],
        "test_pairs": counts["test"]["kept"],
        "dropped_pairs": sum(drops.values()),
        "vocab_size": vocab_size,
        "seconds": round(t_end - t0, 3),
    }


def _folder_digest(folder: Path) -> str:
    """One hash of every output file (names and bytes): identifies the prepared data."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as f:
            digest.update(path.name.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def load_config(params: Any, overrides: Any = None) -> PrepareDataConfig:
    return load_section(PrepareDataConfig, NAME, params, overrides)


@guarded
def main(argv: list[str] | None = None) -> None:
    """automoe prepare_data --out data/prepared [--params params.yaml] [--set prepare_data.KEY=VALUE]"""
    args = stage_parser(NAME, __doc__.splitlines()[0]).parse_args(argv)
    cli_run(NAME, load_config, args, lambda cfg, _: run(cfg, None, args.out), [MANIFEST])


def component_main(params: str, overrides: list, out_path: str, metrics: Any) -> None:
    component_run(
        NAME,
        load_config,
        params,
        overrides,
        out_path,
        lambda cfg, _: run(cfg, None, Path(out_path)),
        [MANIFEST],
        metrics,
    )

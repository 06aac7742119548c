"""prepare_data: raw parallel corpus -> cleaned text, joint SentencePiece, token arrays.

Output folder (built in a temp sibling and renamed at the end, so a failed or killed
run leaves no partial output):

    manifest.json                 source, file hashes, counts, drops per reason, vocab, timings
    spm.model                     joint SentencePiece model (pad=0 unk=1 bos=2 eos=3)
    {split}.{src,tgt}.txt         cleaned raw text (test references for sacreBLEU)
    {split}.{src,tgt}.tokens.npy  token ids of all sentences back to back (EOS-terminated)
    {split}.{src,tgt}.offsets.npy sentence boundaries, n + 1 entries
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sentencepiece as spm

from automoe.config import load_section, to_dict
from automoe.data import corpus, sources
from automoe.data.dataset import MANIFEST
from automoe.errors import ConfigError, DataError
from automoe.io import atomic_write_json, staged_dir
from automoe.redact import redact_all
from automoe.stages._cli import cli_run, component_run, guarded, stage_parser

NAME = "prepare_data"
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SplitPaths:
    """Per-split file templates; `{lang}` is replaced by the language code.
    Each may be a local path (plain or .gz), s3://bucket/key or an http(s) URL."""

    train: str = ""
    valid: str = ""
    test: str = ""


@dataclass(frozen=True)
class PrepareDataConfig:
    source: Literal["multi30k", "paths"] = "multi30k"
    mirror: str = "auto"  # multi30k: a local folder, "auto" (../shared/data/multi30k if present) or "none"
    paths: SplitPaths = field(default_factory=SplitPaths)
    src_lang: str = "en"
    tgt_lang: str = "de"
    max_train_pairs: int = 0  # 0 = all; a prefix slice for quick runs
    max_len: int = 128  # tokens per side, EOS included
    max_len_ratio: float = 3.0
    dedupe: bool = False
    vocab_size: int = 8000
    spm_model_type: Literal["unigram", "bpe"] = "unigram"

    def __post_init__(self) -> None:
        for name in ("max_len", "vocab_size"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name} must be at least 8, got {getattr(self, name)}")
        if self.max_train_pairs < 0:
            raise ValueError(f"max_train_pairs must be >= 0, got {self.max_train_pairs}")
        if self.max_len_ratio < 1.0:
            raise ValueError(f"max_len_ratio must be >= 1, got {self.max_len_ratio}")
        if self.src_lang == self.tgt_lang:
            raise ValueError(f"src_lang and tgt_lang are both {self.src_lang!r}")


def resolve_uris(cfg: PrepareDataConfig) -> dict[str, tuple[str, str]]:
    """split -> (src uri, tgt uri)."""
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
            s: (sources.multi30k_uri(s, cfg.src_lang, mirror), sources.multi30k_uri(s, cfg.tgt_lang, mirror))
            for s in SPLITS
        }
    uris = {}
    for split in SPLITS:
        template = getattr(cfg.paths, split)
        if not template or "{lang}" not in template:
            raise ConfigError(f"prepare_data.paths.{split}: expected a path template containing {{lang}}")
        uris[split] = (template.format(lang=cfg.src_lang), template.format(lang=cfg.tgt_lang))
    return uris


def read_split(cfg: PrepareDataConfig, src_uri: str, tgt_uri: str, files: dict[str, str]) -> corpus.Pairs:
    sides = []
    for uri in (src_uri, tgt_uri):
        blob = sources.fetch(uri)
        if cfg.source == "multi30k":
            sources.verify_multi30k(blob)
        files[uri] = blob.sha256
        sides.append(sources.decode_lines(blob))
    return corpus.align(sides[0], sides[1], src_uri, tgt_uri)


def run(cfg: PrepareDataConfig, inputs: None, out_dir: Path) -> dict[str, float]:
    """Read, clean, learn SentencePiece, encode; write `out_dir` atomically."""
    t0 = time.perf_counter()
    uris = resolve_uris(cfg)
    files: dict[str, str] = {}
    raw = {split: read_split(cfg, *uris[split], files) for split in SPLITS}
    if cfg.max_train_pairs:
        raw["train"] = corpus.Pairs(raw["train"].src[: cfg.max_train_pairs], raw["train"].tgt[: cfg.max_train_pairs])
    t_read = time.perf_counter()

    drops: Counter = Counter()
    # Only training pairs are cleaned; valid/test keep every line so scores stay comparable.
    train = corpus.drop_empty_and_duplicates(raw["train"], cfg.dedupe, drops)
    if not train:
        raise DataError(f"{uris['train'][0]}: empty corpus (no training pairs left after cleaning)")
    counts: dict[str, dict[str, int]] = {}
    with staged_dir(out_dir) as tmp:
        corpus.train_sentencepiece(train, tmp, cfg.vocab_size, cfg.spm_model_type)
        sp = spm.SentencePieceProcessor(model_file=str(tmp / corpus.SPM_FILE))
        t_spm = time.perf_counter()
        for split in SPLITS:
            pairs = train if split == "train" else raw[split]
            src_ids, tgt_ids = corpus.encode(sp, pairs.src), corpus.encode(sp, pairs.tgt)
            if split == "train":
                keep = corpus.filter_lengths(src_ids, tgt_ids, cfg.max_len, cfg.max_len_ratio, drops)
                if len(keep) == 0:
                    raise DataError(f"{uris['train'][0]}: empty corpus (every pair is too long or unbalanced)")
            else:
                keep = np.arange(len(pairs))
            for side, lines, ids in (("src", pairs.src, src_ids), ("tgt", pairs.tgt, tgt_ids)):
                (tmp / f"{split}.{side}.txt").write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
                corpus.save_tokens(tmp, split, side, [ids[i] for i in keep], sp.get_piece_size())
            counts[split] = {"raw": len(raw[split]), "kept": len(keep)}
        t_end = time.perf_counter()
        manifest = {
            "stage": NAME,
            "source": cfg.source,
            "src_lang": cfg.src_lang,
            "tgt_lang": cfg.tgt_lang,
            "files": {uri: {"sha256": digest} for uri, digest in sorted(files.items())},
            "counts": counts,
            "drops": dict(sorted(drops.items())),
            "vocab_size": sp.get_piece_size(),
            "special_ids": {"pad": corpus.PAD, "unk": corpus.UNK, "bos": corpus.BOS, "eos": corpus.EOS},
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
        "vocab_size": sp.get_piece_size(),
        "seconds": round(t_end - t0, 3),
    }


def _folder_digest(folder: Path) -> str:
    """One hash of every output file (names and bytes): identifies the prepared data."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
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

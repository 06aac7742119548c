"""WMT scale: prepare_data's wall time, peak memory and SentencePiece share per corpus size;
supernet training's target tokens per update and tokens/s, 1 worker x 2 threads against
2 workers x 1 thread (torchrun, gloo).

A synthetic corpus made from Multi30k: pair k joins two Multi30k pairs (i, j), every
(i, j) distinct, so lines are WMT-length (about 25 words) and no pair repeats. Each size
runs `automoe prepare_data` as its own process tree (the encoding workers included) and
samples the tree's summed RSS every 0.2 s.

    python bench/scale.py [--pairs 300000,1000000,4500000] [--updates 40] [--work DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"


def read(name: str) -> list[str]:
    with gzip.open(MULTI30K / name, "rt", encoding="utf-8") as f:
        return [line.strip() for line in f]


def synthesize(folder: Path, pairs: int) -> None:
    """train.{en,de} with `pairs` distinct joined pairs; valid/test from Multi30k."""
    src, tgt = read("train.en.gz"), read("train.de.gz")
    n = len(src)
    perm = np.random.default_rng(0).permutation(n)
    k = np.arange(pairs, dtype=np.int64)
    i, q = k % n, k // n  # pair k joins i with j = i + q + 1 (mod n): distinct while q < n - 1
    j = (i + q + 1) % n
    i, j = perm[i], perm[j]
    for lang, side in (("en", src), ("de", tgt)):
        with open(folder / f"train.{lang}", "w", encoding="utf-8") as out:
            for start in range(0, pairs, 100_000):
                part = zip(i[start : start + 100_000], j[start : start + 100_000], strict=True)
                out.write("".join(f"{side[a]} {side[b]}\n" for a, b in part))
        for split, name in (("valid", "val"), ("test", "test_2016_flickr")):
            (folder / f"{split}.{lang}").write_text("\n".join(read(f"{name}.{lang}.gz")) + "\n", encoding="utf-8")


def peak_tree_rss(proc: psutil.Process, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        try:
            total = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak[0] = max(peak[0], total)
        except psutil.Error:
            pass
        time.sleep(0.2)


def run_point(work: Path, pairs: int, vocab: int) -> dict:
    corpus = work / f"corpus-{pairs}"
    if not (corpus / "train.de").exists():
        corpus.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        synthesize(corpus, pairs)
        print(f"  corpus of {pairs:,} pairs written in {time.perf_counter() - t0:.0f} s", flush=True)
    params = work / f"params-{pairs}.yaml"
    section = {
        "source": "paths",
        "paths": {s: f"{corpus}/{s}.{{lang}}" for s in ("train", "valid", "test")},
        "vocab_size": vocab,
    }
    params.write_text(yaml.safe_dump({"prepare_data": section}))
    out = work / f"prepared-{pairs}"
    cmd = [str(Path(sys.executable).parent / "automoe"), "prepare_data", "--out", str(out), "--params", str(params)]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db")
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_tree_rss, args=(proc, stop, peak), daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare_data failed at {pairs:,} pairs: {err.strip().splitlines()[-1]}")
    manifest = json.loads((out / "manifest.json").read_text())
    timings = manifest["timings_s"]
    tokens = sum(os.path.getsize(out / f"train.{s}.tokens.npy") for s in ("src", "tgt")) // 2
    return {
        "pairs": pairs,
        "kept": manifest["counts"]["train"]["kept"],
        "tokens": tokens,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak[0] / 2**20),
        "read_s": timings["read"],
        "sentencepiece_s": timings["sentencepiece"],
        "encode_s": timings["encode"],
        "spm_sentences": manifest["sentencepiece_sample"]["sentences"],
        "workers": manifest["encode_workers"],
    }


def train_point(work: Path, data: Path, workers: int, updates: int) -> dict:
    """train_supernet on the defaults (params.yaml) for `updates` updates; validation once."""
    out = work / f"supernet-{workers}w"
    shutil.rmtree(out, ignore_errors=True)  # a finished run's checkpoints would make this one resume at its end
    threads = 2 // workers
    sets = {
        "max_updates": updates,
        "warmup_updates": 5,
        "valid_interval": 10 * updates,
        "valid_max_sentences": 50,
        "log_interval": updates,
        "threads": threads,
    }
    args = ["train_supernet", "--data", str(data), "--out", str(out)]
    for key, value in sets.items():
        args += ["--set", f"train_supernet.train.{key}={value}"]
    bin_dir = Path(sys.executable).parent
    if workers == 1:
        cmd = [str(bin_dir / "automoe"), *args]
    else:
        cmd = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", str(workers), "-m", "automoe.cli", *args]
    env = dict(os.environ, AUTOMOE_TRACKING="0", OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train_supernet with {workers} workers failed: {proc.stderr.strip().splitlines()[-1]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "workers": workers,
        "threads": threads,
        "tokens_per_update": metrics["target_tokens_seen"] / metrics["updates"],
        "micro_batches_per_update": metrics["micro_batches_per_update"],
        "tokens_per_s": metrics["train_tokens_per_s"],
    }


def _read_checkpoint(path: str, mmap: bool, ready, done) -> None:
    import torch

    from automoe.train import checkpoint

    payload = checkpoint.read(Path(path)) if mmap else torch.load(path, map_location="cpu", weights_only=True)
    sum(float(t.float().sum()) for t in payload["model"].values())  # touch every weight, as load_state_dict does
    ready.set()
    done.wait()


def resume_point(path: Path) -> dict:
    """Two processes on one node read the same checkpoint: memory they hold of their own
    (USS) and in all (RSS), memory-mapped (the trainer's way) against a plain torch.load."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    result = {"checkpoint_mb": round(path.stat().st_size / 2**20)}
    for mmap in (True, False):
        done = context.Event()
        readies = [context.Event() for _ in range(2)]
        procs = [context.Process(target=_read_checkpoint, args=(str(path), mmap, r, done)) for r in readies]
        base = []
        for proc in procs:
            proc.start()
        for proc, ready in zip(procs, readies, strict=True):
            ready.wait(600)
            info = psutil.Process(proc.pid).memory_full_info()
            base.append((info.uss, info.rss))
        done.set()
        for proc in procs:
            proc.join()
        key = "mmap" if mmap else "plain"
        result[f"{key}_uss_mb"] = round(sum(u for u, _ in base) / 2**20)
        result[f"{key}_rss_mb"] = round(sum(r for _, r in base) / 2**20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="300000,1000000,4500000")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--updates", type=int, default=40, help="supernet updates per training point (0: none)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="automoe-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"prepare_data scale benchmark in {work} ({os.cpu_count()} CPUs)")
    for pairs in (int(p) for p in args.pairs.split(",")):
        row = run_point(work, pairs, args.vocab)
        rows.append(row)
        print(
            f"  {pairs:>10,} pairs: {row['wall_s']:7.1f} s, peak RSS {row['peak_rss_mb']:6,} MB "
            f"(read {row['read_s']:.0f} s, SentencePiece {row['sentencepiece_s']:.0f} s on "
            f"{row['spm_sentences']:,} sentences, encode {row['encode_s']:.0f} s, {row['workers']} workers)",
            flush=True,
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(
            f"scale: {last['pairs'] / first['pairs']:.1f}x the pairs -> "
            f"{last['wall_s'] / first['wall_s']:.2f}x the time, "
            f"{last['peak_rss_mb'] / first['peak_rss_mb']:.2f}x the peak memory"
        )
    training = []
    if args.updates:
        data = work / f"prepared-{rows[0]['pairs']}"
        for workers in (1, 2):
            point = train_point(work, data, workers, args.updates)
            training.append(point)
            print(
                f"  train_supernet {workers} worker(s) x {point['threads']} thread(s): "
                f"{point['tokens_per_update']:,.0f} target tokens per update "
                f"({point['micro_batches_per_update']:.0f} micro-batches), {point['tokens_per_s']:,.0f} tokens/s",
                flush=True,
            )
        one, two = training
        print(
            f"training: 2 workers put {two['tokens_per_update'] / one['tokens_per_update']:.2f}x the tokens of 1 "
            f"into an update, at {two['tokens_per_s'] / one['tokens_per_s']:.2f}x the tokens/s on the same 2 cores"
        )
    resume = {}
    if args.updates:
        resume = resume_point(work / "supernet-2w" / "checkpoints" / "checkpoint_best.pt")
        print(
            f"resume: 2 processes read a {resume['checkpoint_mb']:,} MB checkpoint: memory of their own "
            f"{resume['mmap_uss_mb']:,} MB memory-mapped vs {resume['plain_uss_mb']:,} MB with a plain torch.load"
        )
    if args.json:
        summary = {"prepare_data": rows, "train_supernet": training, "resume": resume}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

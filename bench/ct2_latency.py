"""Batch-1 latency (the paper's protocol) of a dense compact model vs CTranslate2 running
the same weights in fp32.

The model (random weights, d=256, 3+3 layers, 4 heads, FFN 1024, vocabulary 8000, as
translate_vs_marian) is exported with `automoe.ct2`; both translate the same 30-token
source with beam 5 for exactly 30 decoder steps. CTranslate2 runs in its own process
without torch (torch in the same process slows it down) and with its default backend
(MKL is not forced). Runs alternate between the two; medians. Goal: ours within 2x.
    python bench/ct2_latency.py [--json out.json]      (needs: pip install ctranslate2)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import report, setup
from translate_vs_marian import VOCAB, ours

from automoe import ct2
from automoe.model.decode import beam_search
from automoe.model.inference import for_inference

HERE = Path(__file__).resolve().parent
# OpenMP threads keep spinning for a while after a parallel region (up to ~200 ms): a pause
# before each timed run keeps one process's spinning threads off the other's cores
QUIET_S = 0.3


def export(model, folder: Path) -> list[str]:
    """Convert in a child process: ctranslate2 loaded into this process (its own OpenMP
    runtime beside torch's) slowed our decoding here from 49 to 56-87 ms."""
    pieces = ["<pad>", "<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(4, VOCAB)]
    state = folder.parent / "model.pt"
    torch.save(model.state_dict(), state)
    child = multiprocessing.get_context("spawn").Process(target=_convert, args=(str(state), str(folder), pieces))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"CTranslate2 conversion failed (exit {child.exitcode})")
    return pieces


def _convert(state: str, folder: str, pieces: list[str]) -> None:
    import ctranslate2.converters

    model = ours()
    model.load_state_dict(torch.load(state, weights_only=True))
    spec = ct2.build_spec(model, pieces)

    class Converter(ctranslate2.converters.Converter):
        def _load(self):
            return spec

    Converter().convert(folder, force=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src-len", type=int, default=30)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    threads = setup()
    torch.manual_seed(0)
    base = ours()
    model = for_inference(base)  # the serving layout (oneDNN-packed weights), as Translator uses
    src = torch.randint(4, VOCAB, (args.batch, args.src_len))
    src[:, -1] = 3
    n = args.steps - 1  # tokens before EOS: `steps` decoder calls in both

    def run_ours():
        hyps = beam_search(model, src, beam=args.beam, max_len_a=0.0, max_len_b=n, min_len=n)
        assert all(len(h.tokens) == n for h in hyps)

    with tempfile.TemporaryDirectory() as tmp:
        pieces = export(base, Path(tmp) / "ct2")
        request = {
            "sources": [[pieces[i] for i in row] for row in src.tolist()],
            "options": {
                "beam_size": args.beam,
                "min_decoding_length": n,
                "max_decoding_length": n,
                "length_penalty": 0.6,
            },
        }
        worker = subprocess.Popen(
            [sys.executable, str(HERE / "ct2_worker.py"), str(Path(tmp) / "ct2"), str(threads), json.dumps(request)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

        def run_ct2(k: int) -> dict:
            worker.stdin.write(json.dumps({"run": k}) + "\n")
            worker.stdin.flush()
            return json.loads(worker.stdout.readline())

        for _ in range(3):
            run_ours()
        lengths = run_ct2(3)["lengths"]
        assert all(length == n for length in lengths), lengths
        t_ours, t_ct2 = [], []
        assert "ctranslate2" not in sys.modules  # see export()
        for _ in range(args.repeats):  # alternate: machine drift hits both alike
            time.sleep(QUIET_S)
            t0 = time.perf_counter()
            run_ours()
            t_ours.append(time.perf_counter() - t0)
            time.sleep(QUIET_S)
            t_ct2 += run_ct2(1)["times"]
        worker.stdin.write(json.dumps({"quit": True}) + "\n")
        worker.stdin.close()
        worker.wait()
    ours_ms, ct2_ms = statistics.median(t_ours) * 1e3, statistics.median(t_ct2) * 1e3
    report(
        "ct2_latency",
        {
            "batch": args.batch,
            "beam": args.beam,
            "decoder_steps": args.steps,
            "ours_ms": ours_ms,
            "ctranslate2_ms": ct2_ms,
            "slowdown_ours_over_ct2": ours_ms / ct2_ms,
        },
        args.json,
    )


if __name__ == "__main__":
    main()

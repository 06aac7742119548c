"""The choice a user makes: the searched (MoE) model in our engine, or the dense reference
exported to CTranslate2, each in fp32 and in int8, on the models `make run` trained.

For each: BLEU (sacreBLEU, test2016, beam 4, length penalty 0.6, as evaluate; the dense
reference in our engine too) and batch-1 latency with the paper's protocol (a 30-token
validation window, beam 5, exactly 30 decoder steps), alternating, medians. CTranslate2
runs in its own processes without torch (bench/ct2_worker.py; int8 is its compute_type
int8). A reference whose decoder attends to more than the last encoder layer (`make
run`'s largest dense arch does) has no CTranslate2 form: CTranslate2 then times the same
dims and weights with span 1 (slightly less work than the reference) and gives no BLEU.
    python bench/searched_vs_ct2.py [--run .] [--json out.json]   (needs: ctranslate2, a make run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import sacrebleu
import torch
from common import report, setup
from ct2_latency import CT2_BACKENDS, CT2_COMPUTE, PRECISIONS, Ct2Workers, alternate, best_of

from automoe.data.dataset import PreparedData
from automoe.latency import measure as m
from automoe.model.decode import beam_search
from automoe.model.inference import for_inference
from automoe.model.subnet import SubTransformer
from automoe.serving import DecodeConfig, Translator

CT2_BLEU = """
import json, sys
from automoe.ct2 import Ct2Decode, Ct2Translator
folder, threads, compute = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lines = json.load(sys.stdin)
print(json.dumps(Ct2Translator(folder, Ct2Decode(compute_type=compute), threads).translate(lines)))
assert "torch" not in sys.modules
"""


def export(folder: Path, out: Path) -> bool:
    cmd = [sys.executable, "-m", "automoe.cli", "export_ct2", "--model", str(folder), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and "cannot be exported" not in proc.stderr:
        raise RuntimeError(proc.stderr[-2000:])
    return proc.returncode == 0


def span_one(folder: Path, out: Path) -> Path:
    """The model with every decoder layer attending to the last encoder layer only: the
    same parameters (the span changes no weight's shape), exportable to CTranslate2."""
    model, vocab = SubTransformer.load(folder / "model.pt")
    arch = dataclasses.replace(model.arch, decoder_ende_span=(1,) * model.arch.decoder_layers)
    stand_in = SubTransformer(arch=arch, args=model.args)
    stand_in.load_state_dict(model.state_dict())
    out.mkdir(parents=True)
    stand_in.save(out / "model.pt", vocab=vocab)
    shutil.copyfile(folder / "spm.model", out / "spm.model")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=".", help="a project folder after make run")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()
    threads = setup()
    run = Path(args.run)
    searched, dense = run / "models/retrain/searched", run / "models/retrain/dense"
    data = PreparedData.open(run / "data/prepared")
    src_lines, refs = data.raw_lines("test", "src"), data.raw_lines("test", "tgt")
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ct2_dir = Path(tmp) / "ct2"
        exported = export(dense, ct2_dir)
        if not exported:  # CTranslate2 cannot attend to more than the last encoder layer
            exported = export(span_one(dense, Path(tmp) / "dense-span1"), ct2_dir) and False
            print("dense reference: decoder_ende_span > 1 cannot be exported; CTranslate2 runs the same dims and "
                  "weights with span 1 (latency only: no BLEU for it)")  # fmt: skip
        figures["ct2_is_the_reference"] = float(exported)
        for p in PRECISIONS:  # BLEU on test2016
            ours = Translator.from_folder(searched, DecodeConfig(precision=p)).translate(src_lines)
            figures[f"bleu_searched_ours_{p}"] = sacrebleu.corpus_bleu(ours, [refs]).score
            reference = Translator.from_folder(dense, DecodeConfig(precision=p)).translate(src_lines)
            figures[f"bleu_dense_ours_{p}"] = sacrebleu.corpus_bleu(reference, [refs]).score
            if exported:
                proc = subprocess.run(
                    [sys.executable, "-c", CT2_BLEU, str(ct2_dir), str(threads), CT2_COMPUTE[p]],
                    input=json.dumps(src_lines), capture_output=True, text=True, check=True,
                )  # fmt: skip
                figures[f"bleu_dense_ct2_{p}"] = sacrebleu.corpus_bleu(json.loads(proc.stdout), [refs]).score

        # latency: one real validation window, exactly 30 steps in both engines
        window = m.source_windows(data.split("valid"), 30, 1)  # (1, 30)
        translator = Translator.from_folder(searched)
        pieces = [[translator.sp.id_to_piece(int(i)) for i in window[0]]]
        n = 29  # tokens before EOS: 30 decoder calls
        request = {
            "sources": pieces,
            "options": {"beam_size": 5, "min_decoding_length": n, "max_decoding_length": n, "length_penalty": 0.6},
        }
        workers = Ct2Workers(ct2_dir, threads, request)
        compact, _ = SubTransformer.load(searched / "model.pt")
        models = {p: for_inference(compact, p) for p in PRECISIONS}  # the serving layouts

        def ours(p: str) -> None:
            beam_search(models[p], window, beam=5, max_len_a=0.0, max_len_b=n, min_len=n)

        for p in PRECISIONS:
            for _ in range(3):
                ours(p)
            for b in CT2_BACKENDS:
                workers.run((p, b), timed=False)
        assert "ctranslate2" not in sys.modules
        with torch.inference_mode():
            t_ours = alternate(ours, workers, args.repeats)
        workers.close()
    ct2_ms = workers.figures()
    for p in PRECISIONS:
        figures[f"latency_searched_ours_{p}_ms"], _ = best_of(t_ours[p])
        figures[f"latency_dense_ct2_{p}_ms"] = ct2_ms["ctranslate2" + ("" if p == "fp32" else f"_{p}") + "_ms"]
        figures[f"speedup_{p}_searched_ours_over_dense_ct2"] = (
            figures[f"latency_dense_ct2_{p}_ms"] / figures[f"latency_searched_ours_{p}_ms"]
        )
    report("searched_vs_ct2", figures, args.json)


if __name__ == "__main__":
    main()

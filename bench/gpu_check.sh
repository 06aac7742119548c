#!/usr/bin/env bash
# Every CUDA path of the pipeline once, at toy size, on this machine's GPUs (a few minutes on
# one GPU; BENCHMARKS.md 10 has a run). One line per check, a JSON of the figures, a summary;
# the first failed check ends the run with a non-zero exit.
#
#   bench/gpu_check.sh [MULTI30K_FOLDER]     (default ../shared/data/multi30k)
#
# env: PYTHON (default python3; automoe importable), WORK (a folder; default a fresh temp
# folder), GPU_CHECK_JSON (where the figures go; default $WORK/gpu_check.json),
# GPU_CHECK_DEVICE=cpu (the same plumbing on the CPU in fp32: a dry run of this script).
#
# Checks: bf16 supernet updates (autocast auto: bf16 from Ampere on, fp16 with a gradient
# scaler before), a SIGKILL mid-run and the resume on the GPU, fp16 training with its scaler,
# DDP over the GPUs present (torchrun; NCCL needs two or more), measure_latency on CUDA in
# fp16 (the hardware fingerprint names the GPU), the predictor, the search's fitness and its
# confirmation on the GPU, retrain on the GPU, evaluate and `translate` in fp16 on the GPU,
# the half-precision serving layouts against fp32, and the CUDA image when Docker is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CORPUS=$(cd "${1:-../shared/data/multi30k}" && pwd)
WORK=${WORK:-$(mktemp -d -t automoe-gpu-check.XXXXXX)}
JSON=${GPU_CHECK_JSON:-$WORK/gpu_check.json}
DEV=${GPU_CHECK_DEVICE:-cuda}
export AUTOMOE_TRACKING=0 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p "$WORK"
if [ "$DEV" = cuda ]; then HALF=fp16 AUTOCAST=auto; else HALF=fp32 AUTOCAST=fp32; fi
start=$(date +%s)
figures="$WORK/figures.jsonl"
: >"$figures"

stage() { "$PY" -m automoe.cli "$@"; }
say() { printf '[%4ss] %s\n' "$(($(date +%s) - start))" "$*"; }
record() { echo "$1" >>"$figures"; }  # JSON objects, one after another
metric() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

say "GPU: $("$PY" - "$DEV" <<'EOF'
import json, sys
import torch
dev = sys.argv[1]
if dev == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: no GPU is visible to torch (torch.version.cuda=%s)" % torch.version.cuda)
n = torch.cuda.device_count() if dev == "cuda" else 0
names = [torch.cuda.get_device_name(i) for i in range(n)]
cap = torch.cuda.get_device_capability(0) if n else None
print(json.dumps({"gpus": n, "names": names, "capability": cap, "torch": torch.__version__, "cuda": torch.version.cuda}))
EOF
)"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if '$DEV' == 'cuda' else 1)")

DATA="$WORK/prepared"
stage prepare_data --out "$DATA" --set prepare_data.mirror="$CORPUS" --set prepare_data.max_train_pairs=6000 \
    --set prepare_data.vocab_size=2000 --set prepare_data.max_len=64 >/dev/null
say "prepare_data: 6,000 pairs"

# -- training ------------------------------------------------------------------------------
TRAIN=(--set train_supernet.space=small --set train_supernet.train.max_updates=40
    --set train_supernet.train.valid_interval=10 --set train_supernet.train.warmup_updates=10
    --set train_supernet.train.max_tokens=4096 --set train_supernet.train.dropout=0.1
    --set train_supernet.train.device=$DEV --set train_supernet.train.precision=$AUTOCAST
    --set train_supernet.train.log_interval=10)
stage train_supernet --data "$DATA" --out "$WORK/supernet" "${TRAIN[@]}" --metrics "$WORK/supernet.json" >/dev/null
say "train_supernet: 40 updates, bf16 autocast $(metric "$WORK/supernet.json" bf16_autocast), $(metric "$WORK/supernet.json" train_tokens_per_s) target tokens/s"
record "{\"check\": \"train_supernet\", \"metrics\": $(cat "$WORK/supernet.json")}"

# the same run, SIGKILLed once its update-20 checkpoint is on disk, then rerun: it resumes
"$PY" -m automoe.cli train_supernet --data "$DATA" --out "$WORK/killed" "${TRAIN[@]}" >/dev/null 2>&1 &
pid=$!  # the Python process itself (a shell function would put a subshell between)
while [ ! -e "$WORK/killed/checkpoints/checkpoint_0000020.pt" ]; do
    kill -0 $pid 2>/dev/null || { echo "gpu_check: the run to kill ended first" >&2; exit 1; }
    sleep 0.2
done
kill -9 $pid
wait $pid 2>/dev/null || true
stage train_supernet --data "$DATA" --out "$WORK/killed" "${TRAIN[@]}" 2>"$WORK/resume.log" >/dev/null
grep -o "resuming at update [0-9]*" "$WORK/resume.log" >&2 || { echo "gpu_check: the rerun did not resume" >&2; exit 1; }
resume=$("$PY" - "$WORK/supernet/curves.csv" "$WORK/killed/curves.csv" <<'EOF'
import csv, json, sys
a, b = ([{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(p))] for p in sys.argv[1:])
assert [r["update"] for r in a] == [r["update"] for r in b], "the resumed run has other updates"
print(json.dumps({"updates": len(a), "max_loss_diff": max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))}))
EOF
)
say "resume after SIGKILL on $DEV: $resume"
record "{\"check\": \"resume\", \"figures\": $resume}"

if [ "$DEV" = cuda ]; then  # a CPU emulates fp16: minutes for what a GPU does in seconds (tests/ cover it there)
    stage train_supernet --data "$DATA" --out "$WORK/fp16" "${TRAIN[@]}" --set train_supernet.train.precision=fp16 \
        --set train_supernet.train.max_updates=20 --metrics "$WORK/fp16.json" >/dev/null
    scaler=$("$PY" -c "
import sys; from pathlib import Path; from automoe.train import checkpoint
print(checkpoint.load_latest(Path(sys.argv[1]))[0]['scaler'].get('scale'))" "$WORK/fp16/checkpoints")
    say "fp16 training with a gradient scaler: fp16 autocast $(metric "$WORK/fp16.json" fp16_autocast), final loss $(metric "$WORK/fp16.json" final_train_loss), scale $scaler"
    record "{\"check\": \"fp16_training\", \"scale\": \"$scaler\", \"metrics\": $(cat "$WORK/fp16.json")}"
fi

"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m automoe.cli train_supernet --data "$DATA" \
    --out "$WORK/ddp" "${TRAIN[@]}" --set train_supernet.train.max_updates=20 --metrics "$WORK/ddp.json" >/dev/null
say "torchrun over $NGPU GPU(s): $(metric "$WORK/ddp.json" train_tokens_per_s) target tokens/s$([ "$NGPU" -lt 2 ] && echo ' (one process: NCCL needs two GPUs)')"
record "{\"check\": \"torchrun\", \"gpus\": $NGPU, \"metrics\": $(cat "$WORK/ddp.json")}"

# -- latency, predictor, search ------------------------------------------------------------
NET="$WORK/supernet/supernet.pt"
stage measure_latency --data "$DATA" --supernet "$NET" --out "$WORK/latency" --set measure_latency.device=$DEV \
    --set measure_latency.precision=$HALF --set measure_latency.n_archs=12 --set measure_latency.repeats=4 \
    --set measure_latency.warmup=2 --metrics "$WORK/latency.json" >/dev/null
say "measure_latency ($HALF on $DEV): median $(metric "$WORK/latency.json" latency_ms_median) ms; hardware $(cat "$WORK/latency/hardware.json")"
record "{\"check\": \"measure_latency\", \"hardware\": $(cat "$WORK/latency/hardware.json"), \"metrics\": $(cat "$WORK/latency.json")}"
if [ "$DEV" = cuda ]; then
    "$PY" -c "import json,sys; h=json.load(open(sys.argv[1])); assert 'cpu_model' not in h and h['gpu'] and h['cuda'], h" \
        "$WORK/latency/hardware.json"
fi

stage train_predictor --latency "$WORK/latency" --out "$WORK/predictor" --metrics "$WORK/predictor.json" >/dev/null
say "train_predictor: test MAPE $(metric "$WORK/predictor.json" test_mape_pct)%"

stage search --data "$DATA" --supernet "$NET" --predictor "$WORK/predictor/predictor.pt" --out "$WORK/search" \
    --set search.population=10 --set search.parents=4 --set search.mutations=3 --set search.crossovers=3 \
    --set search.iterations=2 --set search.budget.value=0.6 --set search.confirm=3 --set search.confirm_rounds=2 \
    --set search.device=$DEV --metrics "$WORK/search.json" >/dev/null
say "search (fitness and confirmation on $DEV): measured ratio $(metric "$WORK/search.json" best_measured_ratio)"
record "{\"check\": \"search\", \"metrics\": $(cat "$WORK/search.json")}"

# -- retrain, evaluate, translate ----------------------------------------------------------
RETRAIN=(--set retrain.train.max_updates=30 --set retrain.train.valid_interval=15 --set retrain.train.device=$DEV
    --set retrain.train.precision=$AUTOCAST --set retrain.train.max_tokens=4096 --set retrain.train.warmup_updates=5)
stage retrain --data "$DATA" --arch "$WORK/search/best_arch.yaml" --supernet "$NET" --out "$WORK/searched" \
    "${RETRAIN[@]}" >/dev/null
stage retrain --data "$DATA" --arch largest_dense --supernet "$NET" --out "$WORK/dense" "${RETRAIN[@]}" >/dev/null
say "retrain on $DEV: searched and dense, 30 updates each"

stage evaluate --data "$DATA" --model "$WORK/searched" --baseline "$WORK/dense" --latency "$WORK/latency" \
    --out "$WORK/evaluate" --set evaluate.decode.device=$DEV --set evaluate.decode.precision=$HALF \
    --set evaluate.max_sentences=300 --set evaluate.latency_rounds=2 --set evaluate.latency_repeats=4 \
    --metrics "$WORK/evaluate.json" >/dev/null
say "evaluate ($HALF on $DEV): searched BLEU $(metric "$WORK/evaluate.json" searched_bleu), $(metric "$WORK/evaluate.json" searched_translate_sentences_per_s) sentences/s, latency ratio $(metric "$WORK/evaluate.json" searched_latency_ratio)"
record "{\"check\": \"evaluate\", \"metrics\": $(cat "$WORK/evaluate.json")}"

printf 'A man rides a bike.\nTwo dogs play in the snow.\n' |
    stage translate --model "$WORK/searched" --precision $HALF --device $DEV >"$WORK/translated.txt"
say "translate ($HALF on $DEV): $(wc -l <"$WORK/translated.txt") lines"

# -- the serving layouts against fp32 on the CPU -------------------------------------------
layouts=$("$PY" - "$WORK/searched/model.pt" "$DATA" "$DEV" <<'EOF'
import json, sys
import numpy as np
import torch
from automoe.data.dataset import PreparedData, pad
from automoe.model.decode import beam_search
from automoe.model.inference import for_inference
from automoe.model.subnet import SubTransformer
model, _ = SubTransformer.load(sys.argv[1])
model.eval()
split, dev = PreparedData.open(sys.argv[2]).split("test"), sys.argv[3]
src = pad([np.asarray(split.src[i], dtype=np.int64) for i in range(64)])
with torch.inference_mode():
    ref = beam_search(model, src, beam=4)
    want = model(src, src)[0].log_softmax(-1)
    out = {}
    for p in (("fp32", "fp16", "bf16") if dev == "cuda" else ("fp32",)):
        served = for_inference(model.to(dev), p)
        got = served(src.to(dev), src.to(dev))[0].float().log_softmax(-1).cpu()
        hyps = beam_search(served, src.to(dev), beam=4)
        same = sum(a.tokens == b.tokens for a, b in zip(ref, hyps))
        out[p] = {"same_tokens": f"{same}/{len(ref)}", "max_logprob_err": float((got - want).abs().max())}
        model = model.cpu()
print(json.dumps(out))
EOF
)
say "serving layouts on $DEV vs fp32 on the CPU (64 test sentences, beam 4): $layouts"
record "{\"check\": \"layouts\", \"figures\": $layouts}"

# -- the CUDA image ------------------------------------------------------------------------
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    docker build --network host -q -f docker/Dockerfile.cuda -t automoe:gpu-check . >/dev/null
    docker run --rm --gpus all automoe:gpu-check python -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))"
    say "CUDA image: built and saw the GPU"
    record '{"check": "cuda_image", "ran": true}'
else
    say "CUDA image: not checked (no Docker daemon here)"
    record '{"check": "cuda_image", "ran": false}'
fi

"$PY" - "$figures" "$JSON" <<'EOF'
import json, sys
text, out, at, dec = open(sys.argv[1]).read(), [], 0, json.JSONDecoder()
while text[at:].strip():  # the records, one after another (some span lines)
    at += len(text[at:]) - len(text[at:].lstrip())
    obj, at = dec.raw_decode(text, at)
    out.append(obj)
json.dump(out, open(sys.argv[2], "w"), indent=1)
EOF
say "gpu_check: every check passed on $DEV in $(($(date +%s) - start)) s; figures in $JSON"

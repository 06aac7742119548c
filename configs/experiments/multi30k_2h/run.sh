#!/usr/bin/env bash
# The reproduction experiment (BENCHMARKS.md): the whole automoe pipeline on the full
# Multi30k En-De training set, plus the expert ablation, on this machine's CPU.
#
#   bash configs/experiments/multi30k_2h/run.sh [OUT]      (default OUT: results/experiments/multi30k_2h)
#
# Every step writes OUT/<step>.json when done, so a rerun skips finished steps and a
# killed training resumes from its last checkpoint. OUT/times.tsv has each step's wall time.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../../.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
OUT=${1:-results/experiments/multi30k_2h}
P="--params $HERE/params.yaml"
export AUTOMOE_TRACKING=${AUTOMOE_TRACKING:-0} DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true
mkdir -p "$OUT"

step() {  # step NAME COMMAND...: run unless OUT/NAME.json exists; record the wall time
  local name=$1; shift
  if [ -f "$OUT/$name.json" ]; then echo "== $name: done"; return; fi
  echo "== $name: $* ($(git rev-parse --short HEAD 2>/dev/null || echo no-git))"
  local t0=$SECONDS
  "$@" --metrics "$OUT/$name.json"
  printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> "$OUT/times.tsv"
}

step prepare_data automoe prepare_data $P --out "$OUT/data"
step train_supernet automoe train_supernet $P --data "$OUT/data" --out "$OUT/supernet"
# the baseline does not depend on the search: train it while nothing else runs
step retrain_dense automoe retrain $P --data "$OUT/data" --arch largest_dense --out "$OUT/retrain/dense"
# latency is measured with the machine otherwise idle
step measure_latency automoe measure_latency $P --data "$OUT/data" --supernet "$OUT/supernet/supernet.pt" \
  --out "$OUT/latency"
step train_predictor automoe train_predictor $P --latency "$OUT/latency" --out "$OUT/predictor"
# the headline search (heterogeneous experts) and the ablation: the same supernet, predictor
# and absolute latency budget, searched in its homogeneous-expert and dense-only parts
VARIANTS="heterogeneous homogeneous dense_search"
for v in $VARIANTS; do
  space=$HERE/space.yaml
  [ "$v" = homogeneous ] && space=$HERE/space_homogeneous.yaml
  [ "$v" = dense_search ] && space=$HERE/space_dense.yaml
  step "search_$v" automoe search $P --set "search.space=$space" --data "$OUT/data" \
    --supernet "$OUT/supernet/supernet.pt" --predictor "$OUT/predictor" --out "$OUT/search/$v"
done
# the searched models are small: retrain the three side by side, one thread each (same budget)
pids=()
for v in $VARIANTS; do
  step "retrain_$v" automoe retrain $P --set retrain.train.threads=1 --data "$OUT/data" \
    --arch "$OUT/search/$v/best_arch.yaml" --out "$OUT/retrain/$v" > "$OUT/retrain_$v.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
step evaluate automoe evaluate $P --data "$OUT/data" --model "$OUT/retrain/heterogeneous" \
  --baseline "$OUT/retrain/dense" --out "$OUT/evaluate/heterogeneous"
for v in homogeneous dense_search; do
  step "evaluate_$v" automoe evaluate $P --data "$OUT/data" --model "$OUT/retrain/$v" --out "$OUT/evaluate/$v"
done
echo "== multi30k_2h: done in $(awk '{s += $2} END {print s}' "$OUT/times.tsv") s (steps: $OUT/times.tsv)"

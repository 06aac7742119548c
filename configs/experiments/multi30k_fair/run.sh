#!/usr/bin/env bash
# The fair reproduction (BENCHMARKS.md section 3): the automoe pipeline on the full
# Multi30k En-De training set on a 2-core CPU, a family of hand-designed dense models,
# searched models at two latency budgets and the expert ablation with two seeds, every
# model trained the same way (inherited from the one supernet, then the same updates).
#
#   bash configs/experiments/multi30k_fair/run.sh [OUT]    (default OUT: results/experiments/multi30k_fair)
#
# Every step writes OUT/<step>.json when it is done, so a rerun skips finished steps, and a
# killed training resumes from its last checkpoint. OUT/times.tsv has each step's wall time.
# The last step writes the tables (OUT/report.md) and figures and logs them, with one run
# per model, to MLflow (OUT/mlflow.db unless MLFLOW_TRACKING_URI is set). Toy sizes for a check:
# EXPERIMENT_PARAMS=other_params.yaml.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../../.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
OUT=${1:-results/experiments/multi30k_fair}
P="--params ${EXPERIMENT_PARAMS:-$HERE/params.yaml}"   # EXPERIMENT_PARAMS: another params file (the tests: toy sizes)
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# the stages do not track (two retrains run side by side); the report step logs everything
export AUTOMOE_TRACKING=0

step() {  # step NAME COMMAND...: run unless OUT/NAME.json exists; record the wall time
  local name=$1; shift
  if [ -f "$OUT/$name.json" ]; then echo "== $name: done"; return; fi
  echo "== $name: $* ($(git rev-parse --short HEAD 2>/dev/null || echo no-git))"
  local t0=$SECONDS
  "$@" --metrics "$OUT/$name.json"
  printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> "$OUT/times.tsv"
}

D="--data $OUT/data"
S="--supernet $OUT/supernet/supernet.pt"
step prepare_data automoe prepare_data $P --out "$OUT/data"
step train_supernet automoe train_supernet $P $D --out "$OUT/supernet"
# latency is measured with the machine otherwise idle
step measure_latency automoe measure_latency $P $D $S --out "$OUT/latency"
step train_predictor automoe train_predictor $P --latency "$OUT/latency" --out "$OUT/predictor"

# searches: heterogeneous experts at 1/2 and 3/4 of the reference's measured latency (the
# space's largest dense arch, d=256 3+3 FFN 1,024; the space's fastest arch measures about
# 0.41x of it, so 1/3 is out of reach), and the ablation at 1/2: the same supernet,
# predictor and budget, searched in its homogeneous-expert and dense-only parts
search() {  # search NAME FRACTION [SPACE]
  local space=${3:+--set search.space=$3}
  step "search_$1" automoe search $P --set "search.budget.value=$2" $space $D $S \
    --predictor "$OUT/predictor" --out "$OUT/search/$1"
}
search het_b50 0.5
search het_b75 0.75
search hom_b50 0.5 "$HERE/space_homogeneous.yaml"
search dense_b50 0.5 "$HERE/space_dense.yaml"

# retraining: every model inherits its supernet slice and is fine-tuned with the same recipe
# and number of updates; two at a time, one thread each, the slowest first
JOBS=()   # NAME ARCH SEED
for a in d256_l3x3_f1024 d256_l3x2_f1024; do JOBS+=("dense_$a $HERE/dense/$a.yaml 1"); done
JOBS+=("het_b75_s1 $OUT/search/het_b75/best_arch.yaml 1" "dense_d256_l3x1_f1024 $HERE/dense/d256_l3x1_f1024.yaml 1")
for v in het_b50 hom_b50 dense_b50; do
  for seed in 1 2; do JOBS+=("${v}_s$seed $OUT/search/$v/best_arch.yaml $seed"); done
done
for a in d192_l2x1_f512 d192_l2x1_f256; do JOBS+=("dense_$a $HERE/dense/$a.yaml 1"); done

running=0
for job in "${JOBS[@]}"; do
  read -r name arch seed <<< "$job"
  if [ "$running" -ge 2 ]; then wait -n; running=$((running - 1)); fi
  step "retrain_$name" automoe retrain $P --set "retrain.train.seed=$seed" $D $S --arch "$arch" \
    --out "$OUT/retrain/$name" > "$OUT/retrain_$name.log" 2>&1 &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do wait -n; running=$((running - 1)); done

# evaluation on test2016, alone on the machine: each model beside the reference, whose
# latency is measured in the same alternating rounds (the ratio is what compares across runs)
REF=$OUT/retrain/dense_d256_l3x3_f1024
for job in "${JOBS[@]}"; do
  read -r name _ _ <<< "$job"
  [ "retrain/$name" = "retrain/dense_d256_l3x3_f1024" ] && continue
  step "evaluate_$name" automoe evaluate $P $D --model "$OUT/retrain/$name" --baseline "$REF" \
    --out "$OUT/evaluate/$name"
done
step report python "$HERE/report.py" "$OUT"
cat "$OUT/report.md"
echo "== multi30k_fair: done in $(awk '{s += $2} END {print s}' "$OUT/times.tsv") s of steps (steps: $OUT/times.tsv)"

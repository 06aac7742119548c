#!/usr/bin/env bash
# The fair reproduction (BENCHMARKS.md section 3): the automoe pipeline on the full
# Multi30k En-De training set on a 2-core CPU, a family of hand-designed dense models,
# searched models at 1/3 (where the space's floor allows it) and 1/2 of the reference's
# measured latency, and the expert ablation at 1/2 with independent runs per arm (search
# seed and fine-tuning seed); every model trained the same way: inherited from the one
# supernet, then fine-tuned for the same updates at the LR its family chose on validation
# by one rule (the reference for the dense family, each search's seed-1 winner for its arm).
#
#   bash configs/experiments/multi30k_fair/run.sh [OUT]    (default OUT: results/experiments/multi30k_fair)
#
# Every step writes OUT/<step>.json when it is done, so a rerun skips finished steps, and a
# killed training resumes from its last checkpoint. OUT/times.tsv has each step's wall time.
# The last step writes the tables (OUT/report.md) and figures and logs them, with one run
# per model, to MLflow (OUT/mlflow.db unless MLFLOW_TRACKING_URI is set). Toy sizes for a check:
# EXPERIMENT_PARAMS=other_params.yaml. The design, from the environment:
#   SEEDS="1 2 3"                 runs per ablation arm (search seed = fine-tuning seed)
#   LR_GRID="0.0015 0.003 0.006"  fine-tuning LRs each family's sweep tries
#   SWEEP_UPDATES=                updates per sweep run; empty: the fine-tuning length, and then the family's
#                                 first model is its sweep run at the chosen LR (the same command). Shorter
#                                 sweeps choose lower LRs than the full length would (BENCHMARKS.md section 3)
#   LR_EXTEND=2                   a choice at an end of the grid sweeps one LR further, at most this often
#   BUDGET_SLACK=0.02             a fine-tuned searched model may measure this much over its budget; beyond,
#                                 its search runs again at a fraction scaled by the overshoot (budget_retry.py)
#   MAX_TRIES=3                   searches per seed at most (the first and two retries)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../../.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
OUT=${1:-results/experiments/multi30k_fair}
SEEDS=${SEEDS:-1 2 3}
LR_GRID=${LR_GRID:-0.0015 0.003 0.006}
SWEEP_UPDATES=${SWEEP_UPDATES:-}
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
  "$@" --metrics "$OUT/$name.json" || return  # a failed step records nothing (set -e is off inside `if`)
  printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> "$OUT/times.tsv"
}

D="--data $OUT/data"
S="--supernet $OUT/supernet/supernet.pt"
step prepare_data automoe prepare_data $P --out "$OUT/data"
step train_supernet automoe train_supernet $P $D --out "$OUT/supernet"
# latency is measured with the machine otherwise idle
step measure_latency automoe measure_latency $P $D $S --out "$OUT/latency"
step train_predictor automoe train_predictor $P --latency "$OUT/latency" --out "$OUT/predictor"

# searches: heterogeneous experts at 1/3 of the reference's measured latency (the space's
# largest dense arch, d=256 3+3 FFN 1,024) where the space's floor allows it (the search
# refuses a budget under its fastest arch: then the report gives the floor), and the
# ablation at 1/2: the same supernet, predictor and budget, searched in the whole space
# and in its homogeneous-expert and dense-only parts, once per seed
search() {  # search RUN FRACTION SEED [SPACE]   (RUN: SEARCH_sSEED, a retry SEARCH_sSEED_tTRY)
  local space=${4:+--set search.space=$4}
  step "search_$1" automoe search $P --set "search.budget.value=$2" --set "search.seed=$3" $space $D $S \
    --predictor "$OUT/predictor" --out "$OUT/search/$1"
}
declare -A BUDGET=([het_b33]=0.33333 [het_b50]=0.5 [hom_b50]=0.5 [dense_b50]=0.5)
declare -A SPACE=([het_b33]="" [het_b50]="" [hom_b50]=$HERE/space_homogeneous.yaml [dense_b50]=$HERE/space_dense.yaml)
may_refuse() {  # may_refuse RUN FRACTION SEED [SPACE]: a search whose budget may be under the space's
  # floor; a refusal (exit 2) is recorded in OUT/search_RUN.refused and not asked again (returns 2)
  local refused=$OUT/search_$1.refused rc=0
  if [ ! -f "$refused" ]; then
    search "$@" 2> "$OUT/search_$1.err" || rc=$?
    if [ "$rc" -eq 2 ]; then tail -n 1 "$OUT/search_$1.err" > "$refused"; elif [ "$rc" -ne 0 ]; then exit "$rc"; fi
  fi
  if [ -f "$refused" ]; then echo "== search_$1: refused: $(cat "$refused")"; return 2; fi
}
may_refuse het_b33_s1 0.33333 1 || true
for seed in $SEEDS; do
  for v in het_b50 hom_b50 dense_b50; do search "${v}_s$seed" "${BUDGET[$v]}" "$seed" "${SPACE[$v]}"; done
done

other_lr() {  # other_lr FOLDER LR: succeeds, printing its peak LR, where a training's schedule peaked off LR
  python -c 'import csv, sys; p = max(float(r["lr"]) for r in csv.DictReader(open(sys.argv[1])))
sys.exit(print(p) if abs(p / float(sys.argv[2]) - 1) > 0.25 else 1)' "$1/curves.csv" "$2"
}

pool() {  # pool JOB...: "STEP OUT_FOLDER ARCH SEED LR UPDATES" per job, two at a time, one thread each
  local running=0 job name folder arch seed lr updates
  for job in "$@"; do  # a finished training whose family's LR changed since is not passed over silently
    read -r name folder arch seed lr updates <<< "$job"
    if [ -f "$OUT/$name.json" ] && peak=$(other_lr "$folder" "$lr"); then
      echo "run.sh: $folder was trained at LR $peak, its family now chooses $lr: remove $OUT/$name.json and $folder to train it again (its evaluation follows)" >&2
      exit 1
    fi
  done
  for job in "$@"; do
    read -r name folder arch seed lr updates <<< "$job"
    if [ "$running" -ge 2 ]; then wait -n; running=$((running - 1)); fi
    step "$name" automoe retrain $P --set "retrain.train.seed=$seed" --set "retrain.train.lr=$lr" \
      ${updates:+--set retrain.train.max_updates=$updates} $D $S --arch "$arch" --out "$folder" \
      > "$OUT/$name.log" 2>&1 &
    running=$((running + 1))
  done
  while [ "$running" -gt 0 ]; do wait -n; running=$((running - 1)); done
}

# the families: the dense models follow the reference; each searched model follows its
# search's seed-1 winner; a family's LR is the grid's lowest validation loss after
# SWEEP_UPDATES updates of that model (OUT/lr_FAMILY.json)
declare -A FIRST=([dense]=$HERE/dense/d256_l3x3_f1024.yaml)
for v in het_b33 het_b50 hom_b50 dense_b50; do
  [ -f "$OUT/search/${v}_s1/best_arch.yaml" ] && FIRST[$v]=$OUT/search/${v}_s1/best_arch.yaml
done
SWEEP=()
for family in "${!FIRST[@]}"; do
  for lr in $LR_GRID; do
    SWEEP+=("sweep_${family}_lr$lr $OUT/sweep/$family/lr$lr ${FIRST[$family]} 1 $lr $SWEEP_UPDATES")
  done
done
pool "${SWEEP[@]}"
# a family whose choice is at an end of what it swept sweeps one LR further (half the lowest or
# twice the highest), at most LR_EXTEND times; the choice is made again on every run (it is cheap)
declare -A LR
while true; do
  SWEEP=()
  for family in "${!FIRST[@]}"; do
    # shellcheck disable=SC2086  # the grid: one argument per LR
    python "$HERE/choose_lr.py" "$OUT/sweep/$family" --metrics "$OUT/lr_$family.json" --grid $LR_GRID \
      --max-extend "${LR_EXTEND:-2}"
    read -r lr extend < <(python -c 'import json, sys; c = json.load(open(sys.argv[1])); print(c["lr"], c["extend"] or "")' "$OUT/lr_$family.json")
    LR[$family]=$lr
    [ -z "$extend" ] || SWEEP+=("sweep_${family}_lr$extend $OUT/sweep/$family/lr$extend ${FIRST[$family]} 1 $extend $SWEEP_UPDATES")
  done
  [ "${#SWEEP[@]}" -gt 0 ] || break
  pool "${SWEEP[@]}"
done

# with sweeps at the fine-tuning length, a family's first model at its chosen LR is that LR's
# sweep run (the same command): it is linked (hard links; every write is a rename), not trained again
if [ -z "$SWEEP_UPDATES" ]; then
  for family in "${!FIRST[@]}"; do
    if [ "$family" = dense ]; then name=dense_d256_l3x3_f1024; else name=${family}_s1; fi
    src=$OUT/sweep/$family/lr${LR[$family]}
    if [ ! -f "$OUT/retrain_$name.json" ] && [ -f "$OUT/sweep_${family}_lr${LR[$family]}.json" ]; then
      mkdir -p "$OUT/retrain" && rm -rf "$OUT/retrain/$name" && cp -al "$src" "$OUT/retrain/$name"
      cp "$OUT/sweep_${family}_lr${LR[$family]}.json" "$OUT/retrain_$name.json"
      echo "== retrain_$name: the sweep's run at LR ${LR[$family]} (the same command)"
    fi
  done
fi

# fine-tuning: every model inherits its supernet slice and gets the same updates at its
# family's LR; the slowest first
JOBS=()   # NAME ARCH SEED FAMILY
# the dense family brackets the budgets: the reference, its 1-decoder-layer cut (about 1/2) and
# the space's fastest arch (the floor, about 1/3); DENSE_EXTRA adds more (e.g. "d256_l3x2_f1024")
for a in d256_l3x3_f1024 d256_l3x1_f1024 ${DENSE_EXTRA:-}; do JOBS+=("dense_$a $HERE/dense/$a.yaml 1 dense"); done
[ -n "${FIRST[het_b33]:-}" ] && JOBS+=("het_b33_s1 ${FIRST[het_b33]} 1 het_b33")
for v in het_b50 hom_b50 dense_b50; do
  for seed in $SEEDS; do JOBS+=("${v}_s$seed $OUT/search/${v}_s$seed/best_arch.yaml $seed $v"); done
done
JOBS+=("dense_d192_l2x1_f256 $HERE/dense/d192_l2x1_f256.yaml 1 dense")
RETRAIN=()
for job in "${JOBS[@]}"; do
  read -r name arch seed family <<< "$job"
  RETRAIN+=("retrain_$name $OUT/retrain/$name $arch $seed ${LR[$family]}")
done
pool "${RETRAIN[@]}"

# evaluation on test2016, alone on the machine: each model beside the reference, whose
# latency is measured in the same alternating rounds (the ratio is what compares across runs)
REF=$OUT/retrain/dense_d256_l3x3_f1024
evaluate() {  # evaluate NAME: beside the reference; again where the model or the reference trained since
  if [ "$OUT/retrain_$1.json" -nt "$OUT/evaluate_$1.json" ] || [ "$OUT/retrain_dense_d256_l3x3_f1024.json" -nt "$OUT/evaluate_$1.json" ]; then
    rm -f "$OUT/evaluate_$1.json" "$OUT/budget_$1.json"
  fi
  step "evaluate_$1" automoe evaluate $P $D --model "$OUT/retrain/$1" --baseline "$REF" --out "$OUT/evaluate/$1"
}
for job in "${JOBS[@]}"; do
  read -r name _ _ _ <<< "$job"
  [ "$name" = "dense_d256_l3x3_f1024" ] || evaluate "$name"
done
# the budget on the routing that is served: a search confirms its winner with the supernet's
# routing, and fine-tuning moves the routers. Every searched model measured over its budget by
# more than BUDGET_SLACK is replaced: its search runs again (same seed) at its fraction scaled by
# the overshoot, and the new winner is fine-tuned and evaluated alike (OUT/budget_RUN.json);
# at most MAX_TRIES searches per seed. The report's ablation uses each seed's last try.
CURRENT=()   # RUN FAMILY SEED FRACTION
for job in "${JOBS[@]}"; do
  read -r name _ seed family <<< "$job"
  [ -n "${BUDGET[$family]:-}" ] && CURRENT+=("$name $family $seed ${BUDGET[$family]}")
done
try=1
while [ "${#CURRENT[@]}" -gt 0 ]; do
  try=$((try + 1)); NEXT=(); RETRAIN=()
  for entry in "${CURRENT[@]}"; do
    read -r name family seed fraction <<< "$entry"
    step "budget_$name" python "$HERE/budget_retry.py" "$OUT/evaluate_$name.json" --budget "${BUDGET[$family]}" \
      --fraction "$fraction" --slack "${BUDGET_SLACK:-0.02}"
    next=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["next_fraction"] or "")' "$OUT/budget_$name.json")
    [ -n "$next" ] && [ "$try" -le "${MAX_TRIES:-3}" ] || continue
    run=${family}_s${seed}_t$try
    may_refuse "$run" "$next" "$seed" "${SPACE[$family]}" || continue
    NEXT+=("$run $family $seed $next")
    RETRAIN+=("retrain_$run $OUT/retrain/$run $OUT/search/$run/best_arch.yaml $seed ${LR[$family]}")
  done
  [ "${#RETRAIN[@]}" -gt 0 ] && pool "${RETRAIN[@]}"
  for entry in "${NEXT[@]}"; do
    read -r run _ _ _ <<< "$entry"
    evaluate "$run"
  done
  CURRENT=("${NEXT[@]}")
done

# the report is made again where an evaluation, a verdict or an LR choice is newer than it
if [ -f "$OUT/report.json" ] && [ -n "$(find "$OUT" -maxdepth 1 \( -name 'evaluate_*.json' -o -name 'budget_*.json' \
  -o -name 'lr_*.json' \) -newer "$OUT/report.json" -print -quit)" ]; then rm "$OUT/report.json"; fi
step report python "$HERE/report.py" "$OUT"
cat "$OUT/report.md"
echo "== multi30k_fair: done in $(awk '{s += $2} END {print s}' "$OUT/times.tsv") s of steps (steps: $OUT/times.tsv)"

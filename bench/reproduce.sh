#!/usr/bin/env bash
# The paper-reproduction runs (docs/results.md) on a GPU machine, as plain CLI commands:
#   anml     the reference's README run (ANML, 20,000 first-order meta-steps, inner lr 0.1, meta lr
#            0.001, seed 9: all defaults of `anml-fast meta-train`), exported as a shipped-model
#            folder, then the full evaluation (schedule 10..600, output layer only, lr search)
#   scratch  the same evaluation of a randomly initialised ANML
#   oml      OML with the same meta-training budget (20,000 steps, seed 9) at the learning rates of
#            OML's own Omniglot setup (inner 0.03, meta 0.0001) and with unit-scale images (OML's
#            default --input-norm standard: under the reference scaling it learns nothing), and
#            its evaluation
#   iid      the i.i.d. oracle: ANML's evaluation with the images shuffled across classes
#            (reads the exported model from MODEL, default $OUT/anml-seed9)
#   widelr   the exported ANML evaluated with a learning-rate grid reaching above 0.001 (the
#            faithful search chose 0.001, its largest rate, at every class count); chosen on
#            meta-test train accuracy as always
#   seeds    for each seed in SEEDS (default 1 2 3): meta-train STEPS (default 20000) first-order
#            steps, then evaluate with the wide grid; `anml-fast compare` folds them afterwards
#   second   second-order ANML (seed 9, STEPS steps, default 20000: about 10.5 min on an H200, longer
#            than one call). Runs for at most SECOND_S seconds, then either exports and evaluates the
#            finished model, or leaves the checkpoint in $OUT as checkpoint.part-* (15 MiB pieces)
#            beside runs.tar: carry both (e.g. as .carry/pack) and set RESUME_PACK=.carry/pack in the
#            next call to continue exactly where it stopped.
#   tests    pytest on TESTS (skipped when less than TEST_MIN_S seconds of BUDGET_S are left)
# Usage: OUT=/tmp/out RUNS="anml scratch" bash bench/reproduce.sh
# Writes $OUT/log.txt (every command, its exit status and time), $OUT/runs.tar (metrics, configs,
# results, without checkpoints) and the exported model folder(s).
set -uo pipefail
OUT=${OUT:-/tmp/reproduce}
RUNS=${RUNS:-anml scratch}
source "$(dirname "$0")/_carry_data.sh"  # sets DATA (unpacking a gzipped cache)
WIDE_LRS=${WIDE_LRS:-0.004,0.003,0.002,0.0015,0.001,0.0006,0.0004,0.0003,0.0002,0.0001,0.00006,0.00003,0.00001}
BUDGET_S=${BUDGET_S:-570}
LOG=$OUT/log.txt
mkdir -p "$OUT" runs
export ANML_FAST_CACHE=/tmp/anml-cache
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -m pip install --no-build-isolation --no-deps -e . >> "$LOG" 2>&1 || { tail -30 "$LOG"; exit 1; }
echo "built after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 s
  shift 2
  s=$(date +%s)
  echo "== $name: $*" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - s )) s" | tee -a "$LOG"
}

for run in $RUNS; do
  case $run in
    anml)
      step train-anml 220 anml-fast meta-train --data "$DATA" --out runs/anml-seed9 --quiet
      tail -2 runs/anml-seed9/metrics.jsonl
      step export-anml 60 anml-fast export-model runs/anml-seed9 --out "$OUT/anml-seed9" \
        --note "anml-fast meta-train --out runs/anml-seed9 (defaults: 20000 first-order steps, seed 9)"
      step eval-anml 150 anml-fast evaluate runs/anml-seed9 --data "$DATA" --out runs/eval-anml-seed9 --quiet ;;
    scratch)
      step eval-scratch 150 anml-fast evaluate --scratch --data "$DATA" --out runs/eval-scratch --quiet ;;
    oml)
      step train-oml 260 anml-fast meta-train --model oml --inner-lr 0.03 --meta-lr 0.0001 --data "$DATA" \
        --out runs/oml-seed9 --quiet
      step export-oml 60 anml-fast export-model runs/oml-seed9 --out "$OUT/oml-seed9"
      step eval-oml 150 anml-fast evaluate runs/oml-seed9 --data "$DATA" --out runs/eval-oml-seed9 --quiet ;;
    iid)
      step eval-iid 150 anml-fast evaluate "${MODEL:-$OUT/anml-seed9}" --iid --data "$DATA" \
        --out runs/eval-anml-seed9-iid --quiet ;;
    widelr)
      step eval-widelr 170 anml-fast evaluate "${MODEL:-$OUT/anml-seed9}" --lrs "$WIDE_LRS" --data "$DATA" \
        --out runs/eval-anml-seed9-widelr --quiet ;;
    seeds)
      for seed in ${SEEDS:-1 2 3}; do
        step "train-seed$seed" 260 anml-fast meta-train --seed "$seed" --steps "${STEPS:-20000}" --data "$DATA" \
          --out "runs/anml-s$seed" --quiet
        step "eval-seed$seed" 170 anml-fast evaluate "runs/anml-s$seed" --lrs "$WIDE_LRS" --data "$DATA" \
          --out "runs/eval-anml-s$seed-widelr" --quiet
      done ;;
    second)
      if [ -n "${RESUME_PACK:-}" ]; then
        tar xf "$RESUME_PACK/runs.tar" runs/anml2-seed9
        cat "$RESUME_PACK"/checkpoint.part-* > runs/anml2-seed9/checkpoint.safetensors
      fi
      step train-second "${SECOND_S:-420}" anml-fast meta-train --second-order --steps "${STEPS:-20000}" \
        --data "$DATA" --out runs/anml2-seed9 --resume --quiet
      tail -1 runs/anml2-seed9/metrics.jsonl
      if [ -f runs/anml2-seed9/model.safetensors ]; then
        step export-second 60 anml-fast export-model runs/anml2-seed9 --out "$OUT/anml2-seed9"
        step eval-second 170 anml-fast evaluate runs/anml2-seed9 --lrs "$WIDE_LRS" --data "$DATA" \
          --out runs/eval-anml2-seed9-widelr --quiet
      else
        split -b 15m -d runs/anml2-seed9/checkpoint.safetensors "$OUT/checkpoint.part-"
        echo "== second: unfinished; checkpoint left in $OUT/checkpoint.part-* with runs.tar" | tee -a "$LOG"
      fi ;;
    tests)
      left=$(( BUDGET_S - ($(date +%s) - t0) ))
      if [ "$left" -ge "${TEST_MIN_S:-40}" ]; then
        step tests "$left" python3 -m pytest -q -p no:cacheprovider --tb=short -rfE ${TESTS:-tests}
      else
        echo "== tests: skipped, $left s left" | tee -a "$LOG"
      fi ;;
    *) echo "reproduce.sh: unknown run '$run'" | tee -a "$LOG" ;;
  esac
done
tar cf "$OUT/runs.tar" --exclude='*.safetensors' --exclude=tb runs
grep -E "classes  lr|^== .*exit|error" "$LOG" | tail -40

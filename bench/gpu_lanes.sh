#!/usr/bin/env bash
# The GPU work of one session on a machine of 4 GPUs (the device tool's nvidia-h100-x4), in
# "lanes": one sequence of plain CLI commands per GPU, started detached (setsid) so that they run
# on between the device calls that start, watch and collect them (the machine stays held while the
# calls follow each other). What each lane runs:
#   all GPUs  with SCALING=1 only: bench/scaling.py (weak scaling of meta-training, strong scaling
#             of the 600-class protocol, 1, 2 and 4 GPUs), first, alone on the machine, in `start`
#   lane 0    the tile sweep of the output-layer Adam kernel (bench/tune_output_layer.py), then
#             the end-to-end benchmark rows (E2E_ROWS, E2E_ARGS) on the shipped faithful model
#             with the sweep's winning tiles, then OML (20,000 first-order steps, seed 9, the
#             reference budget, OML's own learning rates and unit-scale images: see reproduce.sh)
#             and its full evaluation
#   lane 1-3  an improved configuration (IMPROVED flags, or IMPROVED_<lane> for one lane; seeds
#             1, 2, 3; run folders LABEL-s<seed>), then its full evaluation with the wide
#             learning-rate grid (chosen on meta-test train accuracy, as always)
#   lane 1    then the faithful evaluation of the shipped model, exactly as docs/results.md lists
#             it (anml-fast evaluate pretrained:anml), to check that it reproduces
#   every lane  with TESTS=1 finally a quarter of the test suite (TESTS_<lane>)
# Usage (each a device call; OUT is the call's $OUT):
#   bash bench/gpu_lanes.sh start          build, (scaling,) start the lanes, watch until START_WATCH_S
#   bash bench/gpu_lanes.sh wait SECONDS   watch the lanes until they end or SECONDS pass
#   bash bench/gpu_lanes.sh collect        export the LABEL model with the best meta-test train
#                                          accuracy at 600 classes, pack everything in $OUT
# Carry a prepared Omniglot cache as .carry/omniglot.safetensors (`anml-fast prepare-data --out`),
# or gzipped (see _carry_data.sh).
set -uo pipefail
CMD=${1:-start}
W=/tmp/lanes                       # outlives the call that wrote it, not the machine
OUT=${OUT:-/tmp/lanes-out}
WIDE_LRS=${WIDE_LRS:-0.004,0.003,0.002,0.0015,0.001,0.0006,0.0004,0.0003,0.0002,0.0001,0.00006,0.00003,0.00001}
IMPROVED=${IMPROVED:---steps 40000 --meta-lr-schedule cosine}
# LABEL names the improved runs; `start` records it so that `collect` (a later call) finds them
LABEL=${LABEL:-$(cat /tmp/lanes/label 2>/dev/null || echo anml-improved)}
export LABEL IMPROVED
E2E_ROWS=${E2E_ROWS:-traj,protocol,schedule}
E2E_ARGS=${E2E_ARGS:-}
source "$(dirname "$0")/_carry_data.sh"  # sets DATA (unpacking a gzipped cache)
TESTS_0=${TESTS_0:-tests/test_gpu_trainer.py tests/test_cli.py tests/test_data.py tests/test_models.py tests/test_compare.py}
TESTS_1=${TESTS_1:-tests/test_distributed.py tests/test_ops_conv_block.py tests/test_reference_import.py}
TESTS_2=${TESTS_2:-tests/test_evaluation.py tests/test_gpu_evaluation.py tests/test_ops_gated_head.py tests/test_inner_step.py tests/test_pretrained.py}
TESTS_3=${TESTS_3:-tests/test_backends.py tests/test_finetune_batched.py tests/test_meta_step.py tests/test_ops_multi_tensor.py tests/test_ops_output_layer.py tests/test_ops_reference.py tests/test_trainer.py}
export ANML_FAST_CACHE=/tmp/anml-cache PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} \
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$W/runs" "$OUT"
R=$W/runs                          # the run folders

step() {  # step LOG NAME LIMIT_S COMMAND...: run with a time limit, log the command, status and time
  local log=$1 name=$2 limit=$3 s
  shift 3
  s=$(date +%s)
  echo "== $name: $*" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - s )) s" >> "$log"
}

lane() {  # lane N: the lane's commands, on GPU N
  local n=$1 log=$W/lane$1.log
  export CUDA_VISIBLE_DEVICES=$n
  if [ "$n" = 0 ]; then
    step "$log" tune-output-layer 360 python3 bench/tune_output_layer.py --out "$W/bench"
    local tiles=()
    for f in "$W"/bench/tune-output-layer-*.json; do [ -f "$f" ] && tiles=(--output-layer-tiles "$f"); done
    step "$log" end-to-end 600 python3 bench/end_to_end.py --data "$DATA" --rows "$E2E_ROWS" \
      --model pretrained:anml --out "$W/bench" --eval-out $R/eval-anml-seed9-e2e ${tiles[@]+"${tiles[@]}"} $E2E_ARGS
    step "$log" train-oml 480 anml-fast meta-train --model oml --inner-lr 0.03 --meta-lr 0.0001 --data "$DATA" \
      --out $R/oml-seed9 --quiet
    step "$log" eval-oml 360 anml-fast evaluate $R/oml-seed9 --data "$DATA" --out $R/eval-oml-seed9 --quiet
  else
    local flags_var="IMPROVED_$n"  # per-lane override, e.g. IMPROVED_2="--steps 30000 --meta-lr-schedule cosine"
    local flags=${!flags_var:-$IMPROVED}
    echo "lane $n flags: $flags" >> "$log"
    step "$log" "train-$LABEL-s$n" 1100 anml-fast meta-train --seed "$n" $flags --data "$DATA" \
      --out "$R/$LABEL-s$n" --quiet
    step "$log" "eval-$LABEL-s$n" 420 anml-fast evaluate "$R/$LABEL-s$n" --lrs "$WIDE_LRS" \
      --data "$DATA" --out "$R/eval-$LABEL-s$n" --quiet
    if [ "$n" = 1 ]; then
      step "$log" eval-anml-repro 360 anml-fast evaluate pretrained:anml --data "$DATA" \
        --out $R/eval-anml-seed9-repro --quiet
    fi
  fi
  if [ "${TESTS:-0}" = 1 ]; then
    local tests_var="TESTS_$n"
    # a quarter of the host's cores per lane: four pytest processes of 64 threads each, beside the
    # training runs, left the CPU-side tests crawling past their limit (2026-11-27)
    OMP_NUM_THREADS=$(( $(nproc --all) / 4 > 0 ? $(nproc --all) / 4 : 1 )) step "$log" "tests-$n" 480 python3 -m pytest -q -p no:cacheprovider --tb=short -rfE ${!tests_var}
  fi
  touch "$W/lane$n.done"
}

report() {
  for n in 0 1 2 3; do
    [ -f "$W/lane$n.log" ] || continue
    echo "--- lane $n $( [ -f "$W/lane$n.done" ] && echo done || echo running)"
    grep -E "^== .*exit|classes  lr|passed|failed|error" "$W/lane$n.log" | tail -14
  done
  cp "$W"/lane*.log "$OUT"/ 2>/dev/null || true
}

case $CMD in
  start)
    t0=$(date +%s)
    echo "$LABEL" > "$W/label"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$W/cards.txt"
    python3 -m pip install --no-build-isolation --no-deps -e . > "$W/build.log" 2>&1 || { tail -40 "$W/build.log"; exit 1; }
    echo "built after $(( $(date +%s) - t0 )) s"
    if [ "${SCALING:-0}" = 1 ]; then
      timeout "${SCALING_S:-330}" python3 bench/scaling.py --data "$DATA" --gpus 1,2,4 --out "$W/bench" \
        > "$W/scaling.log" 2>&1
      echo "scaling exit $? after $(( $(date +%s) - t0 )) s"; tail -20 "$W/scaling.log"
    fi
    for n in 0 1 2 3; do
      setsid nohup bash "$0" lane "$n" < /dev/null > "$W/lane$n.out" 2>&1 &
    done
    sleep "${START_WATCH_S:-60}"; report ;;
  lane) lane "$2" ;;
  wait)
    end=$(( $(date +%s) + ${2:-540} ))
    while [ "$(date +%s)" -lt "$end" ] && [ "$(ls "$W"/lane*.done 2>/dev/null | wc -l)" -lt 4 ]; do sleep 10; done
    report ;;
  collect)
    report
    best=$(python3 - <<'EOF'
import json, pathlib
best = None
import os
for p in sorted(pathlib.Path("/tmp/lanes/runs").glob(f"eval-{os.environ['LABEL']}-s*/results.json")):
    r = json.loads(p.read_text())["results"][0]  # evaluate writes {"results": [one system]}
    rec = r["class_counts"].get("600")
    if rec:
        acc = rec["final"]["train_mean"]
        if best is None or acc > best[0]:
            best = (acc, p.parent.name.replace("eval-", ""))
print(best[1] if best else "")
EOF
)
    echo "$LABEL model with the best meta-test train accuracy at 600 classes: ${best:-none}"
    if [ -n "$best" ] && [ "${EXPORT:-1}" = 1 ]; then
      anml-fast export-model "$R/$best" --out "$OUT/$LABEL" --quiet \
        --note "bench/gpu_lanes.sh lane ${best##*-s} (its flags are in provenance.train); chosen among lanes 1-3 on 600-class meta-test train accuracy"
    fi
    tar cf "$OUT/results.tar" --exclude='*.safetensors' --exclude=tb -C "$W" runs bench $(cd "$W" && ls *.log *.txt) 2>/dev/null
    rm -f "$OUT"/lane*.log  # in results.tar; at most 8 files come back
    ls -la "$OUT" "$OUT/$LABEL" 2>/dev/null ;;
  *) echo "gpu_lanes.sh: unknown command '$CMD' (start, wait SECONDS, collect)"; exit 2 ;;
esac

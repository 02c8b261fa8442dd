#!/usr/bin/env bash
# One call on the GPU machine (the device tool) that checks and measures everything GPU-side:
#   build the extension there, run the whole test suite (GPU tests included), run every kernel
#   benchmark (bench/run_all.py), chosen end-to-end rows (E2E_ROWS=step1,traj,...: bench/end_to_end.py)
#   and the demo on the fused ops. Logs and tables go to $OUT. BENCH=0 skips the kernel benchmarks.
# Carry a prepared Omniglot cache as .carry/omniglot.safetensors (`anml-fast prepare-data --out`).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session}
source "$(dirname "$0")/_carry_data.sh"  # sets DATA (unpacking a gzipped cache)

mkdir -p "$OUT"
export ANML_FAST_CACHE=/tmp/anml-cache MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
python3 -c "import json, anml_fast.ops as o; print(json.dumps(o.available(), indent=1))" | tee "$OUT/available.json"
timeout ${TEST_S:-330} python3 -m pytest -q -p no:cacheprovider --durations=15 -rfE tests ${TESTARGS:-} > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30; tail -25 "$OUT/tests.log"
if [ "${BENCH:-1}" = 1 ]; then
  timeout ${BENCH_S:-200} python3 bench/run_all.py --out "$OUT" > "$OUT/bench.log" 2>&1; echo "bench exit $?"; tail -60 "$OUT/bench.log"
fi
if [ -n "${E2E_ROWS:-}" ]; then
  timeout ${E2E_S:-240} python3 bench/end_to_end.py --data "$DATA" --rows "$E2E_ROWS" \
    --out "$OUT" ${E2E_ARGS:-} > "$OUT/e2e.log" 2>&1; echo "end_to_end exit $?"; tail -30 "$OUT/e2e.log"
fi
if [ "${DEMO:-0}" = 1 ]; then
  anml-fast demo --data "$DATA" --out /tmp/demo --quiet > "$OUT/demo.log" 2>&1
  tail -15 "$OUT/demo.log"
fi

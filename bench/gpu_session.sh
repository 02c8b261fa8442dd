#!/usr/bin/env bash
# One GPU machine's check of everything GPU-side (the device tool's single-GPU kinds):
#   build the extension there, time chosen end-to-end rows first, alone on the card
#   (E2E_ROWS=traj,protocol,...: bench/end_to_end.py, merged into bench/results/end-to-end-<card>.json),
#   then with PROFILE=1 the kernel profiles of the meta-steps and the PLN inner step
#   (bench/profile_meta_step.py), with HOST_COST=1 the eager calls' host time (bench/host_cost.py;
#   HOST_COST_ROWS=part,part... times only the rows whose names hold one),
#   with BENCH=1
#   every kernel benchmark (bench/run_all.py), then (unless TESTS=0) the whole test suite, GPU
#   tests included, in TEST_GROUPS parallel pytest processes over the test files (the real-data
#   tests run too when the PNGs travel as .carry/omniglot-png.tar.gz), then with DEMO=1 the demo.
# Logs and tables go to $OUT (default /tmp/gpu-session). Set ANML_FAST_COMMIT to the commit the
# tree is at: the device's copy may carry a stale .git, and the tables name their run.
# It can run detached across device calls:
#   setsid nohup bash bench/gpu_session.sh > /tmp/gpu-session.log 2>&1 &   (then poll for DONE)
# Carry a prepared Omniglot cache as .carry/omniglot.safetensors (`anml-fast prepare-data --out`),
# or gzipped (see _carry_data.sh).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session}
source "$(dirname "$0")/_carry_data.sh"  # sets DATA (unpacking a gzipped cache)

mkdir -p "$OUT"
rm -f "$OUT/DONE"
export ANML_FAST_CACHE=/tmp/anml-cache MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
python3 -c "import json, anml_fast.ops as o; print(json.dumps(o.available(), indent=1))" | tee "$OUT/available.json"
if [ -n "${E2E_ROWS:-}" ]; then
  timeout ${E2E_S:-300} python3 bench/end_to_end.py --data "$DATA" --rows "$E2E_ROWS" --model pretrained:anml \
    --out bench/results --eval-out /tmp/eval-e2e ${E2E_ARGS:-} > "$OUT/e2e.log" 2>&1
  echo "end_to_end exit $?"; tail -30 "$OUT/e2e.log"
  cp bench/results/end-to-end-*.json bench/results/end-to-end-*.md "$OUT"/ 2>/dev/null
fi
if [ "${PROFILE:-0}" = 1 ]; then  # where the meta-steps' time goes (bench/profile_meta_step.py)
  for order in "" --second-order; do
    timeout ${PROFILE_S:-180} python3 bench/profile_meta_step.py --data "$DATA" $order --out "$OUT" \
      > "$OUT/profile${order:+-second}.log" 2>&1
    echo "profile_meta_step $order exit $?"; head -40 "$OUT/profile${order:+-second}.log"
  done
  timeout ${PROFILE_S:-180} python3 bench/profile_meta_step.py --inner-step --out "$OUT" > "$OUT/profile-inner.log" 2>&1
  echo "profile_meta_step --inner-step exit $?"; head -70 "$OUT/profile-inner.log"
fi
if [ "${HOST_COST:-0}" = 1 ]; then  # eager batch-1 calls' host time (bench/host_cost.py)
  # a --rows run merges into the card's earlier table, which it looks for in its --out folder
  [ -n "${HOST_COST_ROWS:-}" ] && cp -n bench/results/host-cost-*.json "$OUT"/ 2>/dev/null
  timeout ${HOST_COST_S:-300} python3 bench/host_cost.py --out "$OUT" --rows "${HOST_COST_ROWS:-}" > "$OUT/host_cost.log" 2>&1
  echo "host_cost exit $?"; tail -14 "$OUT/host_cost.log"
fi
if [ "${BENCH:-0}" = 1 ]; then
  timeout ${BENCH_S:-420} python3 bench/run_all.py --out "$OUT" > "$OUT/bench.log" 2>&1; echo "bench exit $?"; tail -60 "$OUT/bench.log"
fi
if [ "${TESTS:-1}" = 0 ]; then touch "$OUT/DONE"; exit 0; fi
if [ -f .carry/omniglot-png.tar.gz ] && [ ! -d /tmp/omniglot/omniglot-py ]; then
  mkdir -p /tmp/omniglot && tar xzf .carry/omniglot-png.tar.gz -C /tmp/omniglot
fi
[ -d /tmp/omniglot/omniglot-py ] && export ANML_FAST_DATA=/tmp/omniglot
# every test file, dealt round-robin into the groups. A group takes 2-8 minutes on a 16-core H200
# machine (the CPU inductor compiles are slow beside the other groups): TEST_S allows 15. On a
# machine of several GPUs (the device tool's -x2/-x4 kinds) group g runs on GPU g mod their number.
mapfile -t files < <(ls tests/test_*.py)
groups=${TEST_GROUPS:-3}
[ "$groups" -ge 1 ] 2>/dev/null || groups=1
[ "$groups" -le "${#files[@]}" ] || groups=${#files[@]}  # an empty group would run the whole suite
n_gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$n_gpus" -ge 1 ] || n_gpus=1
for g in $(seq 0 $(( groups - 1 ))); do
  mine=()
  for i in "${!files[@]}"; do [ $(( i % groups )) = "$g" ] && mine+=("${files[$i]}"); done
  cvd=()
  [ "$n_gpus" -gt 1 ] && cvd=(CUDA_VISIBLE_DEVICES=$(( g % n_gpus )))
  env "${cvd[@]}" OMP_NUM_THREADS=$(( $(nproc) / groups > 0 ? $(nproc) / groups : 1 )) timeout ${TEST_S:-900} \
    python3 -m pytest -q -p no:cacheprovider --durations=8 -rfE "${mine[@]}" ${TESTARGS:-} > "$OUT/tests-$g.log" 2>&1 &
done
wait
for g in $(seq 0 $(( groups - 1 ))); do
  echo "--- tests group $g"; grep -E "^(FAILED|ERROR)" "$OUT/tests-$g.log" | head -20; tail -3 "$OUT/tests-$g.log"
done
if [ "${DEMO:-0}" = 1 ]; then
  anml-fast demo --data "$DATA" --out /tmp/demo --quiet > "$OUT/demo.log" 2>&1
  tail -15 "$OUT/demo.log"
fi
touch "$OUT/DONE"

#!/usr/bin/env bash
# One call on the GPU machine: build the extension in place (for its GPU) and run the self-check
# (python -m ultron_kernels --bench: $OUT/selfcheck.json), GPU test suite, compute-sanitizer
# (memcheck, racecheck) on the CUDA kernels, the demo, the quick benchmark. Logs, JUnit XML
# and benchmark JSON/plots land in $OUT. Each step has its own time limit; all steps together
# exceed one 10-minute device call, so split them over three calls, made back to back so
# that the machine stays warm and `build` finds its objects (a fresh machine rebuilds in
# 1-2 minutes; the benchmark saves its JSON after every case, so a timeout keeps them):
#   bash tools/gpu_check.sh build tests
#   bash tools/gpu_check.sh build sanitizer profile demo
#   bash tools/gpu_check.sh build bench
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# TORCH_CUDA_ARCH_LIST unset: setup.py builds for this machine's GPU.
export MAX_JOBS=${MAX_JOBS:-16}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(build tests sanitizer profile demo bench)
summary=()
status=0

run() {  # run NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/gpu_check.log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-10s exit %-3s %4ss' "$name" "$rc" $((SECONDS - start)))")
  [ "$rc" = 0 ] || status=1
}

for step in "${steps[@]}"; do
  case $step in
    build) run build 240 $PY setup.py build_ext --inplace &&
             run selfcheck 120 $PY -m ultron_kernels --bench --json "$OUT/selfcheck.json" ;;
    tests) run tests 480 $PY -m pytest -q -rs tests --junitxml="$OUT/tests.xml" ;;
    sanitizer)
      run memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 9 $PY tools/sanitizer_workload.py
      run racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 $PY tools/sanitizer_workload.py ;;
    demo) run demo 180 $PY -m ultron demo ;;
    profile)  # per kernel: time, DRAM bytes and throughput, LSU wavefronts (see bench/NOTES.md)
      run profile 150 ncu --clock-control none --target-processes all --kernel-name "regex:dilated|window|gather|grad_weight" \
        --metrics gpu__time_duration.sum,dram__bytes.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__data_pipe_lsu_wavefronts.sum,smsp__inst_executed.sum \
        --csv --log-file "$OUT/ncu.csv" $PY tools/profile_workload.py ;;
    bench) run bench 420 $PY -m bench --preset quick --out "$OUT" ;;
    *) echo "unknown step $step (build tests sanitizer demo profile bench)"; exit 2 ;;
  esac
done
echo
echo "gpu-check summary:"
printf '  %s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit $status

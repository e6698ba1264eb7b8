#!/usr/bin/env bash
# One call on the GPU machine: build the extension in place, GPU test suite, compute-sanitizer
# (memcheck, racecheck) on the CUDA kernels, quick benchmark. Logs and JSON land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
status=0
step() { echo "== $1"; shift; "$@" 2>&1 | tee -a "$OUT/gpu_check.log"; local rc=${PIPESTATUS[0]}; echo "   exit $rc"; [ "$rc" = 0 ] || status=1; summary+=("$rc  $STEP"); }
summary=()
STEP=build;     step build $PY setup.py build_ext --inplace
STEP=gpu-tests; step gpu-tests $PY -m pytest -q -x tests -m "gpu or not slow" --junitxml="$OUT/tests.xml"
STEP=memcheck;  step memcheck compute-sanitizer --tool memcheck --error-exitcode 9 $PY tools/sanitizer_workload.py
STEP=racecheck; step racecheck compute-sanitizer --tool racecheck --error-exitcode 9 $PY tools/sanitizer_workload.py
STEP=bench;     step bench $PY -m bench --preset quick --out "$OUT"
echo; echo "gpu-check summary (exit code, step):"; printf '  %s\n' "${summary[@]}"
exit $status

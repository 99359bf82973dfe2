#!/usr/bin/env bash
# One-call GPU check for a lent H100/H200 (see benches/README.md). In order of value:
# build fastdf._C, the `gpu`-marked tests, the quick benchmarks of every suite, then the
# rest of the tests on CUDA tensors. Each phase has a time limit (worst case ~8.5 min in
# all; typical less) and what a phase finished before its limit is kept: the benchmark
# JSON is rewritten after every case. Everything lands in $OUT (default
# benches/results/local): gpu_check.log, gpu_tests.xml, bench.json, bench.md, bench.png.
#
# Knobs: BENCH_SUITES="attention moe" (default all), FULL_SUITES="attention" (extra
# non-quick runs after everything, each up to 7 min: only with device time to spare),
# SKIP_ALL_TESTS=1, and the per-phase limits below.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benches/results/local}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 FASTDF_FORCE_CUDA=1
export FASTDF_CUDA_ARCHS=${FASTDF_CUDA_ARCHS:-90a}   # Hopper only: halves the build
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
status=0
phase() {  # phase NAME SECONDS CMD...: run with a limit, log it, remember failures
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s ===" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}
# Per-test limit where pytest-timeout is installed (it is on the GPU image).
PER_TEST=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=${PER_TEST_S:-100}")

{ nvidia-smi; $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"; nvcc --version | tail -2; git log -1 --oneline 2>/dev/null; } 2>&1 | tee -a "$LOG"

phase build "${BUILD_S:-120}" $PY -m pip install --no-build-isolation --no-deps --no-cache-dir -q -e .
phase import 30 $PY -c "import fastdf, fastdf._C as C; print('fastdf', fastdf.__version__, '| _C devices:', C.device_count(), '| backends:', fastdf.available_backends('cuda'))"
phase gpu-tests "${GPU_TESTS_S:-120}" $PY -m pytest tests -m gpu -q -p no:cacheprovider $PER_TEST --junitxml="$OUT/gpu_tests.xml"
SUITE_ARGS=""
for s in ${BENCH_SUITES:-}; do SUITE_ARGS="$SUITE_ARGS --suite $s"; done
phase bench "${BENCH_S:-180}" $PY -m fastdf.bench --quick --no-progress $SUITE_ARGS --json "$OUT/bench.json" --plot "$OUT/bench.png" --markdown "$OUT/bench.md"
if [ -z "${SKIP_ALL_TESTS:-}" ]; then
  phase all-tests "${ALL_TESTS_S:-60}" $PY -m pytest tests -m "not gpu" -q -x -p no:cacheprovider $PER_TEST
fi
for s in ${FULL_SUITES:-}; do
  phase "full-$s" 420 $PY -m fastdf.bench --suite "$s" --no-progress --json "$OUT/full-$s.json" --markdown "$OUT/full-$s.md"
done

echo "gpu_check: $([ $status -eq 0 ] && echo PASSED || echo FAILED) (log: $LOG)" | tee -a "$LOG"
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
exit $status

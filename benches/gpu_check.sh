#!/usr/bin/env bash
# One-call GPU check for a lent H100/H200 (see benches/README.md). Builds fastdf._C,
# prints the machine, runs the GPU tests and the whole suite on CUDA tensors, then the
# quick benchmarks. Everything lands in $OUT (default: benches/results/local); each phase
# has its own time limit so the whole script ends well inside 8 minutes.
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

{ nvidia-smi; $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"; nvcc --version | tail -2; git log -1 --oneline 2>/dev/null; } 2>&1 | tee -a "$LOG"

phase build 120 $PY -m pip install --no-build-isolation --no-deps --no-cache-dir -q -e .
phase import 30 $PY -c "import fastdf, fastdf._C as C; print('fastdf', fastdf.__version__, '| _C devices:', C.device_count(), '| backends:', fastdf.available_backends('cuda'))"
phase gpu-tests 90 $PY -m pytest tests -m gpu -q -x -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
phase all-tests 90 $PY -m pytest tests -m "not gpu" -q -p no:cacheprovider
phase bench 120 $PY -m fastdf.bench --quick --no-progress --json "$OUT/bench.json" --plot "$OUT/bench.png" --markdown "$OUT/bench.md"
# Opt-in full runs (autotuned kernels, compiled FlexAttention), e.g. FULL_SUITES="attention adaln".
for s in ${FULL_SUITES:-}; do
  phase "full-$s" 420 $PY -m fastdf.bench --suite "$s" --no-progress --json "$OUT/full-$s.json" --markdown "$OUT/full-$s.md"
done

echo "gpu_check: $([ $status -eq 0 ] && echo PASSED || echo FAILED) (log: $LOG)" | tee -a "$LOG"
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
exit $status

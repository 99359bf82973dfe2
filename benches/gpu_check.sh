#!/usr/bin/env bash
# One-call GPU check for a lent H100/H200 (see benches/README.md). In order of value:
# build fastdf._C, the `gpu`-marked tests, compute-sanitizer (memcheck, racecheck, synccheck)
# over every csrc kernel, the quick benchmarks of every suite, then the rest of the tests
# on CUDA tensors. Each phase has a time limit (worst case ~13 min in all, ~8.5 with
# SKIP_SANITIZE=1; typical less) and what a phase finished before its limit is kept: the benchmark
# JSON is rewritten after every case. Everything lands in $OUT (default
# benches/results/local): gpu_check.log, gpu_tests.xml, bench.json, bench.md, bench.png.
#
# Knobs: BENCH_SUITES="attention moe" (default all), FULL_SUITES="attention" (extra
# non-quick runs after everything, each up to 7 min: only with device time to spare),
# SKIP_ALL_TESTS=1, SKIP_SANITIZE=1, and the per-phase limits below.
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
# compute-sanitizer over every csrc kernel (the CPU harness in tests/cuda_cpu cannot see
# true concurrency, the memory model or timing: benches/notes/cuda_cpu.md). The driver
# calls fastdf._C directly on small edge-case inputs; torch's caching allocator is off so
# memcheck sees each tensor's real bounds. SKIP_SANITIZE=1 skips, SANITIZE_S per tool.
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -z "${SKIP_SANITIZE:-}" ] && [ -x "$SANITIZER" ]; then
  DRIVER="$OUT/sanitize_driver.py"
  cat > "$DRIVER" <<'PYEOF'
import torch
import fastdf._C as C

dev = torch.device("cuda")
codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
s = torch.cuda.current_stream().cuda_stream


def sample(x, cap, k=5, p=0.9):
    n = x.shape[0]
    u = torch.rand(n, device=dev)
    out = torch.empty(n, dtype=torch.int64, device=dev)
    st = torch.empty(n, dtype=torch.int32, device=dev)
    C.sample_from_logits(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), x.stride(1), codes[x.dtype], u.data_ptr(),
                         0, n, 0, 0, 0, 0, 1.0, k, p, 0.0, out.data_ptr(), st.data_ptr(), cap, s, 0)


g = torch.Generator(device=dev).manual_seed(0)
sample(torch.randint(-3, 4, (1, 2049), device=dev, generator=g).half(), 2048)  # issue 10's reproducer
for vocab, dtype in ((33, torch.float32), (6145, torch.bfloat16), (32000, torch.float16), (152064, torch.float32)):
    x = (torch.randn(2, vocab, device=dev, generator=g) * 3).to(dtype)
    for cap in (-1, 0, 2048):
        sample(x, cap)
    sample(x[:, : vocab - 1], -1, k=0, p=0.5)  # rows not 16-byte aligned: the element-wise loads
for E, n in ((1, 10), (7, 3000), (12287, 1500)):
    ids = torch.randint(-1, E + 1, (n,), device=dev, generator=g)
    order, inverse, offs = (torch.empty(n, dtype=torch.int32, device=dev) for _ in range(3))
    offs = torch.empty(E, dtype=torch.int32, device=dev)
    ws = torch.empty(-(-n // C.moe_route_chunk) * (E + 1), dtype=torch.int32, device=dev)
    C.moe_route(ids.data_ptr(), False, n, E, order.data_ptr(), inverse.data_ptr(), offs.data_ptr(), ws.data_ptr(), s, 0)
    x = torch.randn(n, 40, device=dev).half()
    y = torch.empty(n, 40, device=dev).half()
    C.moe_gather(x.data_ptr(), 40, 1, order.data_ptr(), n, 40, y.data_ptr(), 40, 1, 2, s, 0)
    w = torch.rand(n, device=dev)
    out = torch.empty(n, 40, device=dev).half()
    C.moe_combine(y.data_ptr(), 40, 1, inverse.data_ptr(), n, 1, 40, w.data_ptr(), out.data_ptr(), 40, 1, 1, s, 0)
for d in (1, 33, 257):
    o_a, o_b = torch.randn(2, 3, 5, d, device=dev).bfloat16(), torch.randn(2, 3, 5, d, device=dev).bfloat16()
    la, lb = torch.randn(2, 3, 5, device=dev), torch.randn(2, 3, 5, device=dev)
    la[0, 0, 0], lb[0, 0, 0], la[1, 0, 0] = float("-inf"), float("-inf"), float("nan")
    o, lse = torch.empty_like(o_a), torch.empty_like(la)
    v = lambda t: (t.data_ptr(), [0, *t.stride()] if t.dim() == 4 else [0, *t.stride(), 0])  # noqa: E731
    C.merge_attention_states(v(o_a), v(la), v(o_b), v(lb), v(o), v(lse), [1, 2, 3, 5, d], 2, s, 0)
torch.cuda.synchronize()
print("sanitize driver: every csrc kernel ran")
PYEOF
  for tool in memcheck racecheck synccheck; do
    phase "sanitize-$tool" "${SANITIZE_S:-90}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 $PY "$DRIVER"
  done
fi
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

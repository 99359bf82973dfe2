"""Part of this suite again, in a subprocess, on the ASan+UBSan build of csrc/ (-O1): out
of bounds host-visible accesses, reads of shared memory past every __shared__ variable
(the unused arena is ASan-poisoned), undefined behaviour (shifts, overflow, misaligned or
type-confused accesses UBSan sees) abort the run with a report."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cuda_cpu_harness as harness

HERE = Path(__file__).resolve().parent
SUBSET = ("regression or route_random or chunk_boundaries or most_experts or combine or gather or shapes_and "
          "or non_finite or well_behaved or ties_at or every_candidate_cap")


def _asan_env():
    cxx = harness.compiler()
    if cxx is None:
        pytest.skip("g++ not found")
    if os.environ.get("FASTDF_CUDA_CPU_VARIANT") == "asan":
        pytest.skip("already the sanitizer run")
    harness.build("asan")  # compiled here, so its time is this test's and a failure says so
    # libstdc++ preloaded too: python does not link it, and ASan's __cxa_throw interceptor
    # must find it at start-up, or the first C++ exception (a launch function's
    # invalid_argument) aborts.
    runtime = [subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
               for lib in ("libasan.so", "libstdc++.so")]
    return {**os.environ, "FASTDF_CUDA_CPU_VARIANT": "asan", "LD_PRELOAD": " ".join(runtime),
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "UBSAN_OPTIONS": "print_stacktrace=1"}


_SELFTEST = """
import ctypes, sys, torch
sys.path.insert(0, {here!r})
import cuda_cpu_harness as h
emu = h.Emu(h.build("asan"))
inp = emu.device(torch.arange(64, dtype=torch.int32))
out = emu.empty((64,), torch.int32)
f = emu.lib.emu_selftest
f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
print("rc", f({which}, inp.data_ptr(), out.data_ptr(), {n}))
"""


@pytest.mark.parametrize("which, n, expect", [(9, 0, "AddressSanitizer"), (10, 40, "runtime error: shift")])
def test_sanitizers_fire(which, n, expect):
    env = _asan_env()
    code = _SELFTEST.format(here=str(HERE), which=which, n=n)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and expect in res.stderr, res.stderr[-3000:]


def test_suite_subset_under_asan_and_ubsan(sweep):
    env = _asan_env()
    files = ["test_sampling_cpu.py", "test_moe_cpu.py", "test_cascade_cpu.py", "test_emulator.py"]
    expr = SUBSET if not sweep else "not sanitizers"
    if not sweep:
        expr = f"({expr}) and not (cap and (2047 or 4096 or 6143 or 1048576 or 2049))"
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-x", "-k", expr]  # -s: reports reach stderr
    cmd += [str(HERE / f) for f in files]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parents[1])
    tail = (res.stdout[-3000:] + "\n" + res.stderr[:6000])  # a sanitizer report starts stderr
    assert res.returncode == 0, tail
    assert " passed" in res.stdout, tail

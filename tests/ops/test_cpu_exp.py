"""The CPU attention kernels' exponentials (csrc/cpu/attention.cpp), checked exhaustively:
``vexp_nonpositive`` (the softmax's, with its subnormal path) gives ``vexp``'s bits for
every float with the sign bit set (2^31 values: every x <= 0, -0, -inf, the negative NaNs),
and ``vexp`` stays within 1 ulp of libm's ``expf`` where the kernels use it. The functions
are cut from the source as they are and compiled into a small program (g++, AVX-512 CPUs);
the tests that compare kernels with references cannot see a 1-ulp change of a subnormal
probability, this can. (exp_reduced and vexp live in common.h, which the program includes;
the MoE SwiGLU gradient uses vexp too.)"""

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from fastdf import _native

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "csrc" / "cpu" / "attention.cpp"

pytestmark = pytest.mark.skipif(_native.cpu_module() is None or shutil.which("g++") is None,
                                reason="needs fastdf._cpu's AVX-512 CPU and g++")

MAIN = r"""
int main() {
    uint64_t differ = 0, worst = 0;
    alignas(64) float buf[16];
    for (uint64_t b = 0x80000000u; b <= 0xFFFFFFFFu; b += 16) {
        for (int i = 0; i < 16; ++i) { const uint32_t u = (uint32_t)(b + i); std::memcpy(&buf[i], &u, 4); }
        __mmask16 seen = 0;
        const v16 x = load(buf), a = vexp(x), c = vexp_nonpositive(x, seen);
        for (int i = 0; i < 16; ++i) {
            uint32_t ua, uc;
            std::memcpy(&ua, &a[i], 4);
            std::memcpy(&uc, &c[i], 4);
            differ += !(ua == uc || (std::isnan(a[i]) && std::isnan(c[i])));
        }
    }
    // vexp against libm on [-110, 90] (every 97th float: ~22M values) and the specials
    for (uint32_t u = 0; u < 0xFFFFFFFFu - 97 * 16; u += 97 * 16) {
        for (int i = 0; i < 16; ++i) { const uint32_t w = u + 97u * i; std::memcpy(&buf[i], &w, 4); }
        const v16 a = vexp(load(buf));
        for (int i = 0; i < 16; ++i) {
            const float x = buf[i];
            if (!(x >= -110.0f && x <= 90.0f)) continue;
            const float want = std::exp(x);
            int32_t ua, uw;
            std::memcpy(&ua, &a[i], 4);
            std::memcpy(&uw, &want, 4);
            const uint64_t d = (uint64_t)(ua > uw ? ua - uw : uw - ua);
            worst = d > worst ? d : worst;
        }
    }
    const float sp[16] = {NAN, -NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 88.8f, -104.5f, 1.0f, -1.0f, 0, 0, 0, 0, 0, 0};
    const v16 s = vexp(load(sp));
    const bool specials = std::isnan(s[0]) && std::isnan(s[1]) && std::isinf(s[2]) && s[3] == 0.0f &&
                          s[4] == 1.0f && s[5] == 1.0f && std::isinf(s[6]) && s[7] == 0.0f;
    std::printf("%llu %llu %d\n", (unsigned long long)differ, (unsigned long long)worst, (int)specials);
    return 0;
}
"""


def _function(source: str, name: str) -> str:
    match = re.search(r"^INLINE v16 " + name + r"\(v16 x[^)]*\) \{\n.*?^\}\n", source, re.S | re.M)
    assert match, f"{name} not found in {SOURCE}"
    return match.group(0)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import pybind11

    source = SOURCE.read_text()
    program = "\n".join([
        f'#include "{ROOT / "csrc" / "cpu" / "common.h"}"', "#include <cmath>", "#include <cstdio>",
        "#pragma GCC push_options", '#pragma GCC target("arch=x86-64-v4")',
        _function(source, "vexp_nonpositive"), MAIN,  # exp_reduced and vexp: common.h
        "#pragma GCC pop_options", ""])
    work = tmp_path_factory.mktemp("cpu_exp")
    (work / "exp.cpp").write_text(program)
    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    # common.h includes pybind11, whose inline functions name libpython's symbols
    libdir, version = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDVERSION")
    libs = [f"-L{libdir}", f"-Wl,-rpath,{libdir}", f"-lpython{version}"]
    # setup.py's flags for fastdf._cpu (the same contractions into FMAs), less OpenMP
    build = subprocess.run(["g++", "-std=c++17", "-O3", "-w", *includes, str(work / "exp.cpp"), "-o", str(work / "exp"),
                            *libs], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    out = subprocess.run([str(work / "exp")], check=True, capture_output=True, text=True, timeout=300).stdout
    differ, worst, specials = (int(t) for t in out.split())
    return differ, worst, specials


def test_softmax_exponential_is_vexp_for_every_nonpositive_float(results):
    assert results[0] == 0, f"{results[0]} of the 2^31 sign-bit floats differ from vexp"


def test_vexp_within_one_ulp_of_libm(results):
    assert results[1] <= 1, f"vexp is {results[1]} ulp from libm's expf"
    assert results[2] == 1, "vexp's NaN / inf / 0 cases"

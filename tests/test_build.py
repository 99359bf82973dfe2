"""The CUDA extension: it builds (CI forces it), imports without a GPU, and says clearly
when it cannot run; the build refuses FASTDF_FORCE_CUDA=1 without nvcc. The CPU extension
(fastdf._cpu, CI forces it too): it imports, and the build refuses contradicting knobs."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdf import _native

ROOT = Path(__file__).resolve().parents[1]


def _extension():
    try:
        return _native.module()
    except ImportError as err:
        if os.environ.get("FASTDF_FORCE_CUDA") == "1":
            pytest.fail(f"FASTDF_FORCE_CUDA=1 but fastdf._C does not import: {err}")
        pytest.skip(f"fastdf._C not built: {err}")


def test_extension_imports():
    ext = _extension()
    assert ext.cuda_runtime_version >= 12000
    assert ext.device_count() >= 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_entry_point_without_gpu_raises_clearly():
    ext = _extension()
    view = (0, [0, 0, 0, 0, 1])
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        ext.merge_attention_states(view, view, view, view, view, view, [1, 1, 1, 1, 4], 0, 0, 0)


def test_cuda_backend_reason_is_clear_without_gpu():
    reason = _native.unavailable_reason()
    if torch.cuda.is_available() and reason is None:
        pytest.skip("the cuda backend is available here")
    assert reason and ("CUDA" in reason or "fastdf._C" in reason)


def test_force_cuda_without_nvcc_fails_with_advice(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_PATH", "FASTDF_SKIP_CUDA_BUILD")}
    env.update(PATH=str(bin_dir), CUDA_HOME=str(tmp_path / "no-cuda"), FASTDF_FORCE_CUDA="1")
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "FASTDF_FORCE_CUDA=1 but nvcc was not found" in out.stderr + out.stdout
    assert "CUDA_HOME" in out.stderr + out.stdout


def test_cpu_extension_imports_and_says_what_it_needs():
    try:
        import fastdf._cpu as cpu
    except ImportError as err:
        if os.environ.get("FASTDF_FORCE_CPU") == "1":
            pytest.fail(f"FASTDF_FORCE_CPU=1 but fastdf._cpu does not import: {err}")
        pytest.skip(f"fastdf._cpu not built: {err}")
    assert cpu.MAX_KEYS == 512 and cpu.MAX_DIM == 256
    reason = _native.cpu_unavailable_reason()
    if os.environ.get("FASTDF_TEST_NO_AVX512") == "1":  # conftest's stand-in for a CPU without AVX-512
        assert reason is not None and "FASTDF_TEST_NO_AVX512" in reason and _native.cpu_module() is None
        return
    assert (reason is None) == cpu.has_avx512()
    if reason is not None:
        assert "AVX-512" in reason


def test_cpu_build_knobs_that_contradict_are_refused():
    env = {**os.environ, "FASTDF_FORCE_CPU": "1", "FASTDF_SKIP_CPU_BUILD": "1"}
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "contradict" in out.stderr + out.stdout


def test_bad_arch_list_is_refused():
    env = {**os.environ, "FASTDF_CUDA_ARCHS": "sm_90;hopper"}
    env.pop("FASTDF_SKIP_CUDA_BUILD", None)
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)
    if "nvcc not found" in out.stderr:
        pytest.skip("no nvcc here: the arch list is only read when building")
    assert out.returncode != 0 and "FASTDF_CUDA_ARCHS: cannot read 'sm_90'" in out.stderr + out.stdout


# sample_kernel runs 512 threads per block: at <= 64 registers a thread, two blocks fit an
# SM's 64K registers (benches/notes/cuda_cpu.md: the intended occupancy); one more register
# halves it.
REGISTER_LIMITS = {"sample_kernel": 64}
PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _find_nvcc():
    """setup.py's search order: $CUDA_HOME/bin, PATH, /usr/local/cuda/bin."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _ptxas_report(nvcc, src, tmp):
    cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
           "-Xptxas", "-v", f"-I{ROOT / 'csrc'}", "-c", str(src), "-o", str(tmp / (src.name + ".o"))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    kernels, name = {}, None
    for line in (out.stdout + out.stderr).splitlines():
        if m := PTXAS_ENTRY.search(line):
            name = m.group(1)
            kernels[name] = {}
        elif name and (m := PTXAS_FRAME.search(line)):
            kernels[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif name and (m := PTXAS_REGS.search(line)):
            kernels[name]["registers"] = int(m.group(1))
    return kernels


def test_csrc_kernels_do_not_spill_on_sm90a(tmp_path):
    """Every csrc/ kernel compiled for sm_90a: no stack frame, no spills (ptxas -v), and
    the sampler within the register budget of its intended occupancy."""
    from concurrent.futures import ThreadPoolExecutor

    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(lambda s: _ptxas_report(nvcc, s, tmp_path), sources))
    kernels = {k: v for r in reports for k, v in r.items()}
    assert len(kernels) >= 13, sorted(kernels)  # 6 sampler instantiations, 8 moe, 3 cascade
    for name, info in sorted(kernels.items()):
        print(f"{info.get('registers', '?'):>4} regs  stack {info['stack']}  spills {info['spill_stores']}/"
              f"{info['spill_loads']}  {name}")
        assert info["stack"] == 0 and info["spill_stores"] == 0 and info["spill_loads"] == 0, (name, info)
        for kernel, limit in REGISTER_LIMITS.items():
            if kernel in name:
                assert info["registers"] <= limit, (name, info)

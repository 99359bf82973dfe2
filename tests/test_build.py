"""The CUDA extension: it builds (CI forces it), imports without a GPU, and says clearly
when it cannot run; the build refuses FASTDF_FORCE_CUDA=1 without nvcc."""

import os
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


def test_bad_arch_list_is_refused():
    env = {**os.environ, "FASTDF_CUDA_ARCHS": "sm_90;hopper"}
    env.pop("FASTDF_SKIP_CUDA_BUILD", None)
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)
    if "nvcc not found" in out.stderr:
        pytest.skip("no nvcc here: the arch list is only read when building")
    assert out.returncode != 0 and "FASTDF_CUDA_ARCHS: cannot read 'sm_90'" in out.stderr + out.stdout

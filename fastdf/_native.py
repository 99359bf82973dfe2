"""Loading fastdf._C and turning tensors into the raw arguments its kernels take.

csrc/ has no torch headers: kernels get data pointers, sizes, strides (in elements) and a
stream handle. This module is the one place that knows how to build those from tensors.
"""

from __future__ import annotations

import functools
import importlib

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def _load():
    try:
        return importlib.import_module("fastdf._C"), None
    except ImportError as err:
        return None, (
            f"fastdf._C is not importable ({err}); fastdf was installed without its CUDA extension "
            "(nvcc was not found, or FASTDF_SKIP_CUDA_BUILD=1). Reinstall with nvcc on PATH, "
            "e.g. FASTDF_FORCE_CUDA=1 pip install --no-build-isolation -e ."
        )


def unavailable_reason() -> str | None:
    """Why the cuda backend cannot run in this process (None if it can)."""
    module, reason = _load()
    if module is None:
        return reason
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if module.device_count() == 0:
        return "fastdf._C's CUDA runtime sees no device (driver too old or missing?)"
    return None


def module():
    """The fastdf._C module; raises ImportError with the reason when it is missing."""
    mod, reason = _load()
    if mod is None:
        raise ImportError(reason)
    return mod


def stream(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device, as the integer handle csrc takes."""
    return torch.cuda.current_stream(t.device).cuda_stream


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


@functools.lru_cache(maxsize=None)
def _load_cpu():
    try:
        mod = importlib.import_module("fastdf._cpu")
    except ImportError as err:
        return None, (
            f"fastdf._cpu is not importable ({err}); fastdf was installed without its CPU kernels (no C++ "
            "compiler with OpenMP at install time, or FASTDF_SKIP_CPU_BUILD=1). Reinstall with g++ on PATH, "
            "e.g. FASTDF_FORCE_CPU=1 pip install --no-build-isolation -e ."
        )
    if not mod.has_avx512():
        return None, "fastdf._cpu's kernels need a CPU with AVX-512 (F, BW, DQ, VL); this one has not"
    return mod, None


def cpu_module():
    """fastdf._cpu (host C++ kernels for the CPU path) where it is built and this CPU runs
    it, else None; :func:`cpu_unavailable_reason` says why."""
    return _load_cpu()[0]


def cpu_unavailable_reason() -> str | None:
    """Why fastdf._cpu's kernels cannot run in this process (None if they can)."""
    return _load_cpu()[1]

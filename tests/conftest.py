"""Shared test setup.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET=1 must be set
before anything imports a kernel module, so it is set here, before fastdf is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastdf  # noqa: E402
from fastdf import _native  # noqa: E402
from fastdf.ops import BACKENDS, REGISTRY, unavailable_reason  # noqa: E402

# FASTDF_TEST_NO_AVX512=1: fastdf._cpu reported unusable, as on an x86 CPU without AVX-512,
# so every op takes the path it takes there (with ATEN_CPU_CAPABILITY=avx2, torch's own
# kernels too). CI runs on whatever CPU the machine has; .ci/run also runs the CPU-path
# tests this way, so those fallbacks are exercised on every submission.
NO_AVX512 = os.environ.get("FASTDF_TEST_NO_AVX512") == "1"
if NO_AVX512:
    _native._load_cpu = lambda: (None, "fastdf._cpu's kernels need a CPU with AVX-512 (F, BW, DQ, VL): "
                                       "switched off by FASTDF_TEST_NO_AVX512=1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device tests run on: CUDA when present, else the CPU."""
    return DEVICE


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test once per backend that can run here, inside ``fastdf.backend(name)``.

    Mark the test ``@pytest.mark.op("name", ...)`` to skip backends those ops lack."""
    name = request.param
    reason = unavailable_reason(name, DEVICE)
    if reason:
        pytest.skip(f"{name} backend unavailable: {reason}")
    marker = request.node.get_closest_marker("op")
    for op in marker.args if marker else ():
        if name not in REGISTRY[op].backends:
            pytest.skip(f"fastdf.{op} has no {name} implementation")
    with fastdf.backend(name):
        yield name


def pytest_configure(config):
    config.addinivalue_line("markers", "op(*names): ops a backend-parametrised test exercises")

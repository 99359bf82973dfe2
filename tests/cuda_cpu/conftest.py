"""Fixtures of the CPU execution harness for csrc/ (see cuda_cpu_harness.py and
benches/notes/cuda_cpu.md). Every test here carries the ``cuda_cpu`` marker; the suite
skips, with the reason, only when no C++ compiler is installed."""

import os
import sys
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: make the helper importable

import cuda_cpu_harness as harness  # noqa: E402

SWEEP = os.environ.get("FASTDF_CUDA_CPU_SWEEP") == "1"
# test_sanitizers.py reruns part of this suite in a subprocess with the ASan+UBSan build.
VARIANT = os.environ.get("FASTDF_CUDA_CPU_VARIANT", "default")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda_cpu: runs csrc/ CUDA kernels on the CPU through the emulation harness (tests/cuda_cpu)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cuda_cpu)


@pytest.fixture(scope="session")
def emu_lib():
    if harness.compiler() is None:
        pytest.skip("g++ not found: the CPU harness compiles csrc/*.cu with the host C++ compiler")
    return harness.build(VARIANT)


@pytest.fixture
def emu(emu_lib, request):
    """The emulated device; thread order and shared-memory poison seeded by the test's id
    (different across tests, the same on every run)."""
    dev = harness.Emu(emu_lib, seed=zlib.crc32(request.node.nodeid.encode()))
    yield dev
    dev.free_all()


@pytest.fixture
def sweep():
    return SWEEP

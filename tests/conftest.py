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
from fastdf.ops import BACKENDS, REGISTRY, unavailable_reason  # noqa: E402

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

"""pytest-benchmark view of the bench CLI's suites: one test per (case, provider), grouped
by case, on the same quick cases ``python -m fastdf.bench --quick`` runs.

    pytest benches/                       # time them (GPU: CUDA tensors)
    pytest benches/ --benchmark-disable   # smoke: run every provider once
"""

import pytest
import torch

from fastdf.bench import Skip, core

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _params():
    params = []
    for name, s in sorted(core.load_suites().items()):
        for case in s.cases(DEVICE, True):
            try:
                providers = list(case.setup(DEVICE))  # names only; tensors are dropped
            except Skip:
                providers = ["*"]
            params += [pytest.param(name, case, p, id=f"{name}-{case.name}-{p}".replace(" ", "_")) for p in providers]
    return params


@pytest.mark.parametrize("suite_name,case,provider", _params())
def test_case(benchmark, suite_name, case, provider):
    try:
        fn = case.setup(DEVICE)[provider]
    except (Skip, KeyError) as why:
        pytest.skip(f"{case.name}: {why}")
    benchmark.group = f"{suite_name}: {case.name}"
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark(timed)
    else:
        benchmark(fn)

"""The skyreels bench suite's full CPU set: every case's providers compute the same thing
(the timings themselves are benchmarks, not tests)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from fastdf.bench.suites import skyreels  # noqa: E402


def test_full_cpu_set_lists_the_cached_call_and_both_pipelines():
    names = [c.name for c in skyreels.cases(torch.device("cpu"), False)]
    assert any(n.startswith("cached transformer call reduced 25x80") for n in names)
    assert sum(n.startswith("tiny pipeline") for n in names) == 2
    assert sum(n.startswith("small pipeline") for n in names) == 2


def test_cached_call_case_reuses_and_agrees():
    shape = (1, 2, 16, 32, 10, 4, 4, 2)  # the case's construction at a test size: 10 frames, blocks of 2
    case = skyreels._cached_case("test", shape)
    assert "leading 6/10 frames reused" in case.name
    import fastdf.integrations.diffusers as fdd

    providers = case.setup(torch.device("cpu"))
    for _ in range(3):  # alternating tails: each call after the first reuses 3 of 5 blocks
        torch.testing.assert_close(providers["fastdf cache"](), providers["fastdf"](), rtol=1e-5, atol=1e-5)
    stats = fdd.cache_stats(providers["fastdf cache"].model)
    assert stats["tokens_computed"] == stats["tokens_total"] * (1 + 2 * 4 / 10) / 3


def test_memory_child_reports_a_peak(monkeypatch):
    """The --cpu-memory child at a tiny shape, in process (the CLI runs it in a subprocess)."""
    monkeypatch.setitem(skyreels.MEMORY_SHAPES, "test", (1, 2, 16, 32, 4, 4, 4, 2))
    stock = skyreels._memory_child("test", "stock")
    fast = skyreels._memory_child("test", "fastdf")
    assert stock["peak_MiB"] >= 0 and fast["peak_MiB"] >= 0
    assert stock["out_sum"] == pytest.approx(fast["out_sum"], rel=1e-4, abs=1e-3)

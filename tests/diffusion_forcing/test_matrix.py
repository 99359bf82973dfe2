"""Scheduling matrices against the closed form of DESIGN.md §4, and the level mapping."""

import math

import pytest
import torch

from fastdf import diffusion_forcing as dforce


def closed_form(kind, horizon, steps, u):
    """DESIGN.md §4 written out with Python floats and loops."""
    lag = [min(t, horizon - 1 - t) if kind == "trapezoid" else t for t in range(horizon)]
    rows = steps + max(math.floor(d * u) for d in lag) + 1
    return [[min(max(steps + math.floor(d * u) - m, 0), steps) for d in lag] for m in range(rows)]


CASES = [
    (kind, horizon, steps, u)
    for horizon in (1, 3, 7, 8)
    for steps in (1, 4, 10)
    for kind, u in [("full_sequence", None), ("autoregressive", None), ("pyramid", 0), ("pyramid", 0.37),
                    ("pyramid", 1), ("pyramid", 2.5), ("trapezoid", 0.5), ("trapezoid", 3)]
]


@pytest.mark.parametrize("kind,horizon,steps,u", CASES)
def test_closed_form_and_invariants(kind, horizon, steps, u):
    got = dforce.scheduling_matrix(kind, horizon, steps, uncertainty=u)
    eff = {"full_sequence": 0, "autoregressive": steps}.get(kind, u)
    assert got.dtype == torch.int64 and got.tolist() == closed_form(kind, horizon, steps, eff)
    assert (got[0] == steps).all() and (got[-1] == 0).all()
    assert (got[1:] <= got[:-1]).all()  # each column non-increasing in m
    assert (got[-2] > 0).any()  # the last row is the first all-clean one


def test_named_kinds_are_pyramids():
    for horizon, steps in [(5, 6), (4, 3)]:
        pyr = lambda u: dforce.scheduling_matrix("pyramid", horizon, steps, uncertainty=u)  # noqa: E731
        assert torch.equal(dforce.scheduling_matrix("full_sequence", horizon, steps), pyr(0))
        assert torch.equal(dforce.scheduling_matrix("autoregressive", horizon, steps), pyr(steps))


def test_shapes_and_orders():
    ar = dforce.scheduling_matrix("autoregressive", 3, 4)
    assert ar.shape == (4 + 2 * 4 + 1, 3)
    assert ((ar[:, 1] < 4) <= (ar[:, 0] == 0)).all()  # frame 1 moves only once frame 0 is clean
    trap = dforce.scheduling_matrix("trapezoid", 7, 5, uncertainty=1.0)
    assert trap.shape == (5 + 3 + 1, 7) and torch.equal(trap, trap.flip(1))  # symmetric: both ends first
    assert dforce.scheduling_matrix("pyramid", 4, 10, uncertainty=0.5).shape == (10 + 1 + 1, 4)


def test_fractional_uncertainty_floors():
    got = dforce.scheduling_matrix("pyramid", 4, 2, uncertainty=0.6)  # lags floor(0, .6, 1.2, 1.8) = 0, 0, 1, 1
    assert got.tolist() == [[2, 2, 2, 2], [1, 1, 2, 2], [0, 0, 1, 1], [0, 0, 0, 0]]


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="kind"):
        dforce.scheduling_matrix("zigzag", 4, 4)
    with pytest.raises(TypeError, match="kind"):
        dforce.scheduling_matrix(None, 4, 4)
    with pytest.raises(ValueError, match="horizon"):
        dforce.scheduling_matrix("full_sequence", 0, 4)
    with pytest.raises(TypeError, match="horizon"):
        dforce.scheduling_matrix("full_sequence", 2.0, 4)
    with pytest.raises(TypeError, match="steps"):
        dforce.scheduling_matrix("full_sequence", 2, True)
    with pytest.raises(ValueError, match="steps"):
        dforce.scheduling_matrix("full_sequence", 2, 0)
    with pytest.raises(ValueError, match="uncertainty is required"):
        dforce.scheduling_matrix("pyramid", 4, 4)
    with pytest.raises(ValueError, match="uncertainty"):
        dforce.scheduling_matrix("autoregressive", 4, 4, uncertainty=4)
    with pytest.raises(ValueError, match="uncertainty"):
        dforce.scheduling_matrix("trapezoid", 4, 4, uncertainty=-0.5)
    with pytest.raises(ValueError, match="uncertainty"):
        dforce.scheduling_matrix("pyramid", 4, 4, uncertainty=float("nan"))
    with pytest.raises(TypeError, match="uncertainty"):
        dforce.scheduling_matrix("pyramid", 4, 4, uncertainty="1")


def test_training_level_mapping():
    s, n = 7, 1000
    got = dforce.to_training_levels(torch.arange(s + 1), s, n)
    assert got[0] == 0 and got[-1] == n and (got[1:] > got[:-1]).all()
    assert got.tolist() == [k * n // s for k in range(s + 1)]
    assert torch.equal(dforce.to_training_levels(torch.arange(5), 4, 4), torch.arange(5))  # identity when equal
    m = dforce.scheduling_matrix("pyramid", 5, 10, uncertainty=1.0)
    mapped = dforce.to_training_levels(m, 10, 100)
    assert torch.equal(mapped, m * 10)
    with pytest.raises(ValueError, match="sampling_steps"):
        dforce.to_training_levels(m, 200, 100)
    with pytest.raises(ValueError, match="levels"):
        dforce.to_training_levels(torch.tensor([0, 11]), 10, 100)
    with pytest.raises(TypeError, match="levels"):
        dforce.to_training_levels(torch.tensor([0.5]), 10, 100)

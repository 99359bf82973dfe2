"""The shared argument checks in fastdf.ops._checks (knobs and index tensors)."""

import pytest
import torch

from fastdf.ops import _checks


@pytest.mark.parametrize("value,error", [
    (float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError),
    (1e300, ValueError), (-1e39, ValueError), (10**400, ValueError), (-1, ValueError),
    (True, TypeError), ("1", TypeError), (None, TypeError), (torch.tensor(1.0), TypeError),
])
def test_finite_float_refuses(value, error):
    with pytest.raises(error, match="knob"):
        _checks.finite_float("knob", value, low=0)


def test_finite_float_accepts_and_bounds():
    assert _checks.finite_float("knob", 3) == 3.0 and isinstance(_checks.finite_float("knob", 3), float)
    assert _checks.finite_float("knob", 3e38) == 3e38
    assert _checks.finite_float("knob", 7e4, dtype=torch.float64) == 7e4
    with pytest.raises(ValueError, match="knob"):
        _checks.finite_float("knob", 7e4, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"knob must be > 0"):
        _checks.finite_float("knob", 0.0, low=0, high=1, low_open=True)
    assert _checks.finite_float("knob", 1.0, low=0, high=1, low_open=True) == 1.0
    with pytest.raises(ValueError, match="knob"):
        _checks.finite_float("knob", 1.0, low=0, high=1, high_open=True)
    with pytest.raises(ValueError, match="knob must be <= 1"):
        _checks.finite_float("knob", 2, low=0, high=1)


@pytest.mark.parametrize("bad,why", [(float("nan"), "not finite"), (float("inf"), "not finite"),
                                     (-1.0, r"outside \[0, inf\)")])
def test_finite_values_names_the_entry(bad, why):
    t = torch.tensor([0.5, 1.0, bad])
    with pytest.raises(ValueError, match=rf"temp\[2\] = .* {why}"):
        _checks.finite_values("temp", t, low=0)
    assert _checks.finite_values("temp", t[:2], low=0) is not None
    assert _checks.finite_values("temp", torch.empty(0), low=0).numel() == 0
    with pytest.raises(ValueError, match="temp"):
        _checks.finite_values("temp", torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"temp\[0\] = 1e\+300 is not representable in float32"):
        _checks.finite_values("temp", torch.tensor([1e300], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"temp\[\(1, 0\)\]"):
        _checks.finite_values("temp", torch.tensor([[1.0], [float("nan")]]))


def test_index_tensor_makes_views_contiguous():
    base = torch.arange(12, dtype=torch.int32)
    view = base[::2]
    out = _checks.index_tensor("offs", view)
    assert out.is_contiguous() and torch.equal(out, view)
    assert _checks.index_tensor("offs", base) is base  # no copy when nothing to do
    assert _checks.index_tensor("offs", view, cast=torch.int64).dtype == torch.int64
    assert _checks.index_tensor("offs", None, optional=True) is None


@pytest.mark.parametrize("t,error", [
    (torch.tensor([1.5]), ValueError), (torch.tensor([True]), ValueError),
    (torch.tensor([1 + 1j]), ValueError), ([1, 2], TypeError),
    (torch.tensor([2**31]), ValueError), (torch.tensor([-(2**31) - 1]), ValueError),
])
def test_index_tensor_refuses(t, error):
    with pytest.raises(error, match="ids"):
        _checks.index_tensor("ids", t)


def test_index_tensor_bounds():
    t = torch.tensor([0, 3, 4])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\), got values in \[0, 4\]"):
        _checks.index_tensor("ids", t, low=0, high=4)
    assert torch.equal(_checks.index_tensor("ids", t, low=0, high=5), t)
    # Bounds past the dtype's own range are not compared in it (2**31 would wrap in int32).
    full = torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32)
    assert torch.equal(_checks.index_tensor("ids", full), full)
    assert torch.equal(_checks.index_tensor("ids", torch.tensor([2**40]), high=None), torch.tensor([2**40]))
    with pytest.raises(ValueError, match="rank|dims"):
        _checks.index_tensor("ids", t, ndim=2)

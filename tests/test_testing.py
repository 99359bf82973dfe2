"""The tolerance rule and the poisoning helper must be able to fail."""

import pytest
import torch

import fastdf
from fastdf.testing import assert_close_by_rule, assert_matches_reference, max_error, poisoned


def _softmax_ref(x):
    return torch.softmax(x.float(), -1).to(x.dtype)


def test_rule_accepts_torch_itself_and_rejects_a_perturbation():
    x = torch.randn(8, 33).half()
    assert_matches_reference(_softmax_ref(x), _softmax_ref, x)
    bad = _softmax_ref(x).clone()
    bad[3, 4] += 0.01
    with pytest.raises(AssertionError, match="exceeds"):
        assert_matches_reference(bad, _softmax_ref, x)


def test_rule_rejects_nan_and_mismatched_infinities():
    ref = torch.tensor([1.0, float("-inf")], dtype=torch.float64)
    assert max_error(torch.tensor([1.0, float("nan")]), ref) == float("inf")
    assert max_error(torch.tensor([1.0, 0.0]), ref) == float("inf")
    assert max_error(torch.tensor([1.0, float("-inf")]), ref) == 0.0
    with pytest.raises(AssertionError):
        assert_close_by_rule(torch.tensor([1.0, 5.0]), ref, torch.tensor([1.0, float("-inf")]))


def test_poisoned_outputs_are_nan_inside_only():
    from fastdf.ops import _alloc

    with poisoned():
        assert torch.isnan(_alloc.empty((4,), dtype=torch.float32, device="cpu")).all()
        assert (_alloc.empty((4,), dtype=torch.int64, device="cpu") == -1).all()
    o = torch.randn(3, 4)
    lse = torch.randn(3)
    with poisoned():
        out, _ = fastdf.merge_attention_states(o, lse, o, lse)
    assert torch.isfinite(out).all()

"""Test helpers for fastdf kernels (and for users checking their own).

The tolerance rule (DESIGN.md §5, from flash-attention): against a float64 reference, a
kernel's max error may be at most ``factor`` (2) times the error of the same computation
done by torch in the kernel's dtype, plus a tiny absolute floor.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .ops import _alloc

# Absolute floors, relative to the reference's largest magnitude (at least 1).
FLOORS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@contextlib.contextmanager
def poisoned():
    """Inside this block, every output buffer fastdf allocates for a kernel starts as NaN
    (-1 for integers), so elements a kernel fails to write show up in comparisons."""
    previous = _alloc.POISON[0]
    _alloc.POISON[0] = True
    try:
        yield
    finally:
        _alloc.POISON[0] = previous


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def to_float64(value):
    """Detached copies with floating tensors (nested in tuples/lists/dicts) in float64."""
    return _map_tensors(value, lambda t: t.detach().double() if t.is_floating_point() else t.detach())


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    raise TypeError(f"expected a tensor or a tuple of tensors, got {type(value).__name__}")


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| in float64; inf if a NaN appears or the non-finite
    entries (e.g. -inf lse of empty rows) differ."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference shape {tuple(e.shape)}")
    if torch.isnan(a).any():
        return float("inf")
    finite = torch.isfinite(e)
    if not torch.equal(a[~finite], e[~finite]) or not torch.isfinite(a[finite]).all():
        return float("inf")
    if not finite.any():
        return 0.0
    return (a[finite] - e[finite]).abs().max().item()


def assert_close_by_rule(actual, reference64, torch_lowp, *, factor=2.0, atol=None, name="output"):
    """Check ``actual`` against ``reference64`` (float64) with the rule: error(actual) <=
    factor * error(torch_lowp) + floor. Tensors or matching tuples of tensors."""
    for i, (a, r, t) in enumerate(zip(_flatten(actual), _flatten(reference64), _flatten(torch_lowp), strict=True)):
        label = name if i == 0 and not isinstance(actual, (tuple, list)) else f"{name}[{i}]"
        if not a.is_floating_point():
            if not torch.equal(a.cpu(), r.cpu()):
                raise AssertionError(f"{label}: integer result differs from the reference")
            continue
        scale = max(1.0, r.detach().abs()[torch.isfinite(r)].max().item()) if r.numel() and torch.isfinite(r).any() else 1.0
        floor = atol if atol is not None else FLOORS.get(a.dtype, 1e-6) * scale
        err, base = max_error(a, r), max_error(t, r)
        bound = factor * base + floor
        if not err <= bound:
            raise AssertionError(
                f"{label} ({a.dtype}): max error {err:.3e} vs float64 reference exceeds "
                f"{factor} x torch's {base:.3e} + {floor:.1e} = {bound:.3e}"
            )


def assert_matches_reference(actual, reference: Callable, *args, factor=2.0, atol=None, **kwargs):
    """Run ``reference`` on the inputs upcast to float64 and on the inputs as given (torch
    in the kernel's dtype), then apply :func:`assert_close_by_rule` to ``actual``. Inputs
    reach ``reference`` detached, so it may run autograd itself (to compare gradients)."""
    ref64 = reference(*to_float64(args), **to_float64(kwargs))
    lowp = reference(*_map_tensors(args, torch.Tensor.detach), **_map_tensors(kwargs, torch.Tensor.detach))
    assert_close_by_rule(actual, ref64, lowp, factor=factor, atol=atol)

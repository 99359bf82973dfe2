"""Argument checks shared by the ops. Each failure names the argument: a wrong type raises
TypeError, every other bad input ValueError (DESIGN.md §5), before any kernel runs.

The checks look at shapes, dtypes and devices only, so torch.compile traces them without
graph breaks; checks that must read tensor values (NaN logits, offsets in order) live in
the ops that need them.
"""

from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes):
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def tensor(name: str, t, *, ndim: int | Iterable[int] | None = None, dtypes=None, optional=False):
    """Check that ``t`` is a tensor with the given rank(s) and dtype(s); returns ``t``."""
    if t is None and optional:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{name} must have {want} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {_dtype_names(dtypes)}, got {str(t.dtype).removeprefix('torch.')}")
    return t


def same_device(**tensors):
    """All given tensors (None skipped) live on one device; returns it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; put them on one device")
    return first.device


def same_dtype(**tensors):
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise ValueError(
                f"{name} has dtype {str(t.dtype).removeprefix('torch.')} but {first_name} has "
                f"{str(first.dtype).removeprefix('torch.')}; they must match"
            )
    return first.dtype


def shape(name: str, t: torch.Tensor, expected, *, what: str = ""):
    """``t.shape == expected`` (entries of None match any size)."""
    actual = tuple(t.shape)
    ok = len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected))
    if not ok:
        shown = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name} must have shape {shown}{' ' + what if what else ''}, got {actual}")
    return t


def number(name: str, value, *, low=None, high=None, low_open=False, high_open=False, integer=False):
    """A Python number within [low, high] (open ends as flagged)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value

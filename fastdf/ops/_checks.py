"""Argument checks shared by the ops. Each failure names the argument: a wrong type raises
TypeError, every other bad input ValueError (DESIGN.md §5), before any kernel runs.

The checks look at shapes, dtypes and devices only, so torch.compile traces them without
graph breaks; checks that must read tensor values (NaN logits, offsets in order) live in
the ops that need them.
"""

from __future__ import annotations

import math
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
    if ndim is not None and t.dim() != ndim:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{name} must have {want} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {_dtype_names(dtypes)}, got {str(t.dtype).removeprefix('torch.')}")
    return t


def same_device(**tensors):
    """All given tensors (None skipped) live on one device; returns it."""
    # One pass, no intermediate list: these checks run on every call of every op, and on
    # the CPU a whole small op costs ~20 us.
    first_name = device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            first_name, device = name, t.device
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {device}; put them on one device")
    return device


def same_dtype(**tensors):
    first_name = dtype = None
    for name, t in tensors.items():
        if t is None:
            continue
        if dtype is None:
            first_name, dtype = name, t.dtype
        elif t.dtype != dtype:
            raise ValueError(
                f"{name} has dtype {str(t.dtype).removeprefix('torch.')} but {first_name} has "
                f"{str(dtype).removeprefix('torch.')}; they must match"
            )
    return dtype


def shape(name: str, t: torch.Tensor, expected, *, what: str = ""):
    """``t.shape == expected`` (entries of None match any size)."""
    if t.shape == expected:  # torch.Size compares with a tuple directly (a None never matches)
        return t
    actual = tuple(t.shape)
    ok = len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected))
    if not ok:
        shown = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name} must have shape {shown}{' ' + what if what else ''}, got {actual}")
    return t


def number(name: str, value, *, low=None, high=None, low_open=False, high_open=False, integer=False):
    """A Python number within [low, high] (open ends as flagged). NaN and +-inf are refused
    (NaN would pass every bound); float knobs that feed a kernel want :func:`finite_float`,
    which also checks the compute dtype's range."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


# ---------------------------------------------------------------------------- knobs and index tensors
# Unlike the checks above, ``finite_values`` and the value part of ``index_tensor`` read the
# data (one device sync each); they skip that part while a CUDA graph is being captured.

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def capturing() -> bool:
    """True while a CUDA graph is being captured (no host syncs allowed then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _span(low, high, low_open, high_open):
    lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
    return f"{lo}, {hi}"


def finite_float(name: str, value, *, low=None, high=None, low_open=False, high_open=False,
                 dtype: torch.dtype = torch.float32) -> float:
    """A real Python number (not a bool) that is finite, within the bounds (open ends as
    flagged) and representable in ``dtype`` (the compute dtype: 1e300 overflows float32).
    Returns it as a float."""
    import numbers

    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float64
        raise ValueError(f"{name} must be finite and representable in {str(dtype)[6:]}, got an int of "
                         f"{int(value).bit_length()} bits") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {v}")
    if abs(v) > torch.finfo(dtype).max:
        raise ValueError(f"{name} = {v} is not representable in {str(dtype)[6:]} "
                         f"(|{name}| must be <= {torch.finfo(dtype).max:.4g})")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
    return v


def finite_values(name: str, t: torch.Tensor, *, low=None, high=None, low_open=False, high_open=False,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every entry of float tensor ``t`` is finite, within the bounds and representable in
    ``dtype`` (the ``finite_float`` rules, per entry; one device sync). Returns ``t``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {str(t.dtype)[6:]}")
    if t.numel() == 0 or capturing():
        return t
    v = t.detach().double()
    bad = ~torch.isfinite(v) | (v.abs() > torch.finfo(dtype).max)
    if low is not None:
        bad |= (v <= low) if low_open else (v < low)
    if high is not None:
        bad |= (v >= high) if high_open else (v > high)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        where = first[0] if len(first) == 1 else first
        value = t[first].item()
        if value != value or abs(value) == float("inf"):
            why = "is not finite"
        elif abs(value) > torch.finfo(dtype).max:
            why = f"is not representable in {str(dtype)[6:]}"
        else:
            why = f"is outside {_span(low, high, low_open, high_open)}"
        raise ValueError(f"{name}[{where}] = {value} {why}")
    return t


def index_tensor(name: str, t, *, ndim: int | Iterable[int] | None = None, dtypes=(torch.int32, torch.int64),
                 low: int | None = INT32_MIN, high: int | None = INT32_MAX + 1, optional=False,
                 cast: torch.dtype | None = None) -> torch.Tensor | None:
    """Check an index/length tensor (ids, offsets, lengths) and return it ready for a kernel.

    ``t`` must be a tensor of the given rank(s) with an integer dtype in ``dtypes`` (float,
    bool or complex ids raise ValueError naming ``name``); its values must lie in
    ``[low, high)`` (default: the int32 range the kernels index with; one device sync,
    skipped for an empty tensor or while a CUDA graph is captured; None drops a bound).
    Returns ``t`` contiguous (kernels index it as a flat array: a ``[::2]`` view would read
    the wrong entries), cast to ``cast`` when given.
    """
    if t is None and optional:
        return None
    tensor(name, t, ndim=ndim)
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {_dtype_names(dtypes)} (an integer index tensor), "
                         f"got {str(t.dtype).removeprefix('torch.')}")
    info = torch.iinfo(t.dtype)
    # Bounds the dtype cannot reach need no check (and would wrap if compared in it).
    check_low = low is not None and low > info.min
    check_high = high is not None and high <= info.max
    if t.numel() and (check_low or check_high) and not capturing():
        bad = torch.zeros((), dtype=torch.bool, device=t.device)
        if check_low:
            bad = bad | (t < low).any()
        if check_high:
            bad = bad | (t >= high).any()
        if bool(bad):
            raise ValueError(f"{name} must lie in [{'-inf' if low is None else low}, {'inf' if high is None else high})"
                             f", got values in [{int(t.min())}, {int(t.max())}]")
    if cast is not None and t.dtype != cast:
        t = t.to(cast)
    return t.contiguous()

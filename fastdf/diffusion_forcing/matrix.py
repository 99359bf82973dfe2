"""Scheduling matrices: which noise level each frame is at, at each sampling row (DESIGN.md §4).

Levels here are *sampling* levels, 0 (clean) .. ``steps`` (pure noise). A sampler with fewer
sampling steps than the noise schedule has training levels maps them with
:func:`to_training_levels`.
"""

from __future__ import annotations

import math

import torch

from ..ops import _checks
from .schedule import MAX_STEPS

# Entries of one scheduling matrix (int64): 2**31 of them already take 16 GiB, and a lag
# that large is a typo (uncertainty=1e20), not a schedule.
MAX_ENTRIES = 2**31

KINDS = ("full_sequence", "autoregressive", "pyramid", "trapezoid")


def _uncertainty(kind: str, steps: int, uncertainty):
    if kind in ("full_sequence", "autoregressive"):
        if uncertainty is not None:
            raise ValueError(
                f"uncertainty is fixed for kind={kind!r} (u = {0 if kind == 'full_sequence' else 'steps'}); "
                f"pass uncertainty=None or use kind='pyramid'"
            )
        return 0.0 if kind == "full_sequence" else float(steps)
    if uncertainty is None:
        raise ValueError(f"uncertainty is required for kind={kind!r} (a number >= 0, in levels per frame)")
    return _checks.finite_float("uncertainty", uncertainty, low=0, dtype=torch.float64)


def scheduling_matrix(kind: str, horizon: int, steps: int, *, uncertainty: float | None = None) -> torch.Tensor:
    """Noise level of every frame at every sampling row, int64 ``[M, horizon]`` (CPU).

    Entry ``[m, t]`` is frame t's sampling level (0 clean .. ``steps`` pure noise) after
    ``m`` sampling rows; row 0 is all ``steps``, the last row all 0, and every column is
    non-increasing in m. With ``u`` the uncertainty (levels of lag per frame) and
    ``floor(t * u)`` computed in float64:

    - ``pyramid``: ``clip(steps + floor(t * u) - m, 0, steps)`` for
      ``m = 0 .. steps + floor((horizon - 1) * u)``; later frames lag behind earlier ones.
    - ``full_sequence``: the pyramid with u = 0 (all frames share one level; ``steps + 1`` rows).
    - ``autoregressive``: the pyramid with u = ``steps`` (frame t starts once t-1 is clean).
    - ``trapezoid``: a pyramid rising from both ends, ``clip(steps + floor(d(t) * u) - m, 0,
      steps)`` with ``d(t) = min(t, horizon - 1 - t)`` (distance to the nearer end), for
      ``m = 0 .. steps + floor(((horizon - 1) // 2) * u)``: both end frames finish first,
      the middle last.

    ``uncertainty`` is required for pyramid and trapezoid and must be None for the other two;
    it must be finite and >= 0. ``steps`` is at most ``MAX_STEPS`` (2**20), and the matrix may
    hold at most ``MAX_ENTRIES`` (2**31) entries: a larger one (a huge uncertainty or
    horizon) raises ValueError naming the argument instead of overflowing int64.
    """
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a str, got {type(kind).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    _checks.number("horizon", horizon, low=1, high=MAX_ENTRIES, integer=True)
    _checks.number("steps", steps, low=1, high=MAX_STEPS, integer=True)
    u = _uncertainty(kind, steps, uncertainty)
    # The largest lag, as the tensor code below computes it (float64 product, floor), checked
    # in Python before any int64 cast can wrap.
    widest = (horizon - 1) // 2 if kind == "trapezoid" else horizon - 1
    max_lag = float(widest) * u
    rows = steps + 1 + (math.floor(max_lag) if max_lag <= MAX_ENTRIES else max_lag)
    if rows * horizon > MAX_ENTRIES:
        culprit = "horizon" if (steps + 1) * horizon > MAX_ENTRIES else "uncertainty"
        raise ValueError(f"the scheduling matrix would have {float(rows):.4g} rows x {horizon} frames, more than "
                         f"{MAX_ENTRIES} entries; reduce {culprit} (horizon={horizon}, steps={steps}, "
                         f"uncertainty={uncertainty})")
    t = torch.arange(horizon, dtype=torch.int64)
    lag_frames = torch.minimum(t, horizon - 1 - t) if kind == "trapezoid" else t
    lag = torch.floor(lag_frames.to(torch.float64) * u).to(torch.int64)
    m = torch.arange(rows, dtype=torch.int64)[:, None]
    return (steps + lag[None, :] - m).clamp_(0, steps)


def to_training_levels(levels, sampling_steps: int, schedule_steps: int) -> torch.Tensor:
    """Map sampling levels (0 .. ``sampling_steps``) onto the noise schedule's training levels
    (0 .. ``schedule_steps``): ``level * schedule_steps // sampling_steps`` (exact integer
    arithmetic). 0 stays clean, ``sampling_steps`` becomes pure noise, and the map is strictly
    increasing, so a row-to-row decrease stays a decrease. Needs
    ``sampling_steps <= schedule_steps``."""
    _checks.number("sampling_steps", sampling_steps, low=1, high=MAX_STEPS, integer=True)
    _checks.number("schedule_steps", schedule_steps, low=1, high=MAX_STEPS, integer=True)
    if sampling_steps > schedule_steps:
        raise ValueError(
            f"sampling_steps ({sampling_steps}) must be <= the noise schedule's steps ({schedule_steps})"
        )
    try:
        levels = torch.as_tensor(levels)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"levels must be an integer tensor (or nested lists of ints), got {type(levels).__name__}: "
                        f"{err}") from None
    if levels.dtype.is_floating_point or levels.dtype == torch.bool or levels.is_complex():
        raise TypeError(f"levels must be an integer tensor, got {levels.dtype}")
    if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) > sampling_steps):
        raise ValueError(f"levels must lie in 0..{sampling_steps} (sampling levels), got values in "
                         f"{int(levels.min())}..{int(levels.max())}")
    return levels.to(torch.int64) * schedule_steps // sampling_steps

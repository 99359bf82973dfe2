"""Guidance for :meth:`Sampler.rollout`: reward gradients on the predicted clean frames, and
history guidance (classifier-free guidance with the history masked by full noise)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..ops import _checks


@dataclasses.dataclass(frozen=True)
class RewardGuidance:
    """Add ``scale * grad reward`` to the predicted clean frames at every sampling step.

    ``reward(x0, frames)`` gets ``x0`` ``[B, n, *frame_shape]``, the model's prediction of the
    clean frames being updated in this step, and ``frames``, int64 ``[n]``, their indices among
    the generated frames (0 is the first frame after the context); it returns a tensor
    (summed) that is differentiable in ``x0``. The guided x0 replaces the prediction (the
    noise estimate is recomputed from it), so a higher reward pulls samples its way.
    No gradient flows through the model.
    """

    reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scale: float = 1.0

    def __post_init__(self):
        if not callable(self.reward):
            raise TypeError(f"reward must be callable, got {type(self.reward).__name__}")
        # Finite in float32: the gradient step is taken in the frames' dtype.
        _checks.finite_float("scale", self.scale)

    def __call__(self, x0: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = x0.detach().requires_grad_(True)
            value = self.reward(leaf, frames)
            if not isinstance(value, torch.Tensor) or not value.requires_grad:
                raise ValueError("reward must return a tensor that is differentiable in x0 "
                                 f"(got {type(value).__name__}{'' if not isinstance(value, torch.Tensor) else ' without grad'})")
            (grad,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
        if grad is None:
            raise ValueError("reward's value does not depend on x0 (no gradient reaches the frames); "
                             "compute the reward from its x0 argument")
        return x0 + self.scale * grad.to(x0.dtype)


@dataclasses.dataclass(frozen=True)
class HistoryGuidance:
    """History guidance (Diffusion Forcing's noise-as-masking CFG): each step also runs the
    model with every history frame (the frames that were clean before the current chunk)
    replaced by fresh pure noise at the top level, and uses
    ``pred = masked + weight * (conditional - masked)``. ``weight=1`` is plain conditional
    sampling (no extra work); larger weights follow the history more closely."""

    weight: float

    def __post_init__(self):
        _checks.finite_float("weight", self.weight)


def parse(guidance) -> tuple[list[RewardGuidance], HistoryGuidance | None]:
    """Split ``guidance`` (None, one item, or a list/tuple of items) into reward terms and
    the history guidance. A bare callable is ``RewardGuidance(callable)``."""
    items = [] if guidance is None else list(guidance) if isinstance(guidance, (list, tuple)) else [guidance]
    rewards, history = [], None
    for item in items:
        if isinstance(item, HistoryGuidance):
            if history is not None:
                raise ValueError("guidance may hold at most one HistoryGuidance")
            history = item
        elif isinstance(item, RewardGuidance):
            rewards.append(item)
        elif callable(item):
            rewards.append(RewardGuidance(item))
        else:
            raise TypeError(f"guidance items must be RewardGuidance, HistoryGuidance or callables, got {type(item).__name__}")
    if history is not None and history.weight == 1:
        history = None
    return rewards, history

"""Diffusion Forcing training: independent per-frame noise levels and the denoising loss."""

from __future__ import annotations

import torch

from ..ops import _checks
from .schedule import NoiseSchedule, _check_prediction

MODES = ("independent", "full_sequence")


def sample_training_levels(batch: int, frames: int, steps: int, mode: str = "independent", *,
                           generator: torch.Generator | None = None, device=None, min_level: int = 1) -> torch.Tensor:
    """Training noise levels, int64 ``[batch, frames]``, uniform over ``min_level .. steps``.

    ``mode="independent"``: every frame draws its own level (Diffusion Forcing).
    ``mode="full_sequence"``: one level per sequence, shared by its frames (classic video
    diffusion). ``min_level`` defaults to 1 because a clean frame (level 0) has nothing to
    denoise; pass 0 to also train with clean frames as context (they get loss weight 0).
    """
    _checks.number("batch", batch, low=1, integer=True)
    _checks.number("frames", frames, low=1, integer=True)
    _checks.number("steps", steps, low=1, integer=True)
    _checks.number("min_level", min_level, low=0, high=steps, integer=True)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    device = torch.device(device) if device is not None else (generator.device if generator is not None else None)
    cols = frames if mode == "independent" else 1
    levels = torch.randint(min_level, steps + 1, (batch, cols), generator=generator, device=device)
    return levels.expand(batch, frames).contiguous()


def training_step(model, x0: torch.Tensor, schedule: NoiseSchedule, *, prediction: str = "v",
                  weighting: str = "min_snr", snr_gamma: float = 5.0, mode: str = "independent",
                  levels: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One denoising loss: noise ``x0`` ``[B, F, ...]`` to per-frame ``levels`` (drawn with
    :func:`sample_training_levels` and ``mode`` unless given), call ``model(x_t, levels)`` (the
    cache-free call of :class:`~fastdf.diffusion_forcing.protocol.DFModel`), and return the
    mean over all elements of ``weight(level) * (pred - target)^2`` (a scalar; call
    ``.backward()`` on it). ``prediction`` is what the model outputs (``"eps"``, ``"v"``,
    ``"x0"``); ``weighting`` as in :meth:`NoiseSchedule.loss_weight`.
    """
    _checks.tensor("x0", x0)
    if x0.dim() < 2 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating tensor [B, F, ...], got {x0.dtype} of shape {tuple(x0.shape)}")
    expected = getattr(model, "frame_shape", None)
    if expected is not None and tuple(x0.shape[2:]) != tuple(expected):
        raise ValueError(f"x0 frames have shape {tuple(x0.shape[2:])} but the model takes frames of shape "
                         f"{tuple(expected)} (model.frame_shape)")
    _check_prediction(prediction)
    if levels is None:
        levels = sample_training_levels(x0.shape[0], x0.shape[1], schedule.steps, mode, generator=generator,
                                        device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.add_noise(x0, noise, levels)
    pred = model(x_t, levels)
    if not isinstance(pred, torch.Tensor) or pred.shape != x0.shape:
        raise ValueError(f"model must return a tensor shaped like x0 {tuple(x0.shape)}, got "
                         f"{tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__}")
    target = schedule.target(x0, noise, levels, prediction)
    weight = schedule.loss_weight(levels, weighting, prediction, snr_gamma=snr_gamma)
    dtype = torch.promote_types(x0.dtype, torch.float32)  # low-precision data: the loss in fp32
    err = (pred.to(dtype) - target.to(dtype)) ** 2
    weight = weight.to(err.dtype).reshape(weight.shape + (1,) * (err.dim() - weight.dim()))
    return (weight * err).mean()

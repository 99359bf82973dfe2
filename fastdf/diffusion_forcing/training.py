"""Diffusion Forcing training: independent per-frame noise levels and the denoising loss."""

from __future__ import annotations

import torch

from ..ops import _checks
from .schedule import MAX_STEPS, NoiseSchedule, _check_prediction, _check_weighting, _choice, _data, check_generator

MODES = ("independent", "full_sequence")


def sample_training_levels(batch: int, frames: int, steps: int, mode: str = "independent", *,
                           generator: torch.Generator | None = None, device=None, min_level: int = 1) -> torch.Tensor:
    """Training noise levels, int64 ``[batch, frames]``, uniform over ``min_level .. steps``.

    ``mode="independent"``: every frame draws its own level (Diffusion Forcing).
    ``mode="full_sequence"``: one level per sequence, shared by its frames (classic video
    diffusion). ``min_level`` defaults to 1 because a clean frame (level 0) has nothing to
    denoise; pass 0 to also train with clean frames as context (they get loss weight 0).
    ``batch`` and ``frames`` must be >= 1 (like every entry point of the toolkit, an empty
    batch or sequence is a ValueError rather than an empty result).
    """
    _checks.number("batch", batch, low=1, integer=True)
    _checks.number("frames", frames, low=1, integer=True)
    _checks.number("steps", steps, low=1, high=MAX_STEPS, integer=True)
    _checks.number("min_level", min_level, low=0, high=steps, integer=True)
    _choice("mode", mode, MODES)
    if device is not None:
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError) as err:
            raise ValueError(f"device must name a torch device, got {device!r} ({err})") from None
    else:
        device = generator.device if isinstance(generator, torch.Generator) else torch.device("cpu")
    check_generator(generator, device)
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

    Every argument is checked before the model runs. ``x0`` needs B >= 1 and F >= 1 (an
    empty batch has no mean loss: ValueError, as everywhere in the toolkit); ``levels``, when
    given, is an integer ``[B, F]`` tensor on x0's device; ``noise`` has x0's shape and dtype.
    """
    if not callable(model):
        raise TypeError(f"model must be callable (a fastdf.diffusion_forcing.DFModel), got {type(model).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    _data("x0", x0)
    if x0.dim() < 2:
        raise ValueError(f"x0 must be [B, F, *frame_shape] (at least 2 dims), got shape {tuple(x0.shape)}")
    if x0.shape[0] == 0 or x0.shape[1] == 0:
        raise ValueError(f"x0 must hold at least one sequence and one frame (B >= 1, F >= 1), got shape "
                         f"{tuple(x0.shape)}")
    expected = getattr(model, "frame_shape", None)
    if expected is not None and tuple(x0.shape[2:]) != tuple(expected):
        raise ValueError(f"x0 frames have shape {tuple(x0.shape[2:])} but the model takes frames of shape "
                         f"{tuple(expected)} (model.frame_shape)")
    _check_prediction(prediction)
    _check_weighting(weighting)
    _checks.finite_float("snr_gamma", snr_gamma, low=0, low_open=True, dtype=torch.float64)
    _choice("mode", mode, MODES)
    if levels is not None:
        schedule.check_levels(levels, x0)
        _checks.shape("levels", levels, tuple(x0.shape[:2]), what="(one level per frame: [B, F])")
    if noise is not None:
        _data("noise", noise, like=x0, like_name="x0")
    check_generator(generator, x0.device)
    if levels is None:
        levels = sample_training_levels(x0.shape[0], x0.shape[1], schedule.steps, mode, generator=generator,
                                        device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.add_noise(x0, noise, levels)
    pred = model(x_t, levels)
    if (not isinstance(pred, torch.Tensor) or pred.shape != x0.shape or not pred.is_floating_point()
            or pred.device != x0.device):
        got = (f"{str(pred.dtype).removeprefix('torch.')} {tuple(pred.shape)} on {pred.device}"
               if isinstance(pred, torch.Tensor) else type(pred).__name__)
        raise ValueError(f"model must return a floating tensor shaped like x0 {tuple(x0.shape)} on {x0.device}, "
                         f"got {got}")
    target = schedule.target(x0, noise, levels, prediction)
    weight = schedule.loss_weight(levels, weighting, prediction, snr_gamma=snr_gamma)
    dtype = torch.promote_types(x0.dtype, torch.float32)  # low-precision data: the loss in fp32
    err = (pred.to(dtype) - target.to(dtype)) ** 2
    weight = weight.to(err.dtype).reshape(weight.shape + (1,) * (err.dim() - weight.dim()))
    return (weight * err).mean()

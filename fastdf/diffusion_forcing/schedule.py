"""Noise schedules with per-frame (or per-token) noise levels.

A *level* is an integer ``k`` in ``0 .. steps``: 0 is the clean signal, ``steps`` is (as
near as the schedule gets to) pure noise. ``alphas_cumprod[k]`` is the signal fraction
``alpha_bar`` at level k, so ``alphas_cumprod[0] == 1`` and level ``k >= 1`` is DDPM's
0-indexed timestep ``k - 1``:

    x_k = sqrt(alpha_bar[k]) * x0 + sqrt(1 - alpha_bar[k]) * eps

A ``levels`` tensor carries one level per frame ``[B, F]`` (or per token, or per sequence):
its shape must be a prefix of the data's shape, and each level applies to everything in the
trailing dimensions (a frame's pixels, a token's channels).
"""

from __future__ import annotations

import math

import torch

from ..ops import _checks

KINDS = ("cosine", "linear", "sigmoid")
PREDICTIONS = ("eps", "v", "x0")
WEIGHTINGS = ("uniform", "snr", "min_snr")
METHODS = ("ddim", "ddpm")
# The most noise levels a schedule (or a sampler) may have. Levels index float64 tables and
# scheduling matrices, and ``level * schedule_steps`` must stay exact in int64; a million
# levels is far beyond any published schedule (DDPM uses 1000).
MAX_STEPS = 2**20


def _betas(kind: str, steps: int) -> torch.Tensor:
    if kind == "linear":
        # Ho et al.'s 1e-4 .. 0.02 over 1000 steps, rescaled so other step counts end as noisy.
        # Below 20 steps the rescaled betas pass 1 and clip at 0.999 (still a valid schedule).
        scale = 1000.0 / steps
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64).clamp(0, 0.999)
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if kind == "cosine":  # Nichol & Dhariwal 2021, offset s = 0.008
        f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    else:  # sigmoid (Jabri et al. 2022 / Chen 2023; start -3, end 3, tau 1), as in Diffusion Forcing
        start, end = -3.0, 3.0
        v_start, v_end = (torch.sigmoid(torch.tensor(v, dtype=torch.float64)) for v in (start, end))
        f = (v_end - torch.sigmoid(t * (end - start) + start)) / (v_end - v_start)
    # 0.999 keeps the last level's alpha_bar above zero, so x0 stays recoverable from eps.
    return (1 - f[1:] / f[:-1]).clamp(0, 0.999)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped like a prefix of ``like``) with trailing singleton dims to broadcast over it."""
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))


def _broadcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return _expand(coef, like).to(like.dtype)


class NoiseSchedule:
    """A discrete noise schedule with ``steps`` noisy levels (see the module docstring).

    ``kind``: ``"cosine"`` (Nichol & Dhariwal), ``"linear"`` (DDPM's betas, rescaled to
    ``steps``) or ``"sigmoid"`` (the schedule Diffusion Forcing trains with).
    ``alphas_cumprod`` is float64 ``[steps + 1]`` with ``alphas_cumprod[0] == 1``; it is
    strictly decreasing and stays above zero at level ``steps``.

    Model outputs come in one of three parameterisations (``prediction``): ``"eps"`` (the
    noise), ``"x0"`` (the clean signal) or ``"v"`` (``sqrt(ab) * eps - sqrt(1 - ab) * x0``).
    Coefficients are looked up in float64 and applied in the data's dtype.
    """

    def __init__(self, kind: str = "cosine", steps: int = 1000):
        if not isinstance(kind, str):
            raise TypeError(f"kind must be a str, got {type(kind).__name__}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        _checks.number("steps", steps, low=1, high=MAX_STEPS, integer=True)
        self.kind, self.steps = kind, steps
        self.alphas_cumprod = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - _betas(kind, steps), 0)])
        self._tables: dict = {}

    def __repr__(self):
        return f"NoiseSchedule(kind={self.kind!r}, steps={self.steps})"

    # ------------------------------------------------------------------ coefficients

    def _table(self, device) -> torch.Tensor:
        device = torch.device(device)
        table = self._tables.get(device)
        if table is None:
            ab = self.alphas_cumprod
            # rows: sqrt(ab), sqrt(1 - ab), snr (inf at level 0), ab
            table = torch.stack([ab.sqrt(), (1 - ab).sqrt(), ab / (1 - ab), ab]).to(device)
            self._tables[device] = table
        return table

    def check_levels(self, levels, like: torch.Tensor | None = None, *, name: str = "levels") -> torch.Tensor:
        """Validate ``levels``: an integer tensor with values in ``0 .. steps`` whose shape is a
        prefix of ``like.shape``. Raises TypeError/ValueError naming ``name``."""
        if not isinstance(levels, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of integer levels, got {type(levels).__name__}")
        if levels.dtype.is_floating_point or levels.is_complex() or levels.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (levels 0..{self.steps}), got {levels.dtype}")
        if like is not None:
            n = levels.dim()
            if n > like.dim() or tuple(like.shape[:n]) != tuple(levels.shape):
                raise ValueError(
                    f"{name} shape {tuple(levels.shape)} must be a prefix of the data shape {tuple(like.shape)} "
                    f"(one level per frame [B, F], per token, or per sequence)"
                )
            if levels.device != like.device:
                raise ValueError(f"{name} is on {levels.device} but the data is on {like.device}")
        if levels.numel():
            low, high = int(levels.min()), int(levels.max())
            if low < 0 or high > self.steps:
                raise ValueError(f"{name} must lie in 0..{self.steps} (0 = clean), got values in {low}..{high}")
        return levels

    def _coefs(self, levels: torch.Tensor, like: torch.Tensor):
        """(sqrt(ab), sqrt(1 - ab)) at ``levels``, shaped to broadcast over ``like``."""
        table = self._table(levels.device)
        idx = levels.long()
        return _broadcast(table[0][idx], like), _broadcast(table[1][idx], like)

    def snr(self, levels: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``ab / (1 - ab)`` at ``levels`` (float64; inf at level 0)."""
        self.check_levels(levels)
        return self._table(levels.device)[2][levels.long()]

    # ------------------------------------------------------------------ forward process

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """``sqrt(ab[levels]) * x0 + sqrt(1 - ab[levels]) * noise``; level 0 returns x0 exactly.

        ``x0`` and ``noise``: floating tensors of one shape, dtype and device (TypeError for an
        integer or bool ``x0``: noise cannot be added to it without a silent cast)."""
        _data("x0", x0)
        _data("noise", noise, like=x0, like_name="x0")
        self.check_levels(levels, x0)
        a, s = self._coefs(levels, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, prediction: str) -> torch.Tensor:
        """What a model trained with ``prediction`` should output for ``add_noise(x0, noise, levels)``."""
        _check_prediction(prediction)
        _data("x0", x0)
        _data("noise", noise, like=x0, like_name="x0")
        self.check_levels(levels, x0)
        return self._join(x0, noise, levels, prediction)

    def _join(self, x0, eps, levels, prediction):
        """The ``prediction`` parameterisation of the pair (x0, eps) at ``levels``."""
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        a, s = self._coefs(levels, x0)
        return a * eps - s * x0

    # ------------------------------------------------------------------ parameterisations

    def split(self, pred: torch.Tensor, x_t: torch.Tensor, levels: torch.Tensor, prediction: str, *, check: bool = True):
        """``(x0, eps)`` implied by a model output ``pred`` (in ``prediction``'s parameterisation)
        for the noisy ``x_t`` at ``levels``. At level 0, x0 is ``x_t`` whatever the prediction,
        and eps (undefined there) is 0 for ``"x0"`` and follows the formulas otherwise."""
        _check_prediction(prediction)
        if check:
            _data("x_t", x_t)
            _data("pred", pred, like=x_t, like_name="x_t")
            self.check_levels(levels, x_t)
        a, s = self._coefs(levels, x_t)
        if prediction == "eps":
            return (x_t - s * pred) / a, pred
        if prediction == "v":
            return a * x_t - s * pred, s * x_t + a * pred
        noisy = s > 0
        zero = torch.zeros((), dtype=x_t.dtype, device=x_t.device)
        return torch.where(noisy, pred, x_t), torch.where(noisy, (x_t - a * pred) / torch.where(noisy, s, 1), zero)

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, levels: torch.Tensor, source: str, target: str) -> torch.Tensor:
        """Re-express a model output from parameterisation ``source`` in ``target`` (each of
        ``"eps"``, ``"v"``, ``"x0"``), given the noisy input ``x_t`` at ``levels``."""
        _check_prediction(source, name="source")
        _check_prediction(target, name="target")
        x0, eps = self.split(pred, x_t, levels, source)
        return self._join(x0, eps, levels, target)

    # ------------------------------------------------------------------ losses

    def loss_weight(self, levels: torch.Tensor, weighting: str = "uniform", prediction: str = "eps",
                    *, snr_gamma: float = 5.0) -> torch.Tensor:
        """Per-level weight (float64, ``levels``' shape) on the MSE against ``prediction``'s target.

        Each weighting is a weight ``lam(snr)`` on the x0-space MSE, which is 1/snr times the eps
        MSE and 1/(snr + 1) times the v MSE, so the returned weight is ``lam`` divided by
        ``snr`` (eps), ``snr + 1`` (v) or 1 (x0):
        ``"uniform"``: weight 1 in ``prediction``'s own space; ``"snr"``: ``lam = snr`` (what the
        plain eps loss weights); ``"min_snr"``: ``lam = min(snr, snr_gamma)`` (Hang et al. 2023).
        Level 0 (clean, nothing to denoise) always gets weight 0.
        """
        _check_prediction(prediction)
        _check_weighting(weighting)
        # The weights are float64; a NaN gamma would clamp every snr to NaN.
        _checks.finite_float("snr_gamma", snr_gamma, low=0, low_open=True, dtype=torch.float64)
        snr = self.snr(levels)
        noisy = levels > 0
        if weighting == "uniform":
            weight = torch.ones_like(snr)
        else:
            lam = snr if weighting == "snr" else snr.clamp(max=snr_gamma)
            denom = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
            weight = lam / torch.where(noisy, denom, 1)
        return torch.where(noisy, weight, 0)

    # ------------------------------------------------------------------ reverse process

    def step(self, x_t: torch.Tensor, pred: torch.Tensor, levels: torch.Tensor, next_levels: torch.Tensor, *,
             prediction: str = "eps", method: str = "ddim", eta: float = 0.0, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Move ``x_t`` from ``levels`` to ``next_levels`` (per frame or token) given the model's
        ``pred`` at ``levels``. Elements whose level does not change are returned bit-for-bit.

        ``method="ddim"``: ``x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z`` with
        ``sigma = eta * sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))`` (Song et al.);
        ``eta=0`` is deterministic and may also go *up* in level (DDIM inversion).
        ``method="ddpm"``: a sample of the posterior ``q(x_s | x_t, x0)`` (the same law as DDIM
        with eta = 1). ``z`` is ``noise`` (x_t's shape) or drawn from ``generator``; reaching
        level 0 returns the predicted x0.
        """
        _check_prediction(prediction)
        _check_method(method)
        eta = _checks.finite_float("eta", eta, low=0, high=1)
        _data("x_t", x_t)
        _data("pred", pred, like=x_t, like_name="x_t")
        self.check_levels(levels, x_t)
        self.check_levels(next_levels, x_t, name="next_levels")
        if levels.shape != next_levels.shape:
            raise ValueError(f"next_levels shape {tuple(next_levels.shape)} must equal levels shape {tuple(levels.shape)}")
        stochastic = method == "ddpm" or eta > 0
        if bool((next_levels > levels).any()) and stochastic:
            raise ValueError("next_levels must be <= levels (going up in level is only defined for ddim with eta=0)")
        if noise is not None:
            _data("noise", noise, like=x_t, like_name="x_t")
        else:
            check_generator(generator, x_t.device)
        if noise is None and stochastic:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        x0, eps = self.split(pred, x_t, levels, prediction, check=False)
        return self._update(x_t, x0, eps, levels, next_levels, method, eta, noise)

    def _update(self, x_t, x0, eps, levels, next_levels, method, eta, noise):
        table = self._table(levels.device)
        ab = table[3]
        ab_t, ab_s = ab[levels.long()], ab[next_levels.long()]
        if method == "ddim":
            var = (eta**2) * (1 - ab_s) / (1 - ab_t).clamp_min(1e-300) * (1 - ab_t / ab_s)
            var = var.clamp_min(0)
            out = _broadcast(ab_s.sqrt(), x_t) * x0 + _broadcast((1 - ab_s - var).clamp_min(0).sqrt(), x_t) * eps
        else:
            alpha_ts = ab_t / ab_s
            denom = (1 - ab_t).clamp_min(1e-300)
            c0 = ab_s.sqrt() * (1 - alpha_ts) / denom
            ct = alpha_ts.sqrt() * (1 - ab_s) / denom
            var = (1 - ab_s) / denom * (1 - alpha_ts)
            out = _broadcast(c0, x_t) * x0 + _broadcast(ct, x_t) * x_t
        if noise is not None and (method == "ddpm" or eta > 0):
            out = out + _broadcast(var.sqrt(), x_t) * noise
        return torch.where(_expand(levels != next_levels, x_t), out, x_t)


def _choice(name, value, choices):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str (one of {', '.join(choices)}), got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _check_prediction(prediction, name="prediction"):
    return _choice(name, prediction, PREDICTIONS)


def _check_weighting(weighting):
    return _choice("weighting", weighting, WEIGHTINGS)


def _check_method(method):
    return _choice("method", method, METHODS)


def _data(name: str, t, *, like: torch.Tensor | None = None, like_name: str = ""):
    """``t`` is a floating tensor (integer or bool data would be cast silently by the
    arithmetic) and, given ``like``, has its shape, dtype and device."""
    _checks.tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {str(t.dtype).removeprefix('torch.')}")
    if like is not None:
        _checks.shape(name, t, tuple(like.shape), what=f"(the shape of {like_name})")
        if t.dtype != like.dtype:
            raise ValueError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')} but {like_name} has "
                             f"{str(like.dtype).removeprefix('torch.')}; they must match")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")
    return t


def check_generator(generator, device, name: str = "generator"):
    """``generator`` is None or a ``torch.Generator`` on ``device``'s type (a CPU generator
    cannot draw CUDA noise: torch would raise deep inside ``randn``)."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != torch.device(device).type:
        raise ValueError(f"{name} is on {generator.device} but the data is on {device}; make it with "
                         f"torch.Generator(device={str(torch.device(device).type)!r})")
    return generator

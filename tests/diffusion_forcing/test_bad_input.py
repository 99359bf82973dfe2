"""Bad input to the Diffusion Forcing toolkit (issue 9): every float knob must be finite, in
range and representable; data must be floating; integers must be ints; B = 0 / F = 0 is a
ValueError everywhere; each error is a TypeError/ValueError naming the argument, raised
before the model runs or any state changes."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdf import diffusion_forcing as dforce
from fastdf.diffusion_forcing.matrix import MAX_ENTRIES

STEPS = 10
SCHED = dforce.NoiseSchedule("cosine", STEPS)
FAST = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Finite in Python but NaN/inf, or beyond float32 (the compute dtype of the knobs that scale data).
NON_FINITE = [math.nan, math.inf, -math.inf]


class Counting(torch.nn.Module):
    """A frame-causal stand-in DFModel (x -> x / 2) that counts its calls."""

    frame_shape = (3,)

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, levels, **kwargs):
        self.calls += 1
        return x * 0.5


def _data(B=2, F=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, F, 3, generator=g), torch.randint(0, STEPS + 1, (B, F), generator=g)


# ---------------------------------------------------------------------------- float knobs


@pytest.mark.parametrize("eta", NON_FINITE + [-0.1, 1.5])
def test_step_eta_must_be_finite_in_range(eta):
    x, lv = _data()
    with pytest.raises(ValueError, match="eta"):
        SCHED.step(x, x, lv, (lv - 1).clamp(min=0), eta=eta)
    with pytest.raises(ValueError, match="eta"):
        dforce.Sampler(Counting(), SCHED, 5, window_frames=4, kv_cache=False, eta=eta)


@pytest.mark.parametrize("gamma", NON_FINITE + [0.0, -1.0])
def test_snr_gamma_must_be_finite_positive(gamma):
    _, lv = _data()
    with pytest.raises(ValueError, match="snr_gamma"):
        SCHED.loss_weight(lv, "min_snr", snr_gamma=gamma)
    model = Counting()
    with pytest.raises(ValueError, match="snr_gamma"):
        dforce.training_step(model, _data()[0], SCHED, snr_gamma=gamma)
    assert model.calls == 0  # checked before the model ran


@pytest.mark.parametrize("u", NON_FINITE + [1e20, 1e300, -1.0])
def test_uncertainty_must_be_finite_and_give_a_matrix_that_fits(u):
    with pytest.raises(ValueError, match="uncertainty"):
        dforce.scheduling_matrix("pyramid", 4, STEPS, uncertainty=u)
    with pytest.raises(ValueError, match="uncertainty"):
        dforce.Sampler(Counting(), SCHED, 5, "pyramid", u, window_frames=4, kv_cache=False)


def test_huge_horizon_or_steps_name_the_argument():
    with pytest.raises(ValueError, match="horizon"):
        dforce.scheduling_matrix("pyramid", 10**30, STEPS, uncertainty=1.0)
    with pytest.raises(ValueError, match="horizon"):
        dforce.scheduling_matrix("full_sequence", MAX_ENTRIES, STEPS)
    with pytest.raises(ValueError, match="steps"):
        dforce.NoiseSchedule("cosine", 10**30)
    with pytest.raises(ValueError, match="schedule_steps"):
        dforce.to_training_levels(torch.tensor([0, 1]), 1, 2**62)
    with pytest.raises(ValueError, match="horizon"):  # a huge window makes a huge default horizon
        dforce.Sampler(Counting(), SCHED, 5, window_frames=10**30, kv_cache=False)


@given(u=st.floats(min_value=0, max_value=1e3, allow_nan=False), horizon=st.integers(1, 12),
       steps=st.integers(1, 12), kind=st.sampled_from(["pyramid", "trapezoid"]))
@FAST
def test_valid_uncertainty_matches_the_formula(u, horizon, steps, kind):
    """Any finite uncertainty whose matrix fits gives the documented matrix (naive reference)."""
    m = dforce.scheduling_matrix(kind, horizon, steps, uncertainty=u)
    lag = [math.floor(float(min(t, horizon - 1 - t) if kind == "trapezoid" else t) * u) for t in range(horizon)]
    rows = steps + max(lag) + 1
    want = [[min(max(steps + lag[t] - r, 0), steps) for t in range(horizon)] for r in range(rows)]
    assert m.tolist() == want


@pytest.mark.parametrize("bad", NON_FINITE + [1e39])
def test_guidance_knobs_must_be_finite_in_float32(bad):
    with pytest.raises(ValueError, match="scale"):
        dforce.RewardGuidance(lambda x0, f: x0.sum(), scale=bad)
    with pytest.raises(ValueError, match="weight"):
        dforce.HistoryGuidance(bad)
    with pytest.raises(TypeError, match="scale"):
        dforce.RewardGuidance(lambda x0, f: x0.sum(), scale="1")


def test_reward_that_ignores_x0_is_refused():
    w = torch.ones((), requires_grad=True)
    with pytest.raises(ValueError, match="reward"):
        dforce.RewardGuidance(lambda x0, f: w * 2)(torch.zeros(1, 2, 3), torch.arange(2))


# ---------------------------------------------------------------------------- data and integers


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
def test_add_noise_refuses_integer_data(dtype):
    x, lv = _data()
    with pytest.raises(TypeError, match="x0"):
        SCHED.add_noise(x.to(dtype), x, lv)
    with pytest.raises(TypeError, match="noise"):
        SCHED.add_noise(x, x.to(dtype), lv)
    with pytest.raises(TypeError, match="x0"):
        dforce.training_step(Counting(), x.to(dtype), SCHED)
    with pytest.raises(TypeError, match="x_t"):
        SCHED.step(x.to(dtype), x, lv, lv)


def test_data_dtype_and_device_mismatches_name_the_argument():
    x, lv = _data()
    with pytest.raises(ValueError, match="noise has dtype float64"):
        SCHED.add_noise(x, x.double(), lv)
    with pytest.raises(ValueError, match="pred"):
        SCHED.step(x, x.double(), lv, lv)
    with pytest.raises(ValueError, match="pred must have shape"):
        SCHED.split(x[:, :1], x, lv, "eps")
    with pytest.raises(TypeError, match="prediction"):
        SCHED.target(x, x, lv, prediction=["v"])
    with pytest.raises(TypeError, match="weighting"):
        SCHED.loss_weight(lv, weighting=None)


def test_generator_must_match_the_data_device():
    x, lv = _data()
    with pytest.raises(TypeError, match="generator"):
        SCHED.step(x, x, lv, (lv - 1).clamp(min=0), method="ddpm", generator=0)
    # The device rule itself (a CPU generator cannot draw noise for data elsewhere); with
    # CUDA, also through step().
    from fastdf.diffusion_forcing.schedule import check_generator

    with pytest.raises(ValueError, match="generator is on cpu"):
        check_generator(torch.Generator(), torch.device("meta"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            SCHED.step(x, x, lv, (lv - 1).clamp(min=0), method="ddpm", generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize("value", [1.5, True, "2", None])
def test_integer_arguments_refuse_floats_bools_and_strings(value):
    with pytest.raises(TypeError):
        dforce.NoiseSchedule("cosine", value)
    with pytest.raises(TypeError):
        dforce.scheduling_matrix("pyramid", value, STEPS, uncertainty=1.0)
    with pytest.raises(TypeError):
        dforce.sample_training_levels(2, value, STEPS)
    sampler = dforce.Sampler(Counting(), SCHED, 5, window_frames=4, kv_cache=False)
    with pytest.raises(TypeError, match="num_frames"):
        sampler.rollout(torch.zeros(1, 1, 3), value)
    with pytest.raises(TypeError, match="horizon"):
        sampler.matrix(value)
    with pytest.raises(TypeError, match="before"):
        sampler.history(value, 1)


def test_flags_must_be_bools():
    with pytest.raises(TypeError, match="kv_cache"):
        dforce.Sampler(Counting(), SCHED, 5, window_frames=4, kv_cache=1)
    sampler = dforce.Sampler(Counting(), SCHED, 5, window_frames=4, kv_cache=False)
    with pytest.raises(TypeError, match="progress"):
        sampler.rollout(torch.zeros(1, 1, 3), 2, progress="no")


def test_to_training_levels_refuses_garbage():
    with pytest.raises(TypeError, match="levels"):
        dforce.to_training_levels("abc", 2, 4)
    with pytest.raises(TypeError, match="levels"):
        dforce.to_training_levels(torch.tensor([0.5]), 2, 4)
    with pytest.raises(ValueError, match="levels must lie in 0..2"):
        dforce.to_training_levels(torch.tensor([3]), 2, 4)


# ---------------------------------------------------------------------------- empty input: always a ValueError


@pytest.mark.parametrize("B,F", [(0, 3), (2, 0), (0, 0)])
def test_empty_batch_or_sequence_is_an_error_everywhere(B, F):
    model = Counting()
    x = torch.zeros(B, F, 3)
    with pytest.raises(ValueError, match="B >= 1, F >= 1"):
        dforce.training_step(model, x, SCHED)
    with pytest.raises(ValueError):
        dforce.sample_training_levels(B, F, STEPS)
    sampler = dforce.Sampler(model, SCHED, 5, window_frames=4, kv_cache=False)
    if B == 0:
        with pytest.raises(ValueError, match="B >= 1"):
            sampler.rollout(torch.zeros(B, 1, 3), 2)
    with pytest.raises(ValueError, match="num_frames"):
        sampler.rollout(torch.zeros(max(B, 1), 1, 3), F if F == 0 else 0)
    assert model.calls == 0
    # C = 0 context frames is not empty input: the rollout starts from nothing.
    assert sampler.rollout(torch.zeros(1, 0, 3), 2, progress=False).shape == (1, 2, 3)


# ---------------------------------------------------------------------------- nothing runs, nothing changes


def test_training_step_checks_everything_before_the_model_runs():
    x, lv = _data()
    model = Counting()
    for kwargs, error, message in [
        (dict(levels=lv[:, :2]), ValueError, "levels"),
        (dict(levels=lv.float()), TypeError, "levels"),
        (dict(levels=lv + STEPS), ValueError, "levels"),
        (dict(noise=x[:, :2]), ValueError, "noise"),
        (dict(weighting="nope"), ValueError, "weighting"),
        (dict(mode="nope"), ValueError, "mode"),
        (dict(generator="seed"), TypeError, "generator"),
    ]:
        with pytest.raises(error, match=message):
            dforce.training_step(model, x, SCHED, **kwargs)
    with pytest.raises(TypeError, match="schedule"):
        dforce.training_step(model, x, "cosine")
    with pytest.raises(TypeError, match="model"):
        dforce.training_step(None, x, SCHED)
    assert model.calls == 0
    loss = dforce.training_step(model, x, SCHED, levels=lv)
    assert model.calls == 1 and torch.isfinite(loss)


def test_rollout_checks_everything_before_the_model_runs_and_keeps_stats():
    model = Counting()
    sampler = dforce.Sampler(model, SCHED, 5, window_frames=4, kv_cache=False)
    sampler.rollout(torch.zeros(1, 1, 3), 2, progress=False)
    calls, stats = model.calls, dict(sampler.stats)
    for args, kwargs, error, message in [
        ((torch.zeros(1, 1, 4), 2), {}, ValueError, "frame_shape"),
        ((torch.zeros(1, 1, 3, dtype=torch.int64), 2), {}, TypeError, "context"),
        ((torch.zeros(1, 1, 3), 2), dict(generator=1), TypeError, "generator"),
        ((torch.zeros(1, 1, 3), 2), dict(guidance=3), TypeError, "guidance"),
        ((torch.zeros(1, 1, 3), 10**30), {}, ValueError, "num_frames"),
        ((torch.zeros(1, 5, 3), 2), {}, ValueError, "context"),
    ]:
        with pytest.raises(error, match=message):
            sampler.rollout(*args, progress=False, **kwargs)
    assert model.calls == calls and sampler.stats == stats

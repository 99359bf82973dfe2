"""NoiseSchedule: tables, add_noise, parameterisations, loss weights, DDIM/DDPM steps."""

import itertools
import math

import pytest
import torch

from fastdf import diffusion_forcing as dforce

KINDS = ("cosine", "linear", "sigmoid")
PREDS = ("eps", "v", "x0")
G = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=G, dtype=dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [1, 7, 1000])
def test_alphas_cumprod(kind, steps):
    ab = dforce.NoiseSchedule(kind, steps).alphas_cumprod
    assert ab.dtype == torch.float64 and ab.shape == (steps + 1,)
    assert ab[0] == 1 and (ab[1:] < ab[:-1]).all() and ab[-1] > 0


def test_alphas_cumprod_closed_forms():
    n = 50
    cos = dforce.NoiseSchedule("cosine", n).alphas_cumprod
    f = lambda t: math.cos((t / n + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for k in range(1, n - 2):  # betas clip at 0.999 only at the very end
        assert cos[k].item() == pytest.approx(f(k) / f(0), rel=1e-12)
    lin = dforce.NoiseSchedule("linear", n).alphas_cumprod
    betas = [1e-4 * 20 + (0.02 * 20 - 1e-4 * 20) * i / (n - 1) for i in range(n)]
    assert lin[n].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-12)
    sig = dforce.NoiseSchedule("sigmoid", n).alphas_cumprod
    s = lambda t: 1 / (1 + math.exp(-(6 * t / n - 3)))  # noqa: E731
    for k in range(1, n - 2):
        assert sig[k].item() == pytest.approx((s(n) - s(k)) / (s(n) - s(0)), rel=1e-9)


def test_add_noise_per_frame_and_per_token():
    sched = dforce.NoiseSchedule("cosine", 100)
    x0, noise = randn(3, 5, 4, 2), randn(3, 5, 4, 2)
    levels = torch.randint(0, 101, (3, 5), generator=G)
    levels[0, 0] = 0
    out = sched.add_noise(x0, noise, levels)
    ab = sched.alphas_cumprod
    for b, f in itertools.product(range(3), range(5)):
        k = levels[b, f]
        want = ab[k].sqrt() * x0[b, f] + (1 - ab[k]).sqrt() * noise[b, f]
        torch.testing.assert_close(out[b, f], want, rtol=0, atol=1e-15)
    assert torch.equal(out[0, 0], x0[0, 0])  # level 0: the clean frame, exactly
    tokens = levels[:, :, None].expand(3, 5, 4).clone()
    assert torch.equal(sched.add_noise(x0, noise, tokens), out)  # per-token levels, same values
    tokens[:, :, 1] = 100
    per_token = sched.add_noise(x0, noise, tokens)
    torch.testing.assert_close(per_token[:, :, 1], sched.add_noise(x0[:, :, 1], noise[:, :, 1], tokens[:, :, 1]))
    assert sched.add_noise(x0.float(), noise.float(), levels).dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_parameterisations_round_trip_fp64(kind):
    sched = dforce.NoiseSchedule(kind, 1000)
    x0, noise = randn(2, 6, 3), randn(2, 6, 3)
    levels = torch.randint(1, 1001, (2, 6), generator=G)
    levels[0, :2] = torch.tensor([1, 1000])
    x_t = sched.add_noise(x0, noise, levels)
    for p in PREDS:
        got_x0, got_eps = sched.split(sched.target(x0, noise, levels, p), x_t, levels, p)
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(got_eps, noise, rtol=0, atol=1e-9)
    for src, dst in itertools.product(PREDS, PREDS):
        pred = randn(2, 6, 3)  # any model output, not only the true target
        there = sched.convert(pred, x_t, levels, src, dst)
        torch.testing.assert_close(sched.convert(there, x_t, levels, dst, src), pred, rtol=0, atol=1e-8)
        torch.testing.assert_close(there, sched.target(*sched.split(pred, x_t, levels, src), levels, dst), rtol=0, atol=1e-9)


def test_level_zero_is_clean_for_every_parameterisation():
    sched = dforce.NoiseSchedule("cosine", 10)
    x = randn(2, 3, 4)
    levels = torch.zeros(2, 3, dtype=torch.int64)
    for p in PREDS:
        x0, eps = sched.split(randn(2, 3, 4), x, levels, p)
        assert torch.equal(x0, x) and torch.isfinite(eps).all()


def test_loss_weights():
    sched = dforce.NoiseSchedule("cosine", 100)
    levels = torch.tensor([[0, 1, 10, 50, 100]])
    snr = sched.snr(levels)
    assert torch.isinf(snr[0, 0]) and torch.allclose(snr[0, 1:], sched.alphas_cumprod[levels[0, 1:]] / (1 - sched.alphas_cumprod[levels[0, 1:]]))
    noisy = snr[0, 1:]
    for p in PREDS:
        w = sched.loss_weight(levels, "uniform", p)
        assert w.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0]]
    torch.testing.assert_close(sched.loss_weight(levels, "snr", "eps")[0, 1:], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(sched.loss_weight(levels, "snr", "x0")[0, 1:], noisy)
    clipped = noisy.clamp(max=5.0)
    torch.testing.assert_close(sched.loss_weight(levels, "min_snr", "eps")[0, 1:], clipped / noisy)
    torch.testing.assert_close(sched.loss_weight(levels, "min_snr", "v")[0, 1:], clipped / (noisy + 1))
    torch.testing.assert_close(sched.loss_weight(levels, "min_snr", "x0", snr_gamma=2.0)[0, 1:], noisy.clamp(max=2.0))
    assert (sched.loss_weight(levels, "min_snr", "eps")[:, 0] == 0).all()
    with pytest.raises(ValueError, match="weighting"):
        sched.loss_weight(levels, "p2")
    with pytest.raises(ValueError, match="snr_gamma"):
        sched.loss_weight(levels, "min_snr", snr_gamma=0)


def test_ddim_with_the_true_prediction_lands_on_the_forward_process():
    sched = dforce.NoiseSchedule("sigmoid", 200)
    x0, noise = randn(2, 4, 3), randn(2, 4, 3)
    now = torch.tensor([[200, 150, 20, 1], [90, 90, 5, 3]])
    nxt = torch.tensor([[120, 0, 19, 0], [0, 60, 2, 1]])
    x_t = sched.add_noise(x0, noise, now)
    for p in PREDS:
        out = sched.step(x_t, sched.target(x0, noise, now, p), now, nxt, prediction=p)
        torch.testing.assert_close(out, sched.add_noise(x0, noise, nxt), rtol=0, atol=1e-9)


def test_ddim_eta0_is_deterministic_and_inverts_in_fp64():
    sched = dforce.NoiseSchedule("cosine", 1000)
    x_t, eps = randn(2, 5, 3), randn(2, 5, 3)
    now = torch.tensor([[1000, 700, 300, 40, 2]]).expand(2, 5)
    nxt = torch.tensor([[980, 500, 299, 1, 1]]).expand(2, 5)
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    a = sched.step(x_t, eps, now, nxt, generator=gen)
    b = sched.step(x_t, eps, now, nxt, generator=gen)
    assert torch.equal(a, b) and torch.equal(gen.get_state(), state)  # eta=0 draws nothing
    back = sched.step(a, eps, nxt, now)  # the same noise estimate, back up one step
    torch.testing.assert_close(back, x_t, rtol=0, atol=1e-10)


def test_ddpm_is_ddim_with_eta_one_and_unchanged_frames_are_untouched():
    sched = dforce.NoiseSchedule("linear", 100)
    x_t, pred, z = randn(3, 4, 2), randn(3, 4, 2), randn(3, 4, 2)
    now = torch.tensor([[100, 40, 7, 0]]).expand(3, 4)
    nxt = torch.tensor([[60, 40, 0, 0]]).expand(3, 4)
    for p in PREDS:
        ddpm = sched.step(x_t, pred, now, nxt, prediction=p, method="ddpm", noise=z)
        ddim = sched.step(x_t, pred, now, nxt, prediction=p, method="ddim", eta=1.0, noise=z)
        torch.testing.assert_close(ddpm, ddim, rtol=0, atol=1e-12)
        for out in (ddpm, sched.step(x_t, pred, now, nxt, prediction=p, eta=0.3, noise=z)):
            assert torch.equal(out[:, 1], x_t[:, 1]) and torch.equal(out[:, 3], x_t[:, 3])
            assert torch.equal(out[:, 2], sched.split(pred, x_t, now, p)[0][:, 2])  # level 0: the predicted x0
    # the noise term: variance of the posterior, from the generator when no noise is given
    wide = torch.full((4000, 1), 50)
    samples = sched.step(torch.zeros(4000, 1, dtype=torch.float64), torch.zeros(4000, 1, dtype=torch.float64),
                         wide, wide - 10, prediction="x0", method="ddpm", generator=torch.Generator().manual_seed(2))
    ab = sched.alphas_cumprod
    var = (1 - ab[40]) / (1 - ab[50]) * (1 - ab[50] / ab[40])
    assert samples.var().item() == pytest.approx(var.item(), rel=0.1)


def test_bad_levels_and_shapes_name_the_argument():
    sched = dforce.NoiseSchedule("cosine", 10)
    x = randn(2, 3, 4)
    with pytest.raises(ValueError, match="levels must lie in 0..10"):
        sched.add_noise(x, x, torch.full((2, 3), 11))
    with pytest.raises(ValueError, match="levels"):
        sched.add_noise(x, x, torch.full((2, 3), -1))
    with pytest.raises(TypeError, match="levels"):
        sched.add_noise(x, x, torch.full((2, 3), 1.0))
    with pytest.raises(ValueError, match="levels shape"):
        sched.add_noise(x, x, torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="noise"):
        sched.add_noise(x, x[:, :2], torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="pred"):
        sched.step(x, x[:, :2], torch.ones(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="next_levels"):
        sched.step(x, x, torch.ones(2, 3, dtype=torch.int64), torch.full((2, 3), 2), method="ddpm")
    with pytest.raises(ValueError, match="next_levels"):
        sched.step(x, x, torch.ones(2, 3, dtype=torch.int64), torch.full((2, 3), 12))
    with pytest.raises(ValueError, match="prediction"):
        sched.split(x, x, torch.ones(2, 3, dtype=torch.int64), "score")
    with pytest.raises(ValueError, match="eta"):
        sched.step(x, x, torch.ones(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64), eta=-0.1)
    with pytest.raises(ValueError, match="kind"):
        dforce.NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match="steps"):
        dforce.NoiseSchedule("cosine", 0)

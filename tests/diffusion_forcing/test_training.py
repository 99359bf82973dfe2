"""Training levels and the denoising loss."""

import pytest
import torch
from torch import nn

from fastdf import diffusion_forcing as dforce


def test_training_levels_independent_and_full_sequence():
    g = torch.Generator().manual_seed(0)
    ind = dforce.sample_training_levels(64, 9, 30, generator=g)
    assert ind.dtype == torch.int64 and ind.shape == (64, 9)
    assert ind.min() == 1 and ind.max() == 30 and len(ind.unique()) == 30
    assert (ind != ind[:, :1]).any(1).float().mean() > 0.9  # frames differ within a sequence
    full = dforce.sample_training_levels(64, 9, 30, "full_sequence", generator=g)
    assert (full == full[:, :1]).all() and len(full[:, 0].unique()) > 10
    with_clean = dforce.sample_training_levels(200, 9, 3, min_level=0, generator=g)
    assert with_clean.min() == 0
    again = dforce.sample_training_levels(64, 9, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, ind)
    with pytest.raises(ValueError, match="mode"):
        dforce.sample_training_levels(2, 3, 10, mode="diagonal")
    with pytest.raises(ValueError, match="frames"):
        dforce.sample_training_levels(2, 0, 10)
    with pytest.raises(ValueError, match="min_level"):
        dforce.sample_training_levels(2, 3, 10, min_level=11)


class Linear(nn.Module):
    frame_shape = (4,)

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4, dtype=torch.float64)

    def forward(self, x, levels):
        return self.lin(torch.cat([x, levels[..., None].to(x.dtype) / 50], -1))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("weighting", ["uniform", "snr", "min_snr"])
def test_training_step_is_the_weighted_mse(prediction, weighting):
    sched = dforce.NoiseSchedule("sigmoid", 50)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    levels = torch.randint(1, 51, (3, 7), generator=g)
    model = Linear()
    loss = dforce.training_step(model, x0, sched, prediction=prediction, weighting=weighting, levels=levels, noise=noise)
    x_t = sched.add_noise(x0, noise, levels)
    err = (model(x_t, levels) - sched.target(x0, noise, levels, prediction)) ** 2
    want = (sched.loss_weight(levels, weighting, prediction)[..., None] * err).mean()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    loss.backward()
    assert model.lin.weight.grad is not None and model.lin.weight.grad.abs().sum() > 0

    def oracle(x, lv):  # knows x0, so outputs the exact target
        return sched.convert(x0, x, lv, "x0", prediction)

    exact = dforce.training_step(oracle, x0, sched, prediction=prediction, weighting=weighting, levels=levels, noise=noise)
    assert exact.item() < 1e-20


def test_training_step_draws_levels_by_mode_and_checks_inputs():
    sched = dforce.NoiseSchedule("cosine", 20)
    seen = []

    def model(x, levels):
        seen.append(levels)
        return x

    x0 = torch.randn(4, 6, 4)
    loss = dforce.training_step(model, x0, sched, mode="full_sequence", generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert (seen[0] == seen[0][:, :1]).all() and seen[0].min() >= 1
    with pytest.raises(ValueError, match="x0"):
        dforce.training_step(Linear(), torch.randn(2, 3, 5, dtype=torch.float64), sched)  # frame shape
    with pytest.raises(ValueError, match="model must return"):
        dforce.training_step(lambda x, lv: x[:, :1], x0, sched)
    with pytest.raises(ValueError, match="levels"):
        dforce.training_step(model, x0, sched, levels=torch.full((4, 6), 21))
    with pytest.raises(ValueError, match="prediction"):
        dforce.training_step(model, x0, sched, prediction="score")


def test_a_few_steps_of_training_lower_the_loss():
    torch.manual_seed(0)
    sched = dforce.NoiseSchedule("cosine", 50)
    model = Linear()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    data = torch.randn(256, 5, 1, dtype=torch.float64) * 0.1 + torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = dforce.training_step(model, data, sched, prediction="x0", weighting="uniform", generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])

"""Bad input to DFTransformer (issue 9): B = 0 / F = 0 is a ValueError (as in training_step
and Sampler.rollout), constructor knobs name the argument, a call that fails half-way
through the blocks leaves the cache as it was, and a window longer than the sequence is
no window."""

import math

import pytest
import torch

from fastdf import diffusion_forcing as dforce
from fastdf.models import DFTransformer

STEPS = 20


def _model(frame_shape=(2, 4), **kw):
    model = DFTransformer(frame_shape, **{"dim": 16, "depth": 2, "num_heads": 2, "level_dim": 8, **kw})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _inputs(B=2, F=3, frame_shape=(2, 4)):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, F, *frame_shape, generator=g), torch.randint(0, STEPS, (B, F), generator=g)


@pytest.mark.parametrize("B,F", [(0, 3), (2, 0)])
def test_empty_batch_or_sequence_is_a_value_error_as_everywhere(B, F):
    model = _model()
    x, levels = _inputs(max(B, 1), max(F, 1))
    x, levels = x[:B, :F], levels[:B, :F]
    with pytest.raises(ValueError, match="B >= 1, F >= 1"):
        model(x, levels)
    with pytest.raises(ValueError, match="B >= 1, F >= 1"):
        dforce.training_step(model, x, dforce.NoiseSchedule("cosine", STEPS))


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(num_heads=0), ValueError, "num_heads"), (dict(dim=0), ValueError, "dim"),
    (dict(num_kv_heads=0), ValueError, "num_kv_heads"), (dict(depth=1.0), TypeError, "depth"),
    (dict(mlp_ratio=math.nan), ValueError, "mlp_ratio"), (dict(eps=-1.0), ValueError, "eps"),
    (dict(rope_theta=math.inf), ValueError, "rope_theta"), (dict(cond_dim=0), ValueError, "cond_dim"),
    (dict(norm=3), TypeError, "norm"), (dict(frame_shape=(10**30,)), ValueError, "frame_shape"),
    (dict(dim=10**30), ValueError, "dim"),
])
def test_constructor_names_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        DFTransformer(**{"frame_shape": (4,), "dim": 16, "num_heads": 2, **kwargs})


def test_call_errors_name_the_argument_and_keep_the_cache():
    model = _model(cond_dim=3)
    x, levels = _inputs()
    cache = model.new_cache(2, 6)
    with torch.no_grad():
        model(x, levels, cache=cache, commit=1)
    for kwargs, error, name in [
        (dict(commit=1.5), TypeError, "commit"), (dict(commit=True), TypeError, "commit"),
        (dict(x=x.long()), TypeError, "x must be a floating"),
        (dict(cond=torch.randn(2, 3, dtype=torch.float64).long()), TypeError, "cond"),
        (dict(window_frames=2.0), TypeError, "window_frames"),
    ]:
        args = {"x": x, "levels": levels, "cache": cache, **kwargs}
        with pytest.raises(error, match=name), torch.no_grad():
            model(args.pop("x"), args.pop("levels"), **args)
        assert cache.frames == 1 and all(layer.frames == 1 for layer in cache.layers)
    with pytest.raises(ValueError, match="max_frames"):
        model.new_cache(2, 10**30)
    assert model.new_cache(2, 10**30, window_frames=4).frames == 0  # a window keeps only what it sees


def test_failure_half_way_leaves_every_layer_as_it_was(monkeypatch):
    model = _model()
    x, levels = _inputs(F=4)
    with torch.no_grad():
        full = model(x, levels)
        cache = model.new_cache(2, 4)
        model(x[:, :1], levels[:, :1], cache=cache, commit=1)
        second = model.blocks[1].forward

        def broken(*args, **kwargs):
            raise RuntimeError("out of memory (simulated)")

        monkeypatch.setattr(model.blocks[1], "forward", broken)
        with pytest.raises(RuntimeError, match="simulated"):
            model(x[:, 1:3], levels[:, 1:3], cache=cache, commit=2)
        monkeypatch.setattr(model.blocks[1], "forward", second)
        # Layer 0 ran and had its K/V pending; none were committed, in any layer.
        assert [layer.frames for layer in cache.layers] == [1, 1]
        assert all(layer._pending is None for layer in cache.layers)
        got = model(x[:, 1:], levels[:, 1:], cache=cache)
    torch.testing.assert_close(got, full[:, 1:], atol=1e-5, rtol=1e-4)


def test_window_longer_than_the_sequence_is_no_window():
    model = _model()
    x, levels = _inputs(F=5)
    with torch.no_grad():
        want = model(x, levels)
        torch.testing.assert_close(model(x, levels, window_frames=10**30, sink_frames=10**30), want)
        cache = model.new_cache(2, 5, window_frames=10**30, sink_frames=10**30)
        got = torch.cat([model(x[:, i:i + 1], levels[:, i:i + 1], cache=cache, commit=1, window_frames=10**30,
                               sink_frames=10**30) for i in range(5)], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="window_frames"):  # the checker cannot build that long a sequence
        dforce.check_model(model, (2, 4), steps=STEPS, frames=5, window_frames=10**30)
    with pytest.raises(ValueError, match="frames must be >= 4"):
        dforce.check_model(model, (2, 4), steps=STEPS, frames=3)
    with pytest.raises(ValueError, match="atol"):
        dforce.check_model(model, (2, 4), steps=STEPS, atol=math.nan)

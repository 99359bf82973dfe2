"""Property-based checks of the workflow surface (issue #9): scheduling matrices, noise
schedules, the KV cache, expert selection. Valid calls obey the documented formula;
invalid ones raise ValueError/TypeError naming the argument and leave every object as it
was. Torch only (no kernels), fixed seeds, bounded examples."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from fastdf import diffusion_forcing as dforce
from fastdf.esft import RoutingStats, select_experts
from fastdf.nn import KVCache

from tests.hardening.test_properties import BAD_FLOATS, names_argument

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate))

NOT_INTS = [1.5, True, "3", None, float("nan")]


def expect_error(names, fn, *args, **kwargs):
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*args, **kwargs)
    assert names_argument(str(info.value), names), f"{type(info.value).__name__}({info.value}) does not name {names}"


# --------------------------------------------------------------------- scheduling_matrix

@SETTINGS
@given(kind=st.sampled_from(["full_sequence", "autoregressive", "pyramid"]), horizon=st.integers(1, 12),
       steps=st.integers(1, 12), u=st.floats(0, 4, allow_nan=False))
def test_scheduling_matrix_is_the_formula(kind, horizon, steps, u):
    levels = dforce.scheduling_matrix(kind, horizon, steps, uncertainty=u if kind == "pyramid" else None)
    u = {"full_sequence": 0.0, "autoregressive": float(steps), "pyramid": u}[kind]
    rows = steps + math.floor((horizon - 1) * u)
    m = torch.arange(rows + 1)[:, None]
    lag = torch.tensor([math.floor(t * u) for t in range(horizon)])[None, :]
    assert levels.dtype == torch.int64
    assert torch.equal(levels, (steps + lag - m).clamp(0, steps))


@SETTINGS
@given(horizon=st.integers(1, 12), steps=st.integers(1, 12), u=st.floats(0, 4, allow_nan=False))
def test_trapezoid_rows_go_from_noise_to_clean(horizon, steps, u):
    levels = dforce.scheduling_matrix("trapezoid", horizon, steps, uncertainty=u)
    assert (levels[0] == steps).all() and (levels[-1] == 0).all()
    assert (levels[1:] <= levels[:-1]).all()


@SETTINGS
@given(arg=st.sampled_from(["kind", "horizon", "steps", "uncertainty"]), data=st.data())
def test_scheduling_matrix_refuses_bad_arguments(arg, data):
    args = dict(kind="pyramid", horizon=4, steps=3, uncertainty=1.0)
    bad = {"kind": ["spiral", 3, None],
           "horizon": [0, -1, *NOT_INTS, 10**30],
           "steps": [0, -2, *NOT_INTS, 10**30],
           "uncertainty": [*BAD_FLOATS, -1.0, 1e20, "1"]}[arg]
    args[arg] = data.draw(st.sampled_from(bad))
    expect_error([arg], dforce.scheduling_matrix, args.pop("kind"), args.pop("horizon"), args.pop("steps"), **args)


# --------------------------------------------------------------------- NoiseSchedule

@SETTINGS
@given(kind=st.sampled_from(["cosine", "linear", "sigmoid"]), steps=st.integers(1, 50), frames=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_add_noise_is_the_formula(kind, steps, frames, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    schedule = dforce.NoiseSchedule(kind, steps)
    x0 = torch.randn(2, frames, 3, generator=g).to(dtype)
    noise = torch.randn(2, frames, 3, generator=g).to(dtype)
    levels = torch.randint(0, steps + 1, (2, frames), generator=g)
    before = (x0.clone(), noise.clone(), levels.clone())
    out = schedule.add_noise(x0, noise, levels)
    ab = schedule.alphas_cumprod[levels][..., None]
    expected = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[levels == 0], x0[levels == 0])  # clean frames stay bit-exact
    assert all(torch.equal(a, b) for a, b in zip(before, (x0, noise, levels)))


@SETTINGS
@given(arg=st.sampled_from(["x0", "noise", "levels"]), data=st.data())
def test_add_noise_refuses_bad_arguments(arg, data):
    schedule = dforce.NoiseSchedule("cosine", 10)
    args = dict(x0=torch.randn(2, 3, 4), noise=torch.randn(2, 3, 4), levels=torch.randint(0, 11, (2, 3)))
    bad = {"x0": [args["x0"].long(), args["x0"].bool(), args["x0"].tolist(), args["x0"][0]],
           "noise": [args["noise"].long(), args["noise"][..., :-1], None],
           "levels": [args["levels"].float(), args["levels"] + 11, args["levels"] - 11, args["levels"][:, :, None, None],
                      [0, 1]]}[arg]
    args[arg] = data.draw(st.sampled_from(bad))
    expect_error([arg], schedule.add_noise, **args)


@SETTINGS
@given(data=st.data())
def test_noise_schedule_refuses_bad_construction(data):
    arg, value = data.draw(st.sampled_from([("kind", "quadratic"), ("kind", 1), ("steps", 0), ("steps", 2.0),
                                            ("steps", True), ("steps", 10**30)]))
    kwargs = dict(kind="cosine", steps=10)
    kwargs[arg] = value
    expect_error([arg], dforce.NoiseSchedule, **kwargs)


# --------------------------------------------------------------------- KVCache

def _cache_state(cache):
    return (cache.frames, cache.cached_frames, dict(cache.stats),
            None if cache.keys is None else cache.keys.clone(), None if cache.values is None else cache.values.clone())


def _same_state(a, b):
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


@SETTINGS
@given(window=st.one_of(st.none(), st.integers(1, 3)), sinks=st.integers(0, 1), frame=st.integers(1, 2),
       calls=st.lists(st.tuples(st.integers(1, 2), st.integers(0, 2)), min_size=1, max_size=5), data=st.data())
def test_kv_cache_bad_calls_change_nothing(window, sinks, frame, calls, data):
    cache = KVCache(frame_size=frame, window_frames=window, sink_frames=sinks if window else 0)
    g = torch.Generator().manual_seed(0)
    for new, keep in calls:  # some valid history first
        k = torch.randn(1, 2, new * frame, 4, generator=g)
        cache.extend(k, k + 1)
        cache.commit(min(keep, new))
    k = torch.randn(1, 2, frame, 4, generator=g)
    cache.extend(k, k + 1)
    before = _cache_state(cache)
    what = data.draw(st.sampled_from(["commit", "extend"]))
    if what == "commit":
        value = data.draw(st.sampled_from([1.5, -1, 2, True, "1", None, float("nan")]))
        expect_error(["num_frames"], cache.commit, value)
    else:
        bad = data.draw(st.sampled_from(["tokens", "heads", "dtype", "type"]))
        kb = {"tokens": torch.randn(1, 2, frame + 1, 4) if frame > 1 else torch.randn(1, 2, frame, 5),
              "heads": torch.randn(1, 3, frame, 4),
              "dtype": torch.randn(1, 2, frame, 4).long(),
              "type": [[0.0]]}[bad]
        # an empty cache may start over with other shapes; a filled one must refuse them
        assume(bad == "type" or cache.cached_frames > 0)
        expect_error(["k", "v", "keys", "values"], cache.extend, kb, kb if isinstance(kb, list) else kb.clone())
    _same_state(before, _cache_state(cache))


# --------------------------------------------------------------------- select_experts

def _stats(draw_scores):
    scores = torch.tensor(draw_scores, dtype=torch.float64)
    scores = scores / scores.sum(1, keepdim=True)
    return RoutingStats(layers=list(range(1, scores.shape[0] + 1)), gate_scores=scores, token_ratios=scores,
                        num_sequences=1, num_tokens=1)


@SETTINGS
@given(scores=st.lists(st.lists(st.floats(0.01, 1.0), min_size=4, max_size=4), min_size=1, max_size=3),
       p=st.floats(0.01, 1.0), method=st.sampled_from(["gate", "token"]))
def test_select_experts_takes_the_smallest_top_set_reaching_p(scores, p, method):
    stats = _stats(scores)
    selection = select_experts(stats, method=method, p=p)
    for row, layer in zip(stats.gate_scores, stats.layers):
        chosen = selection[layer]
        order = torch.sort(row, descending=True, stable=True).indices.tolist()
        n = len(chosen)
        assert sorted(order[:n]) == chosen  # a top set
        assert float(row[chosen].sum()) >= p - 1e-12 or n == len(order)
        assert n == 1 or float(row[order[:n - 1]].sum()) < p  # and the smallest one


@SETTINGS
@given(data=st.data())
def test_select_experts_refuses_bad_arguments(data):
    stats = _stats([[0.5, 0.3, 0.2]])
    arg, value = data.draw(st.sampled_from([("p", float("nan")), ("p", 0.0), ("p", 1.5), ("p", "0.1"), ("p", True),
                                            ("p", float("inf")), ("method", "median"), ("stats", {"layers": [1]})]))
    kwargs = dict(stats=stats, method="gate", p=0.1)
    kwargs[arg] = value
    expect_error([arg], select_experts, **kwargs)

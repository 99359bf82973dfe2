"""Both sampler cache policies driven by the reference DFTransformer: KV-cached rollouts equal
their recompute baselines (fp32), and the rolling policy commits each frame once, keeps
positions absolute and evicts beyond the window."""

import pytest
import torch

from fastdf import diffusion_forcing as dforce
from fastdf.models import DFTransformer

STEPS = 20
SHAPE = (2, 3)  # tokens per frame, channels


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DFTransformer(SHAPE, dim=32, depth=2, num_heads=2, num_kv_heads=1, level_dim=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def schedule():
    return dforce.NoiseSchedule("cosine", STEPS)


def _context(frames, batch=2, seed=1):
    return torch.randn(batch, frames, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _rollout(model, schedule, num_frames=11, context_frames=3, seed=3, guidance=None, **kw):
    kw = {"sampling_steps": 4, "window_frames": 6, **kw}
    sampler = dforce.Sampler(model, schedule, **kw)
    out = sampler.rollout(_context(context_frames), num_frames, guidance=guidance,
                          generator=torch.Generator().manual_seed(seed), progress=False)
    return out, sampler.stats


CASES = {
    "pyramid-fractional-sinks": dict(scheduling="pyramid", uncertainty=1.5, horizon=3, sink_frames=1),
    "trapezoid-noisy-context": dict(scheduling="trapezoid", uncertainty=2.0, horizon=4, context_noise=3),
    "autoregressive-ddpm-2sinks": dict(scheduling="autoregressive", horizon=2, method="ddpm", sink_frames=2),
    "full-sequence-eta-eps": dict(scheduling="full_sequence", horizon=3, eta=0.5, prediction="eps"),
    "pyramid-guided": dict(scheduling="pyramid", uncertainty=0.5, horizon=3, sink_frames=1, context_noise=2),
}


@pytest.mark.parametrize("policy", ["window", "rolling"])
@pytest.mark.parametrize("case", CASES)
def test_cached_rollout_matches_recompute(model, schedule, policy, case):
    guidance = None
    if case == "pyramid-guided":
        guidance = [dforce.HistoryGuidance(1.5), dforce.RewardGuidance(lambda x0, f: -(x0 - 0.5).pow(2).sum(), 0.1)]
    kw = dict(CASES[case], cache_policy=policy, guidance=guidance)
    cached, s_cached = _rollout(model, schedule, kv_cache=True, **kw)
    recomputed, s_recomputed = _rollout(model, schedule, kv_cache=False, **kw)
    assert cached.shape == (2, 11, *SHAPE) and torch.isfinite(cached).all()
    torch.testing.assert_close(cached, recomputed, atol=2e-5, rtol=1e-4)
    assert s_cached["calls"] == s_recomputed["calls"]
    assert s_cached["frames"] < s_recomputed["frames"]
    assert s_recomputed["caches"] == 0
    assert s_cached["caches"] == 1 if policy == "rolling" else s_cached["caches"] > 1  # window: one per slide


def test_policies_differ_once_the_window_slides(model, schedule):
    window, _ = _rollout(model, schedule, cache_policy="window", horizon=2)
    rolling, _ = _rollout(model, schedule, cache_policy="rolling", horizon=2)
    # the first chunk sees the same frames at the same positions under both policies
    torch.testing.assert_close(window[:, :2], rolling[:, :2], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(window[:, -2:], rolling[:, -2:], atol=1e-3)


def test_rolling_takes_context_longer_than_the_window(model, schedule):
    kw = dict(cache_policy="rolling", horizon=2, sink_frames=1, context_frames=9)
    cached, _ = _rollout(model, schedule, num_frames=4, kv_cache=True, **kw)
    recomputed, _ = _rollout(model, schedule, num_frames=4, kv_cache=False, **kw)
    torch.testing.assert_close(cached, recomputed, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="context"):
        _rollout(model, schedule, num_frames=4, horizon=2, context_frames=9)  # window policy: too long


class Recorder:
    """Wraps a DFModel; records per call the cache state and what was passed."""

    def __init__(self, inner):
        self.inner, self.calls, self.caches = inner, [], []

    def new_cache(self, batch, max_frames, **mask):
        cache = self.inner.new_cache(batch, max_frames, **mask)
        cache.committed = []  # frames committed, as presented
        self.caches.append((cache, max_frames, mask))
        return cache

    def __call__(self, x, levels, *, cache=None, commit=0, **mask):
        self.calls.append(dict(frames=x.shape[1], start=None if cache is None else cache.frames, commit=commit,
                               mask=mask, levels=levels.clone()))
        if cache is None:
            return self.inner(x, levels, **mask)
        before = cache.frames
        out = self.inner(x, levels, cache=cache, commit=commit, **mask)
        assert cache.frames == before + commit
        cache.committed += [x[:, i] for i in range(commit)]
        return out


def test_rolling_cache_commits_each_frame_once_at_absolute_positions(model, schedule):
    window, sinks, n_ctx, n_new, horizon = 4, 1, 3, 10, 2
    rec = Recorder(model)
    sampler = dforce.Sampler(rec, schedule, 3, "pyramid", 1.0, window_frames=window, sink_frames=sinks,
                             horizon=horizon, cache_policy="rolling")
    context = _context(n_ctx)
    out = sampler.rollout(context, n_new, generator=torch.Generator().manual_seed(0), progress=False)
    (cache, max_frames, mask), = rec.caches
    assert max_frames == n_ctx + n_new and mask == dict(window_frames=window, sink_frames=sinks)
    seq = torch.cat([context, out], 1)
    # every frame but the last chunk's (never needed as context) committed once, in order, as presented
    assert n_ctx + n_new - horizon <= cache.frames <= n_ctx + n_new
    torch.testing.assert_close(torch.stack(cache.committed, 1), seq[:, :cache.frames], rtol=0, atol=0)
    assert cache.cached_frames == sinks + window - 1  # evicted down to the sinks and the recent frames
    starts = [c["start"] for c in rec.calls]
    assert starts == sorted(starts) and starts[0] == 0  # positions only grow: never restarted
    for call in rec.calls:
        assert call["mask"] == mask
        assert (call["levels"][:, :call["commit"]] == 0).all() and (call["levels"][:, call["commit"]:] > 0).all()


def test_rolling_recompute_runs_the_full_history(model, schedule):
    rec = Recorder(model)
    sampler = dforce.Sampler(rec, schedule, 3, "autoregressive", window_frames=4, horizon=1, kv_cache=False,
                             cache_policy="rolling")
    sampler.rollout(_context(2), 5, generator=torch.Generator().manual_seed(0), progress=False)
    assert [c["frames"] for c in rec.calls] == [2 + f + 1 for f in range(5) for _ in range(3)]
    assert all(c["start"] is None and c["mask"] == dict(window_frames=4, sink_frames=0) for c in rec.calls)


def test_history_guidance_weight_one_is_plain_under_rolling(model, schedule):
    plain, _ = _rollout(model, schedule, cache_policy="rolling", horizon=2)
    one, _ = _rollout(model, schedule, cache_policy="rolling", horizon=2, guidance=dforce.HistoryGuidance(1.0))
    two, _ = _rollout(model, schedule, cache_policy="rolling", horizon=2, guidance=dforce.HistoryGuidance(2.0))
    assert torch.equal(plain, one) and not torch.allclose(plain, two, atol=1e-3)


class _PhaseOneModel:
    """Implements only the phase-1 protocol (no window arguments)."""

    def __init__(self, inner):
        self.inner = inner

    def new_cache(self, batch, max_frames):
        return self.inner.new_cache(batch, max_frames)

    def __call__(self, x, levels, *, cache=None, commit=0):
        return self.inner(x, levels, cache=cache, commit=commit)


def test_rolling_needs_the_extension_and_a_known_policy(model, schedule):
    old = _PhaseOneModel(model)
    out, _ = _rollout(old, schedule, horizon=2)  # the window policy still drives phase-1 models
    torch.testing.assert_close(out, _rollout(model, schedule, horizon=2)[0])
    with pytest.raises(TypeError, match="window_frames"):
        dforce.Sampler(old, schedule, 4, window_frames=6, cache_policy="rolling")
    with pytest.raises(ValueError, match="cache_policy"):
        dforce.Sampler(model, schedule, 4, window_frames=6, cache_policy="ring")


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["window", "rolling"])
def test_cached_rollout_matches_recompute_on_gpu(policy):
    """fp32 on the GPU kernels (triton df_attention / AdaLN), frames of 64 tokens."""
    import fastdf

    torch.manual_seed(0)
    m = DFTransformer((64, 8), dim=128, depth=2, num_heads=2, level_dim=32)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m = m.cuda().eval()
    schedule = dforce.NoiseSchedule("cosine", 100)
    context = torch.randn(2, 5, 64, 8, device="cuda")
    outs = []
    with fastdf.backend("triton"):
        for kv_cache in (True, False):
            sampler = dforce.Sampler(m, schedule, 4, "pyramid", 1.0, window_frames=6, horizon=3, sink_frames=1,
                                     kv_cache=kv_cache, cache_policy=policy)
            outs.append(sampler.rollout(context, 9, generator=torch.Generator("cuda").manual_seed(0), progress=False))
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-3, rtol=1e-3)

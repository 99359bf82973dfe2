"""Sampler and model protocol, driven by a tiny frame-causal transformer defined here.

TinyDF is pure torch (SDPA with an explicit frame-causal mask, rotary positions per frame,
per-frame AdaLN, a per-layer K/V cache) and follows DESIGN.md §4's df_attention semantics:
queries are the newest frames, positions count from the start of the cache.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdf import diffusion_forcing as dforce

STEPS = 20  # noise schedule levels
TOKENS, CHANNELS = 2, 3  # frame shape (tokens per frame, channels)


class TinyCache:
    def __init__(self, layers):
        self.k = [None] * layers
        self.v = [None] * layers
        self.frames = 0


def _rotate(x, pos):
    """Rotary embedding over the last dim of x [B, H, T, d] at positions pos [T]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (100.0 ** (torch.arange(half, dtype=torch.float64) / half))
    ang = (pos.to(torch.float64)[:, None] * freq[None]).to(x.dtype)
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


class TinyDF(nn.Module):
    """A DFModel: frames [B, F, TOKENS, CHANNELS], per-frame levels [B, F]."""

    def __init__(self, dim=16, heads=2, layers=2, steps=STEPS, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.steps, self.layers = heads, steps, layers
        self.inp = nn.Linear(CHANNELS, dim)
        self.tok = nn.Parameter(torch.randn(TOKENS, dim) * 0.1)
        self.level = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.ada = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(layers))
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                 for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, CHANNELS))

    frame_shape = (TOKENS, CHANNELS)

    def new_cache(self, batch, max_frames):
        return TinyCache(self.layers)

    def _level_embedding(self, levels):
        dim = self.inp.out_features
        freq = torch.exp(-math.log(1000.0) * torch.arange(dim // 2) / (dim // 2))
        ang = levels.float()[..., None] * 50.0 / self.steps * freq
        return self.level(torch.cat([ang.sin(), ang.cos()], -1))

    def forward(self, x, levels, *, cache=None, commit=0):
        if commit and cache is None:
            raise ValueError("commit needs a cache")
        b, f = x.shape[:2]
        start = cache.frames if cache is not None else 0
        h = (self.inp(x) + self.tok).reshape(b, f * TOKENS, -1)
        cond = self._level_embedding(levels)
        q_frames = torch.arange(start, start + f).repeat_interleave(TOKENS)
        k_frames = torch.arange(start + f).repeat_interleave(TOKENS)
        mask = k_frames[None, :] <= q_frames[:, None]
        new_kv = []
        for i in range(self.layers):
            shift, scale = self.ada[i](cond).repeat_interleave(TOKENS, 1).chunk(2, -1)
            y = F.layer_norm(h, h.shape[-1:]) * (1 + scale) + shift
            q, k, v = self.qkv[i](y).view(b, -1, 3, self.heads, h.shape[-1] // self.heads).permute(2, 0, 3, 1, 4)
            q, k = _rotate(q, q_frames), _rotate(k, q_frames)
            new_kv.append((k[:, :, :commit * TOKENS], v[:, :, :commit * TOKENS]))
            if cache is not None and cache.frames:
                k, v = torch.cat([cache.k[i], k], 2), torch.cat([cache.v[i], v], 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            h = h + self.proj[i](o.transpose(1, 2).reshape(b, f * TOKENS, -1))
            h = h + self.mlp[i](h)
        if commit:
            for i, (k, v) in enumerate(new_kv):
                cache.k[i] = k if cache.frames == 0 else torch.cat([cache.k[i], k], 2)
                cache.v[i] = v if cache.frames == 0 else torch.cat([cache.v[i], v], 2)
            cache.frames += commit
        return self.out(h).view(x.shape)


@pytest.fixture(scope="module")
def model():
    return TinyDF().eval()


@pytest.fixture(scope="module")
def schedule():
    return dforce.NoiseSchedule("cosine", STEPS)


def _context(frames, batch=2, seed=1):
    return torch.randn(batch, frames, TOKENS, CHANNELS, generator=torch.Generator().manual_seed(seed))


def _rollout(model, schedule, num_frames=9, context_frames=2, seed=3, guidance=None, **kw):
    kw = {"sampling_steps": 4, "window_frames": 6, **kw}
    sampler = dforce.Sampler(model, schedule, **kw)
    out = sampler.rollout(_context(context_frames), num_frames, guidance=guidance,
                          generator=torch.Generator().manual_seed(seed), progress=False)
    return out, sampler.stats


# ---------------------------------------------------------------------------- the protocol


def test_tiny_model_honours_protocol(model):
    assert isinstance(model, dforce.DFModel)
    dforce.check_model(model, (TOKENS, CHANNELS), steps=STEPS, frames=6)


class _NoPositions(TinyDF):
    """Breaks the protocol: positions restart at 0 in every call, ignoring the cache."""

    def forward(self, x, levels, *, cache=None, commit=0):
        frames = cache.frames if cache is not None else 0
        if cache is not None:
            cache.frames = 0
        try:
            return super().forward(x, levels, cache=cache, commit=commit)
        finally:
            if cache is not None:
                cache.frames += frames


def test_check_model_catches_a_broken_cache():
    with pytest.raises(AssertionError, match="differs"):
        dforce.check_model(_NoPositions().eval(), (TOKENS, CHANNELS), steps=STEPS)


# ---------------------------------------------------------------------------- cache == recompute


CASES = {
    "pyramid-fractional-sinks": dict(scheduling="pyramid", uncertainty=1.5, horizon=3, sink_frames=1),
    "trapezoid-noisy-context": dict(scheduling="trapezoid", uncertainty=2.0, horizon=4, context_noise=3),
    "autoregressive-ddpm": dict(scheduling="autoregressive", horizon=2, method="ddpm", sink_frames=2),
    "full-sequence-eta": dict(scheduling="full_sequence", horizon=3, eta=0.5, prediction="eps"),
    "pyramid-guided": dict(scheduling="pyramid", uncertainty=0.5, horizon=3, sink_frames=1, context_noise=2),
}


@pytest.mark.parametrize("case", CASES)
def test_cached_rollout_matches_recompute(model, schedule, case):
    kw = CASES[case]
    guidance = None
    if case == "pyramid-guided":
        guidance = [dforce.HistoryGuidance(1.5), dforce.RewardGuidance(lambda x0, frames: -(x0 - 0.5).pow(2).sum(), 0.1)]
    cached, s_cached = _rollout(model, schedule, guidance=guidance, kv_cache=True, **kw)
    recomputed, s_recomputed = _rollout(model, schedule, guidance=guidance, kv_cache=False, **kw)
    assert cached.shape == (2, 9, TOKENS, CHANNELS) and torch.isfinite(cached).all()
    torch.testing.assert_close(cached, recomputed, atol=2e-5, rtol=1e-4)
    assert s_cached["calls"] == s_recomputed["calls"]
    assert s_cached["frames"] < s_recomputed["frames"]  # the cache is what saves the work
    assert s_recomputed["caches"] == 0 and s_cached["caches"] >= 1


def test_rollout_is_reproducible_and_seeded(model, schedule):
    a, _ = _rollout(model, schedule, method="ddpm")
    b, _ = _rollout(model, schedule, method="ddpm")
    c, _ = _rollout(model, schedule, method="ddpm", seed=4)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_rollout_goes_far_past_the_window(model, schedule):
    out, stats = _rollout(model, schedule, num_frames=24, context_frames=3, window_frames=5, horizon=2, sink_frames=1)
    assert out.shape[1] == 24 and torch.isfinite(out).all()
    assert out.std() < 10


# ---------------------------------------------------------------------------- window, sinks, commits


class Recorder:
    """Wraps a DFModel and records, per call, the frames the model saw (cached + passed)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def new_cache(self, batch, max_frames):
        cache = self.inner.new_cache(batch, max_frames)
        cache.seen = []  # frames committed to this cache, as presented
        return cache

    def __call__(self, x, levels, *, cache=None, commit=0):
        before = [] if cache is None else list(cache.seen)
        self.calls.append(dict(cached=before, x=x.clone(), levels=levels.clone(), commit=commit, cache=cache))
        if cache is None:
            return self.inner(x, levels)
        out = self.inner(x, levels, cache=cache, commit=commit)
        cache.seen += [x[:, i] for i in range(commit)]
        return out


def _expected_history(before, chunk, window, sinks):
    recent = window - chunk
    return list(range(before)) if before <= recent else list(range(sinks)) + list(range(before - (recent - sinks), before))


@pytest.mark.parametrize("kv_cache", [True, False])
def test_window_and_sinks_hold_exactly_the_contracted_frames(model, schedule, kv_cache):
    window, sinks, horizon, n_ctx, n_new = 6, 2, 2, 3, 9
    rec = Recorder(model)
    sampler = dforce.Sampler(rec, schedule, 3, "autoregressive", window_frames=window, sink_frames=sinks,
                             horizon=horizon, kv_cache=kv_cache)
    context = _context(n_ctx)
    out = sampler.rollout(context, n_new, generator=torch.Generator().manual_seed(0), progress=False)
    seq = torch.cat([context, out], 1)
    rows_per_chunk = sampler.matrix(horizon).shape[0] - 1
    for i, call in enumerate(rec.calls):
        done = (i // rows_per_chunk) * horizon
        hist = _expected_history(n_ctx + done, min(horizon, n_new - done), window, sinks)
        seen = call["cached"] + [call["x"][:, j] for j in range(call["x"].shape[1])]
        assert len(seen) <= window
        # the window's history: exactly the contracted frames, in order (context_noise=0: clean)
        for slot, frame in enumerate(hist):
            torch.testing.assert_close(seen[slot], seq[:, frame], rtol=0, atol=0)
        assert len(seen) >= len(hist) + 1


def test_cache_commits_each_frame_once_and_runs_only_noisy_frames(model, schedule):
    rec = Recorder(model)
    sampler = dforce.Sampler(rec, schedule, 4, "pyramid", 1.0, window_frames=12, horizon=3)
    context = _context(2)
    out = sampler.rollout(context, 9, generator=torch.Generator().manual_seed(0), progress=False)
    caches = {id(c["cache"]) for c in rec.calls}
    assert len(caches) == 1 and sampler.stats["caches"] == 1  # the window never slid: one cache throughout
    # every frame committed once, in order: the context, the first two chunks, and the last
    # chunk's frames that finished while a later one was still denoising (pyramid)
    seen = rec.calls[0]["cache"].seen
    assert len(seen) == 2 + 6 + 2
    torch.testing.assert_close(torch.stack(seen, 1), torch.cat([context, out], 1)[:, :len(seen)], rtol=0, atol=0)
    for call in rec.calls:
        levels = call["levels"][0]
        assert (levels[:call["commit"]] == 0).all()  # commits are clean frames (context_noise=0) ...
        assert (levels[call["commit"]:] > 0).all()  # ... and the rest are still being denoised


def test_sliding_window_starts_a_new_cache(model, schedule):
    _, stats = _rollout(model, schedule, num_frames=9, context_frames=2, window_frames=5, horizon=2)
    # chunks start at frames 2, 4, 6, 8, 10; the window (3 history frames) slides from the second on
    assert stats["caches"] == 5


# ---------------------------------------------------------------------------- guidance


def test_reward_guidance_pulls_samples_its_way(model, schedule):
    plain, _ = _rollout(model, schedule)
    pulled, _ = _rollout(model, schedule, guidance=lambda x0, frames: x0.sum())
    pushed, _ = _rollout(model, schedule, guidance=dforce.RewardGuidance(lambda x0, frames: x0.sum(), scale=-1.0))
    assert pulled.mean() > plain.mean() + 0.5 and pushed.mean() < plain.mean() - 0.5


def test_reward_guidance_sees_frame_indices(model, schedule):
    seen = set()

    def reward(x0, frames):
        seen.update(frames.tolist())
        return (x0 * (frames == 8).view(1, -1, 1, 1)).sum()  # only the last frame is rewarded

    plain, _ = _rollout(model, schedule)
    guided, _ = _rollout(model, schedule, guidance=reward)
    assert seen == set(range(9))
    assert guided[:, 8].mean() > plain[:, 8].mean() + 0.5


def test_history_guidance_weight(model, schedule):
    plain, _ = _rollout(model, schedule)
    one, s_one = _rollout(model, schedule, guidance=dforce.HistoryGuidance(1.0))
    two, s_two = _rollout(model, schedule, guidance=dforce.HistoryGuidance(2.0))
    assert torch.equal(plain, one) and not torch.allclose(plain, two, atol=1e-3)
    assert torch.isfinite(two).all()


# ---------------------------------------------------------------------------- progress and errors


def test_progress_bar(model, schedule, capsys):
    sampler = dforce.Sampler(model, schedule, 3, window_frames=4, horizon=2)
    sampler.rollout(_context(1), 4, progress=False)
    assert "rollout" not in capsys.readouterr().err
    sampler.rollout(_context(1), 4, progress=True)
    assert "rollout" in capsys.readouterr().err


def test_bad_input_names_the_argument(model, schedule):
    sampler = dforce.Sampler(model, schedule, 4, window_frames=4, horizon=2)
    with pytest.raises(ValueError, match="context"):
        sampler.rollout(_context(5), 3, progress=False)  # longer than the window
    with pytest.raises(ValueError, match="context"):
        sampler.rollout(torch.randn(2, 3), 3, progress=False)
    with pytest.raises(TypeError, match="num_frames"):
        sampler.rollout(_context(2), 2.0, progress=False)
    with pytest.raises(ValueError, match="context"):  # frame shape the model does not take
        sampler.rollout(torch.randn(2, 2, TOKENS + 1, CHANNELS), 2, progress=False)
    wrong = dforce.Sampler(lambda x, levels: x[:, :1], schedule, 4, window_frames=4, horizon=2, kv_cache=False)
    with pytest.raises(ValueError, match="model returned"):
        wrong.rollout(_context(2), 2, progress=False)
    with pytest.raises(TypeError, match="guidance"):
        sampler.rollout(_context(2), 2, guidance=3, progress=False)
    with pytest.raises(ValueError, match="HistoryGuidance"):
        sampler.rollout(_context(2), 2, guidance=[dforce.HistoryGuidance(2), dforce.HistoryGuidance(3)], progress=False)
    with pytest.raises(ValueError, match="reward"):
        sampler.rollout(_context(2), 2, guidance=lambda x0, f: 1.0, progress=False)
    for kwargs, name in [
        (dict(sampling_steps=STEPS + 1), "sampling_steps"),
        (dict(horizon=4, sink_frames=1), "horizon"),
        (dict(sink_frames=4), "sink_frames"),
        (dict(context_noise=STEPS + 1), "context_noise"),
        (dict(prediction="noise"), "prediction"),
        (dict(scheduling="zigzag"), "kind"),
        (dict(scheduling="autoregressive", uncertainty=2.0), "uncertainty"),
        (dict(eta=1.5), "eta"),
    ]:
        args = {"sampling_steps": 4, "window_frames": 4, **kwargs}
        with pytest.raises(ValueError, match=name):
            dforce.Sampler(model, schedule, **args)
    with pytest.raises(TypeError, match="new_cache"):
        dforce.Sampler(lambda x, levels: x, schedule, 4, window_frames=4)
    with pytest.raises(TypeError, match="schedule"):
        dforce.Sampler(model, "cosine", 4, window_frames=4)

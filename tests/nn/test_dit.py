"""DFAttention / DFBlock are drop-ins for plain-PyTorch blocks (SDPA + explicit mask, the
same state_dict), and KV-cached rollouts reproduce the full-sequence pass."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdf
from fastdf.nn import DFAttention, DFBlock, KVCache
from fastdf.ops.attention import df_attention_mask


class PlainAttention(nn.Module):
    """What a user has today: fused qkv, QK RMSNorm, rotate-half RoPE, SDPA with a boolean mask."""

    def __init__(self, dim, heads, kv_heads, head_dim, qk_norm, rope_theta, mask):
        super().__init__()
        self.h, self.hkv, self.d, self.theta, self.mask = heads, kv_heads, head_dim, rope_theta, mask
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim)
        if qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        self.qk_norm = qk_norm
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], -1)
        q, k, v = q.view(B, T, self.h, self.d), k.view(B, T, self.hkv, self.d), v.view(B, T, self.hkv, self.d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.theta:
            inv = 1.0 / self.theta ** (torch.arange(0, self.d, 2).float() / self.d)
            ang = torch.arange(T).float()[:, None] * inv
            cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

            def rot(t):
                t1, t2 = t[..., : self.d // 2], t[..., self.d // 2:]
                return t * cos + torch.cat((-t2, t1), -1) * sin

            q, k = rot(q), rot(k)
        mask = df_attention_mask(T, T, **self.mask)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             enable_gqa=True)
        return self.proj(out.transpose(1, 2).reshape(B, T, -1))


class PlainBlock(nn.Module):
    """DiT block with the modulation repeated to every token (as DFoT does)."""

    def __init__(self, dim, heads, kv_heads, mask, rope_theta=None):
        super().__init__()
        self.attn = PlainAttention(dim, heads, kv_heads, dim // heads, True, rope_theta, mask)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        per_token = self.modulation(c).repeat_interleave(x.shape[1] // c.shape[1], 1)
        sh1, sc1, g1, sh2, sc2, g2 = per_token.chunk(6, -1)
        ln = lambda t: F.layer_norm(t, t.shape[-1:], eps=1e-6)  # noqa: E731
        x = x + g1 * self.attn(ln(x) * (1 + sc1) + sh1)
        return x + g2 * self.mlp(ln(x) * (1 + sc2) + sh2)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name else 0.0))
    return module


def _close(a, b, tol=1e-5):
    """Max error relative to the largest magnitude (randomised blocks have large activations)."""
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max error {err:.3e} vs largest |b| {b.abs().max().item():.3e}"


MASKS = [dict(frame_size=3), dict(frame_size=4, window_frames=2, sink_frames=1), dict(frame_size=1, causal=False)]


@pytest.mark.op("df_attention")
@pytest.mark.parametrize("mask", MASKS, ids=["frame3", "window-sink", "noncausal"])
@pytest.mark.parametrize("qk_norm,rope", [(False, None), (True, 10000.0)], ids=["plain", "qknorm-rope"])
def test_attention_is_a_drop_in(backend, mask, qk_norm, rope):
    ours = _randomize(DFAttention(32, 4, num_kv_heads=2, qk_norm=qk_norm, rope_theta=rope, **mask))
    plain = PlainAttention(32, 4, 2, 8, qk_norm, rope, mask)
    plain.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(1))
    _close(ours(x), plain(x))


@pytest.mark.op("df_attention", "adaln_modulate", "gated_residual")
def test_block_is_a_drop_in(backend):
    mask = dict(frame_size=4, window_frames=2, sink_frames=1)
    ours = _randomize(DFBlock(32, 4, num_kv_heads=2, rope_theta=500.0, **mask))
    plain = PlainBlock(32, 4, 2, mask, rope_theta=500.0)
    plain.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(2, 20, 32, generator=g, requires_grad=True), torch.randn(2, 5, 32, generator=g)
    y, y_plain = ours(x, c), plain(x, c)
    _close(y, y_plain)
    g_ours = torch.autograd.grad(y.square().sum(), [x, *ours.parameters()])
    g_plain = torch.autograd.grad(y_plain.square().sum(), [x, *plain.parameters()])
    for a, b in zip(g_ours, g_plain):
        _close(a, b, 1e-4)


def test_new_block_is_identity():
    block = DFBlock(16, 2, frame_size=2)
    x = torch.randn(1, 6, 16)
    torch.testing.assert_close(block(x, torch.randn(1, 3, 16)), x)


def _stack(mask, seed=3):
    torch.manual_seed(seed)
    return [_randomize(DFBlock(32, 4, num_kv_heads=2, rope_theta=100.0, **mask), seed + i) for i in range(2)]


def _run(blocks, x, c, caches=None, commit=0):
    for i, b in enumerate(blocks):
        x = b(x, c, cache=None if caches is None else caches[i], commit_frames=commit)
    return x


@pytest.mark.op("df_attention", "adaln_modulate", "gated_residual")
@pytest.mark.parametrize("mask", [dict(frame_size=3, window_frames=3, sink_frames=1), dict(frame_size=3),
                                  dict(frame_size=2, window_frames=2, sink_frames=2)],
                         ids=["window3-sink1", "no-window", "window2-sinks2"])
def test_cached_rollout_matches_full_sequence(backend, mask):
    """Two stacked blocks rolled out frame by frame with a per-layer cache (noisy chunks
    recomputed without committing, then the final frame committed) give the rows of one
    full-sequence pass, through eviction, sinks and RoPE at absolute positions."""
    fs, frames = mask["frame_size"], 7
    blocks = _stack(mask)
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(2, frames * fs, 32, generator=g), torch.randn(2, frames, 32, generator=g)
    with torch.no_grad():
        full = _run(blocks, x, c)
        caches = [b.new_cache(capacity_frames=5) for b in blocks]
        for f in range(frames):
            chunk = slice(f * fs, min(frames, f + 2) * fs)
            cond = c[:, f:f + 2]
            for _ in range(2 if backend == "torch" else 1):  # denoising steps of the chunk: nothing stored
                y = _run(blocks, x[:, chunk], cond, caches)
                _close(y, full[:, chunk])
                assert all(cache.frames == f for cache in caches)
            y = _run(blocks, x[:, chunk], cond, caches, commit=1)  # frame f is final
            _close(y, full[:, chunk])
            assert all(cache.frames == f + 1 for cache in caches)
            if mask.get("window_frames"):
                limit = mask["sink_frames"] + mask["window_frames"] - 1
                assert caches[0].cached_frames == min(f + 1, limit)


def test_cache_keeps_sinks_and_recent_frames_without_copying_everything():
    cache = KVCache(frame_size=2, window_frames=4, sink_frames=1)
    frames = [torch.full((1, 2, 2, 8), float(i)) for i in range(40)]
    for i, f in enumerate(frames):
        cache.append(f, -f)
        if i == 0:
            buffer = cache._k.data_ptr()
    assert cache._k.data_ptr() == buffer, "the buffer must stay in place"
    assert cache.frames == 40 and cache.cached_frames == 4
    kept = cache.keys[0, 0, ::2, 0].tolist()
    assert kept == [0.0, 37.0, 38.0, 39.0]  # the sink, then the W - 1 most recent frames
    assert torch.equal(cache.values, -cache.keys)
    # The kept frames are moved to the front at most once per window's worth of appends.
    assert cache.stats["compactions"] <= 40 // 3 and cache.stats["grows"] == 0


def test_cache_gradient_path_matches_buffer_path():
    mask = dict(frame_size=2, window_frames=2, sink_frames=1)
    attn = _randomize(DFAttention(16, 2, rope_theta=50.0, **mask))
    x = torch.randn(1, 10, 16)
    fast, grad = attn.new_cache(), attn.new_cache()
    for f in range(4):
        chunk = x[:, 2 * f:2 * f + 4]
        with torch.no_grad():
            a = attn(chunk, cache=fast, commit_frames=1)
        leaf = chunk.clone().requires_grad_()
        b = attn(leaf, cache=grad, commit_frames=1)
        torch.testing.assert_close(a, b)
        (gx,) = torch.autograd.grad(b.sum(), leaf)
        assert torch.isfinite(gx).all()
    torch.testing.assert_close(fast.keys, grad.keys)


def test_cache_errors():
    attn = DFAttention(16, 2, frame_size=2, window_frames=2)
    with pytest.raises(ValueError, match="make it with attn.new_cache"):
        attn(torch.randn(1, 4, 16), cache=KVCache(frame_size=2))
    cache = attn.new_cache()
    with pytest.raises(ValueError, match="whole frames"):
        attn(torch.randn(1, 3, 16), cache=cache)
    with pytest.raises(ValueError, match="commit_frames must be between"):
        attn(torch.randn(1, 4, 16), cache=cache, commit_frames=3)
    with pytest.raises(ValueError, match="call extend"):
        KVCache(frame_size=2).commit(1)
    with pytest.raises(ValueError, match="commit_frames needs a cache"):
        attn(torch.randn(1, 4, 16), commit_frames=1)
    with pytest.raises(ValueError, match="window_frames must be"):
        KVCache(window_frames=0)
    cache = attn.new_cache()
    with torch.no_grad():
        attn(torch.randn(1, 4, 16), cache=cache, commit_frames=2)
        with pytest.raises(ValueError, match="do not match the cache"):
            attn(torch.randn(2, 4, 16), cache=cache)
        cache.reset()
        attn(torch.randn(2, 4, 16), cache=cache, commit_frames=1)
    assert cache.frames == 1


def test_block_compiles_fullgraph():
    block = _randomize(DFBlock(16, 2, frame_size=2, window_frames=2, sink_frames=1))
    x, c = torch.randn(1, 8, 16), torch.randn(1, 4, 16)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, c), block(x, c))


@pytest.mark.gpu
def test_block_bf16_on_gpu():
    mask = dict(frame_size=16, window_frames=3, sink_frames=1)
    block = _randomize(DFBlock(128, 4, num_kv_heads=2, rope_theta=1e4, **mask)).cuda()
    plain = PlainBlock(128, 4, 2, mask, rope_theta=1e4).cuda()
    plain.load_state_dict(block.state_dict())
    x, c = torch.randn(2, 160, 128, device="cuda"), torch.randn(2, 10, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), fastdf.backend("triton"):
        y = block(x, c)
    _close(y.float(), plain(x, c), 5e-2)  # bf16 activations against the fp32 block

"""DFTransformer: the Diffusion Forcing model protocol (phase-1 and rolling), a drop-in for a
plain-PyTorch forward (conv patchify, SDPA with an explicit mask, per-token modulation,
fold unpatchify) with the same parameters, and argument errors that name the argument."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastdf
from fastdf import diffusion_forcing as dforce
from fastdf.models import DFTransformer, DFTransformerCache
from fastdf.ops.attention import df_attention_mask

STEPS = 50
ROOT = Path(__file__).resolve().parents[2]


def _random(model, seed=0, std=0.3):
    """Random weights everywhere (a new model predicts 0: its AdaLN-Zero layers are zeroed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
    return model.eval()


def _model(frame_shape, seed=0, std=0.3, **kw):
    kw = {"dim": 32, "depth": 2, "num_heads": 2, "level_dim": 16, **kw}
    return _random(DFTransformer(frame_shape, **kw), seed, std)


SHAPES = {"image": ((2, 8, 12), dict(patch_size=4)), "vector": ((5,), {}), "tokens": ((3, 4), dict(num_kv_heads=1))}


@pytest.mark.parametrize("kind", SHAPES)
def test_protocol_holds(kind):
    shape, kw = SHAPES[kind]
    model = _model(shape, **kw)
    assert isinstance(model, dforce.DFModel) and model.frame_shape == shape
    dforce.check_model(model, shape, steps=STEPS)  # phase-1 protocol: per-window caches
    dforce.check_model(model, shape, steps=STEPS, window_frames=2, sink_frames=1)  # rolling: eviction
    dforce.check_model(model, shape, steps=STEPS, window_frames=3)


@pytest.mark.op("df_attention", "adaln_modulate", "gated_residual")
def test_protocol_holds_on_triton(backend):
    if backend != "triton":
        pytest.skip("the torch backend is covered by test_protocol_holds")
    model = _model((2, 4), depth=1)
    dforce.check_model(model, (2, 4), steps=STEPS, batch=1, frames=4, window_frames=2, sink_frames=1)


def test_new_model_predicts_zero_and_round_trips_frames():
    model = DFTransformer((2, 8, 12), dim=32, depth=1, num_heads=2, patch_size=4, level_dim=16)
    x = torch.randn(2, 3, 2, 8, 12)
    assert torch.equal(model.unpatchify(model.patchify(x), 2, 3), x)
    assert model.patchify(x).shape == (2, 3 * 6, 32)
    assert torch.equal(model(x, torch.randint(0, STEPS, (2, 3))), torch.zeros_like(x))


# ---------------------------------------------------------------------------- plain-torch twin


def _rope(t, pos, theta):
    d = t.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    return t * cos + torch.cat((-t[..., d // 2:], t[..., :d // 2]), -1) * sin


def plain_forward(model, x, levels, window_frames=None, sink_frames=0):
    """The same network written the way a user would without fastdf."""
    B, Fr, C, H, W = x.shape
    p, S, D = model.patch_size, model.tokens_per_frame, model.dim
    h = F.conv2d(x.reshape(B * Fr, C, H, W), model.embed.weight.view(D, C, p, p), model.embed.bias, stride=p)
    h = (h.flatten(2).transpose(1, 2) + model.token_pos).reshape(B, Fr * S, D)
    half = model.level_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    ang = levels.float()[..., None] * freqs
    cond = model.level_mlp(torch.cat([ang.cos(), ang.sin()], -1)).repeat_interleave(S, 1)  # per token
    pos = torch.arange(Fr).repeat_interleave(S)
    mask = df_attention_mask(Fr * S, Fr * S, frame_size=S, window_frames=window_frames, sink_frames=sink_frames)
    ln = lambda t: F.layer_norm(t, (D,), eps=1e-6)  # noqa: E731
    for blk in model.blocks:
        a = blk.attn
        sh1, sc1, g1, sh2, sc2, g2 = blk.modulation(cond).chunk(6, -1)
        y = ln(h) * (1 + sc1) + sh1
        hq, hk, d = a.num_heads, a.num_kv_heads, a.head_dim
        q, k, v = a.qkv(y).split([hq * d, hk * d, hk * d], -1)
        q, k, v = q.view(B, -1, hq, d), k.view(B, -1, hk, d), v.view(B, -1, hk, d)
        q, k = _rope(a.q_norm(q), pos, model.rope_theta), _rope(a.k_norm(k), pos, model.rope_theta)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=True)
        h = h + g1 * a.proj(o.transpose(1, 2).reshape(B, Fr * S, hq * d))
        h = h + g2 * blk.mlp(ln(h) * (1 + sc2) + sh2)
    sh, sc = model.final_modulation(cond).chunk(2, -1)
    out = model.head(ln(h) * (1 + sc) + sh)  # [B, Fr * S, C p p]
    out = out.view(B * Fr, S, C * p * p).transpose(1, 2)
    return F.fold(out, (H, W), kernel_size=p, stride=p).view(B, Fr, C, H, W)


def _close(a, b, tol=2e-5):
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max error {err:.3e} (largest |b| {b.abs().max().item():.3e})"


@pytest.mark.op("df_attention", "adaln_modulate", "gated_residual")
@pytest.mark.parametrize("window", [(None, 0), (2, 1)], ids=["causal", "window2-sink1"])
def test_drop_in_for_plain_torch(backend, window):
    model = _model((2, 8, 8), patch_size=4, num_kv_heads=1, depth=2 if backend == "torch" else 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 2, 8, 8, generator=g, requires_grad=True)
    levels = torch.randint(0, STEPS + 1, (2, 5), generator=g)
    mask = dict(window_frames=window[0], sink_frames=window[1])
    ours, plain = model(x, levels, **mask), plain_forward(model, x, levels, **mask)
    _close(ours, plain)
    if backend == "torch":  # gradients through the fused ops (the triton backward is tested in tests/ops)
        params = [model.embed.weight, model.blocks[0].attn.qkv.weight, model.blocks[1].modulation[1].weight]
        g_ours = torch.autograd.grad(ours.square().sum(), [x, *params])
        g_plain = torch.autograd.grad(plain.square().sum(), [x, *params])
        for a, b in zip(g_ours, g_plain):
            _close(a, b, 1e-4)


def test_user_conditioning():
    model = _model((4,), cond_dim=3)
    x, levels = torch.randn(2, 3, 4), torch.randint(0, STEPS, (2, 3))
    c = torch.randn(2, 3)
    per_seq = model(x, levels, cond=c)
    torch.testing.assert_close(model(x, levels, cond=c[:, None].expand(2, 3, 3)), per_seq)
    assert not torch.allclose(per_seq, model(x, levels))
    cache = model.new_cache(2, 3)
    model(x[:, :2], levels[:, :2], cache=cache, commit=2, cond=c)
    torch.testing.assert_close(model(x[:, 2:], levels[:, 2:], cache=cache, cond=c), per_seq[:, 2:])


def test_rolling_cache_keeps_sinks_and_window():
    model = _model((3,))
    cache = model.new_cache(1, 20, window_frames=3, sink_frames=2)
    x, levels = torch.randn(1, 12, 3), torch.randint(0, STEPS, (1, 12))
    with torch.no_grad():
        for f in range(12):
            model(x[:, f:f + 1], levels[:, f:f + 1], cache=cache, commit=1, window_frames=3, sink_frames=2)
            assert cache.frames == f + 1 and cache.cached_frames == min(f + 1, 2 + 3 - 1)
    assert isinstance(cache, DFTransformerCache) and all(layer.frames == 12 for layer in cache.layers)


class _IgnoresWindowWithoutCache(DFTransformer):
    """Breaks the rolling extension: the cache-free call drops the window (the cache evicts)."""

    def forward(self, x, levels, *, cache=None, commit=0, cond=None, window_frames=None, sink_frames=0):
        if cache is None:
            window_frames, sink_frames = None, 0
        return super().forward(x, levels, cache=cache, commit=commit, cond=cond, window_frames=window_frames,
                               sink_frames=sink_frames)


def test_check_model_catches_an_ignored_window():
    model = _random(_IgnoresWindowWithoutCache((3,), dim=32, depth=2, num_heads=2, level_dim=16))
    dforce.check_model(model, (3,), steps=STEPS)  # fine without a window
    with pytest.raises(AssertionError, match="windowed cached call"):
        dforce.check_model(model, (3,), steps=STEPS, window_frames=2, sink_frames=1)


def test_training_step_trains_it():
    torch.manual_seed(0)
    model = DFTransformer((4,), dim=32, depth=1, num_heads=2, level_dim=16)
    schedule = dforce.NoiseSchedule("cosine", STEPS)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x0 = torch.randn(8, 4, 1).expand(8, 4, 4).contiguous()  # frames repeat: learnable from the first
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss = dforce.training_step(model, x0, schedule, prediction="x0", weighting="uniform", generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def test_bad_input_names_the_argument():
    model = _model((2, 8, 8), patch_size=4)
    x, levels = torch.randn(2, 3, 2, 8, 8), torch.randint(0, STEPS, (2, 3))
    cache = model.new_cache(2, 4)
    cases = [
        (ValueError, "x must be", dict(x=torch.randn(2, 3, 2, 8, 4))),
        (TypeError, "x must be a torch.Tensor", dict(x=[1.0])),
        (TypeError, "levels must be an integer", dict(levels=levels.float())),
        (ValueError, "levels must have shape", dict(levels=levels[:, :2])),
        (ValueError, "commit needs a cache", dict(commit=1)),
        (ValueError, "commit must be <= 3", dict(cache=cache, commit=4)),
        (TypeError, "cache must come from", dict(cache=object())),
        (ValueError, "batch", dict(x=x[:1], levels=levels[:1], cache=cache)),
        (ValueError, "window_frames/sink_frames", dict(cache=cache, window_frames=2)),
        (ValueError, "sink_frames", dict(sink_frames=1)),
        (ValueError, "window_frames must be >= 1", dict(window_frames=0)),
        (ValueError, "cond", dict(cond=torch.randn(2, 4))),
    ]
    for error, message, kwargs in cases:
        args = {"x": x, "levels": levels, **kwargs}
        with pytest.raises(error, match=message):
            model(args.pop("x"), args.pop("levels"), **args)
    with pytest.raises(ValueError, match="cond must have shape"):
        _model((4,), cond_dim=3)(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), cond=torch.randn(2, 5))
    for kwargs, message in [
        (dict(frame_shape=(1, 8, 8), patch_size=3), "patch_size"),
        (dict(frame_shape=(4,), patch_size=2), "patch_size"),
        (dict(frame_shape=(1, 2, 3, 4)), "frame_shape"),
        (dict(frame_shape=(0,)), "frame_shape"),
        (dict(frame_shape=(4,), dim=30, num_heads=4), "dim"),
        (dict(frame_shape=(4,), norm="batch"), "norm"),
    ]:
        with pytest.raises(ValueError, match=message):
            DFTransformer(**{"dim": 32, "num_heads": 2, **kwargs})
    with pytest.raises(ValueError, match="sink_frames"):
        model.new_cache(2, 4, sink_frames=1)
    with pytest.raises(TypeError, match="max_frames"):
        model.new_cache(2, 4.0)


@pytest.mark.gpu
def test_bf16_on_gpu_matches_fp32():
    model = _model((16, 64), dim=256, depth=2, num_heads=2, std=0.05).cuda()
    x = torch.randn(2, 6, 16, 64, device="cuda")
    levels = torch.randint(0, STEPS, (2, 6), device="cuda")
    with fastdf.backend("torch"):
        ref = model(x, levels, window_frames=3, sink_frames=1)
    with fastdf.backend("triton"):
        dforce.check_model(model, (16, 64), steps=STEPS, device="cuda", window_frames=3, sink_frames=1,
                           atol=5e-4, rtol=5e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, levels, window_frames=3, sink_frames=1)
    _close(out.float(), ref, 5e-2)


def test_layering():
    """models sit above nn and below the workflows: the sampler never imports them, and they
    import no workflow (checked in fresh processes)."""
    checks = {
        "import sys, fastdf.diffusion_forcing; print('fastdf.models' in sys.modules)": "False",
        "import sys, fastdf.models; print(any(m.startswith('fastdf.diffusion_forcing') for m in sys.modules))": "False",
    }
    for code, expected in checks.items():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
        assert out.stdout.strip() == expected, code

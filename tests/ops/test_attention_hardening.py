"""df_attention under hostile input (issue 9): extreme but finite scores and values,
causality with NaN/inf data, knobs at the edges, and flash-attention's acceptance rule
(error <= 2x plain PyTorch in the same precision, against float64) on a sample of its
test grid, forward and backward, on the torch and triton backends."""

import pytest
import torch

import fastdf
from fastdf.ops.attention import df_attention_padded, df_attention_reference
from fastdf.testing import assert_matches_reference, poisoned

F32, F16 = torch.float32, torch.float16
BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def be(request):
    from fastdf.ops import unavailable_reason

    reason = unavailable_reason(request.param, "cpu")
    if reason:
        pytest.skip(reason)
    with fastdf.backend(request.param):
        yield request.param


@pytest.fixture(params=["short", "tiled"])
def kernel(request, monkeypatch, be):
    """On the triton backend, run both the short-sequence and the tiled kernels."""
    if be != "triton" and request.param == "tiled":
        pytest.skip("one kernel on the torch backend")
    if request.param == "tiled":
        from fastdf.kernels import attention as kernels

        monkeypatch.setattr(kernels, "SHORT_MAX", 0)
    return request.param


def _rand(*shape, seed=0, dtype=F32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _grads(q, k, v, g, **mask):
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fastdf.df_attention(*inputs, **mask)
    return (out, *torch.autograd.grad((out * g).sum(), inputs))


# ---------------------------------------------------------------------------- extreme values


def test_scores_near_minus_3e30(be, kernel):
    """Every visible score about -3e30: the old finite -1e30 mask made such rows empty
    (zeros, lse = -inf). All keys tie in fp32 and fp64 alike, so out is the causal mean."""
    B, H, T, D = 1, 2, 40, 16
    q = torch.ones(B, H, T, D)
    k = torch.full((B, H, T, D), -3e31 / D * 8)  # scale 1/4: scores -3e30 * 2 / 4 ... all equal
    v = _rand(B, H, T, D)
    mask = dict(frame_size=4, window_frames=3, sink_frames=1)
    with poisoned():
        out, lse = fastdf.df_attention(q, k, v, return_lse=True, **mask)
    assert torch.isfinite(out).all() and (lse < -1e30).all()
    assert_matches_reference((out, lse), df_attention_reference, q, k, v, **mask)


def test_values_near_float32_max(be, kernel):
    """|v| up to 3e38: the unnormalised online-softmax sums would overflow fp32."""
    B, H, T, D = 1, 2, 40, 16
    q, k = _rand(B, H, T, D, seed=1), _rand(B, H, T, D, seed=2)
    v = _rand(B, H, T, D, seed=3).clamp(-3, 3) * 1e38
    with poisoned():
        out = fastdf.df_attention(q, k, v, return_lse=True, frame_size=3)
    assert torch.isfinite(out[0]).all()
    assert_matches_reference(out, df_attention_reference, q, k, v, frame_size=3)


def test_fp16_large_products_stay_finite(be):
    """q = k = 23, D = 128: q . k = 67712 overflows fp16 if rounded before scaling."""
    q = torch.full((1, 2, 5, 128), 23.0, dtype=F16)
    k = torch.full((1, 2, 9, 128), 23.0, dtype=F16)
    v = _rand(1, 2, 9, 128, seed=4, dtype=F16)
    out, lse = fastdf.df_attention(q, k, v, return_lse=True)
    ref, ref_lse = df_attention_reference(q.double(), k.double(), v.double())
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-5)


# ---------------------------------------------------------------------------- causality


def _poison_last_frame(q, k, v, fs):
    q, k, v = q.clone(), k.clone(), v.clone()
    q[:, :, -fs:] = float("nan")
    k[:, :, -fs:, ::2] = float("nan")
    k[:, :, -fs:, 1::2] = float("inf")
    v[:, :, -fs:] = float("-inf")
    v[:, :, -1, 0] = float("nan")
    return q, k, v


@pytest.mark.parametrize("shape,mask", [
    ((1, 4, 2, 24, 16), dict(frame_size=8)),
    ((2, 2, 1, 40, 16), dict(frame_size=5, window_frames=3, sink_frames=1)),
], ids=["frame8-gqa", "frame5-window-sink"])
def test_nan_in_last_frame_stays_in_last_frame(be, kernel, shape, mask):
    """NaN/inf in the last frame's q, k and v: earlier frames' outputs and their dq are
    the clean run's, bit for bit; the last frame's own outputs are NaN."""
    B, Hq, Hkv, T, D = shape
    fs = mask["frame_size"]
    q, k, v = _rand(B, Hq, T, D, seed=5), _rand(B, Hkv, T, D, seed=6), _rand(B, Hkv, T, D, seed=7)
    g = _rand(B, Hq, T, D, seed=8)
    g[:, :, -fs:] = 0  # the loss reads the earlier frames only
    clean = _grads(q, k, v, g, **mask)
    dirty = _grads(*_poison_last_frame(q, k, v, fs), g, **mask)
    assert torch.equal(dirty[0][:, :, :-fs], clean[0][:, :, :-fs])
    assert torch.isnan(dirty[0][:, :, -fs:]).all()
    assert torch.equal(dirty[1][:, :, :-fs], clean[1][:, :, :-fs])  # dq


def test_nan_keys_nobody_sees(be, kernel):
    """Keys outside every query's window (an evicted cache slot holding NaN/inf) change
    nothing: out, lse, dq and the other keys' dk/dv equal the clean run; their own
    dk/dv are exactly 0 (no query sees them)."""
    B, Hq, Hkv, Tq, Tk, D = 1, 4, 2, 12, 40, 16
    mask = dict(frame_size=4, window_frames=2, sink_frames=1)  # frames 1..5 of 10 are unseen
    q, k, v = _rand(B, Hq, Tq, D, seed=9), _rand(B, Hkv, Tk, D, seed=10), _rand(B, Hkv, Tk, D, seed=11)
    g = _rand(B, Hq, Tq, D, seed=12)
    dead = slice(4, 24)
    clean = _grads(q, k, v, g, **mask)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, dead] = float("nan")
    v2[:, :, dead, 1:] = float("inf")
    v2[:, :, dead, 0] = float("nan")
    dirty = _grads(q, k2, v2, g, **mask)
    for a, b in zip(dirty[:2], clean[:2]):
        assert torch.equal(a, b)
    for a, b in zip(dirty[2:], clean[2:]):
        live = torch.ones(Tk, dtype=torch.bool)
        live[dead] = False
        assert torch.equal(a[:, :, live], b[:, :, live])
        assert torch.equal(a[:, :, dead], torch.zeros_like(a[:, :, dead]))


def test_nan_gradient_of_a_query_stays_with_the_keys_it_sees(be, kernel):
    """A NaN upstream gradient on the first frame's queries reaches only dk/dv of the
    keys those queries see (frame 0) and their own dq."""
    B, H, T, D, fs = 1, 2, 24, 16, 6
    q, k, v = _rand(B, H, T, D, seed=13), _rand(B, H, T, D, seed=14), _rand(B, H, T, D, seed=15)
    g = _rand(B, H, T, D, seed=16)
    g_zero = g.clone()
    g_zero[:, :, :fs] = 0
    g_nan = g.clone()
    g_nan[:, :, :fs] = float("nan")
    clean = _grads(q, k, v, g_zero, frame_size=fs)
    dirty = _grads(q, k, v, g_nan, frame_size=fs)
    assert torch.equal(dirty[1][:, :, fs:], clean[1][:, :, fs:])
    for a, b in zip(dirty[2:], clean[2:]):
        assert torch.equal(a[:, :, fs:], b[:, :, fs:])
        assert torch.isnan(a[:, :, :fs]).all()


def test_padding_keys_with_nan(be, kernel):
    """Left padding holding NaN (an uninitialised HF cache) never reaches a real query."""
    B, H, T, D = 2, 2, 20, 16
    q, k, v = _rand(B, H, T, D, seed=17), _rand(B, H, T, D, seed=18), _rand(B, H, T, D, seed=19)
    starts = torch.tensor([0, 7])
    g = _rand(B, H, T, D, seed=20)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, :7] = float("nan")
    v2[1, :, :7] = float("nan")
    res = []
    for kk, vv in ((k, v), (k2, v2)):
        inputs = [t.detach().requires_grad_() for t in (q, kk, vv)]
        out = df_attention_padded(*inputs, starts)
        res.append((out, *torch.autograd.grad((out * g).sum(), inputs)))
    for a, b in zip(res[0], res[1]):
        assert torch.equal(a[1, :, 7:], b[1, :, 7:]) and torch.equal(a[0], b[0])


# ---------------------------------------------------------------------------- knobs


@pytest.mark.parametrize("scale", [1e300, float("nan"), float("inf"), -1.0, 0.0, 1e-300, 3e38])
def test_scale_outside_float32_is_refused(scale):
    q = _rand(1, 2, 4, 16)
    with pytest.raises(ValueError, match="scale"):
        fastdf.df_attention(q, q, q, scale=scale)
    with pytest.raises(ValueError, match="scale"):
        df_attention_padded(q, q, q, torch.zeros(1, dtype=torch.long), scale=scale)


@pytest.mark.parametrize("shape,match", [
    ((1, 2, 4, 0), "head dim"), ((1, 0, 4, 16), "q must have at least one head"),
])
def test_empty_head_dims_and_heads_are_refused(shape, match):
    q = torch.zeros(shape)
    k = torch.zeros(1, 2 if shape[1] else 0, 4, shape[3])
    with pytest.raises(ValueError, match=match):
        fastdf.df_attention(q, k, k)


def test_zero_kv_heads_are_refused():
    q = torch.zeros(1, 2, 4, 16)
    with pytest.raises(ValueError, match="k must have at least one head"):
        fastdf.df_attention(q, q[:, :0], q[:, :0])


def test_huge_windows_and_frames_are_legal(be):
    """A window wider than any sequence is no window; a frame longer than the sequence is
    one frame (all keys visible); 10**30 does not reach the op's int64 schema."""
    q, k, v = _rand(1, 2, 9, 16, seed=21), _rand(1, 2, 20, 16, seed=22), _rand(1, 2, 20, 16, seed=23)
    plain = fastdf.df_attention(q, k, v, frame_size=3)
    assert torch.equal(fastdf.df_attention(q, k, v, frame_size=3, window_frames=10**30), plain)
    assert torch.equal(fastdf.df_attention(q, k, v, frame_size=3, window_frames=2, sink_frames=10**30), plain)
    assert torch.equal(fastdf.df_attention(q, k, v, frame_size=10**30), fastdf.df_attention(q, k, v, causal=False))


def test_key_start_beyond_int32_is_clamped(be):
    q = _rand(2, 2, 5, 16, seed=24)
    starts = torch.tensor([2**32 + 1, -(2**40)])
    out, lse = df_attention_padded(q, q, q, starts, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()  # all padding
    torch.testing.assert_close(out[1], fastdf.df_attention(q[1:], q[1:], q[1:])[0])
    view = torch.tensor([3, 0, 3, 0])[::2]  # non-contiguous
    torch.testing.assert_close(df_attention_padded(q, q, q, view), df_attention_padded(q, q, q, torch.tensor([3, 3])))


# ---------------------------------------------------------------------------- numerics


def test_one_visible_key_gives_exactly_zero_dq_dk_on_torch_backend():
    """With one visible key P = 1, so dq and dk are exactly 0 (delta comes from the same
    fp32 quantities as dP)."""
    q, k, v = _rand(1, 2, 6, 16, seed=25), _rand(1, 2, 6, 16, seed=26), _rand(1, 2, 6, 16, seed=27)
    g = _rand(1, 2, 6, 16, seed=28)
    with fastdf.backend("torch"):
        _, dq, _, _ = _grads(q, k, v, g)
        _, dq1, dk1, dv1 = _grads(q, k, v, g, window_frames=1)  # every query sees its own key only
    assert dq[:, :, 0].abs().max() == 0  # query 0 sees key 0 only
    assert dq1.abs().max() == 0 and dk1.abs().max() == 0
    assert torch.equal(dv1, g)


# A sample of flash-attention's test grid (tests/test_flash_attn.py): head dims incl. a
# non-power of two, its (seqlen_q, seqlen_k) pairs shrunk for the interpreter incl.
# Tq < Tk, MHA/GQA/MQA, causal / local (window) and frame-causal masks.
GRID = [
    # (B, Hq, Hkv, Tq, Tk, D, mask)
    (1, 2, 2, 1, 33, 40, {}),
    (1, 4, 1, 7, 19, 24, dict(frame_size=3)),
    (2, 2, 1, 20, 20, 16, dict(window_frames=5)),
    (1, 4, 2, 16, 48, 32, dict(frame_size=4, window_frames=3, sink_frames=1)),
    (1, 2, 2, 9, 9, 59, dict(causal=False)),
]


def _grid_ids():
    return [f"Tq{c[3]}-Tk{c[4]}-D{c[5]}-{c[1]}:{c[2]}-" + ("-".join(f"{k}{v}" for k, v in c[6].items()) or "causal")
            for c in GRID]


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", GRID, ids=_grid_ids())
def test_flash_attention_rule_forward_and_backward(be, kernel, case, dtype):
    B, Hq, Hkv, Tq, Tk, D, mask = case
    q, k, v = (_rand(B, h, t, D, seed=30 + i, dtype=dtype) for i, (h, t) in enumerate(((Hq, Tq), (Hkv, Tk), (Hkv, Tk))))
    g = _rand(B, Hq, Tq, D, seed=40, dtype=dtype)
    g_lse = _rand(B, Hq, Tq, seed=41)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with poisoned():
        out, lse = fastdf.df_attention(*inputs, return_lse=True, **mask)
        grads = torch.autograd.grad((out * g).sum() + (lse * g_lse).sum(), inputs)
    assert_matches_reference((out, lse), df_attention_reference, q, k, v, **mask)
    assert_matches_reference(grads, _reference_grads, q, k, v, g, g_lse, **mask)


def _reference_grads(q, k, v, g_out, g_lse, **mask):
    """Gradients of (out * g_out).sum() + (lse * g_lse).sum() through the reference."""
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    o, l = df_attention_reference(*inputs, **mask)
    return torch.autograd.grad((o * g_out).sum() + (l * g_lse.to(l.dtype)).sum(), inputs)


def test_flash_attention_rule_fp16_large_scale_torch_backend():
    """scale = 100 (near one-hot softmax): the torch backend's fp16 gradients used to be
    up to 29x over the rule, from fp16 out/lse entering the backward."""
    q, k, v = (_rand(1, 2, 12, 16, seed=50 + i, dtype=F16) for i in range(3))
    g = _rand(1, 2, 12, 16, seed=53, dtype=F16)
    with fastdf.backend("torch"):
        out, *grads = _grads(q, k, v, g, frame_size=3, scale=100.0)

    def ref(q, k, v, g):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        o, _ = df_attention_reference(*inputs, frame_size=3, scale=100.0)
        return (o.detach(), *torch.autograd.grad((o * g).sum(), inputs))

    assert_matches_reference((out, *grads), ref, q, k, v, g)


LSE_CASES = {"short-kernel": (1, 4, 1, 37, 37, 40, dict(frame_size=3)),
             "tiled-kernel": (2, 4, 2, 37, 129, 40, dict(frame_size=7, window_frames=3, sink_frames=1))}


def _large_lse_xfail():
    from fastdf.kernels import INTERPRET

    return pytest.mark.xfail(INTERPRET, strict=True, reason=(
        "known: the Triton backward forms p = exp2(s * qk_scale - lse * log2 e) from an lse stored in ln "
        "units, ~4 roundings of |lse|'s ulp beyond the reference's; dV leaves the 2x rule at max |lse| ~126 "
        "under the interpreter (unfused; on a GPU ptxas may fuse it into an FMA: only a GPU run says)"))


@pytest.mark.parametrize("gain", [24.0, pytest.param(32.0, marks=_large_lse_xfail())], ids=["lse80", "lse126"])
@pytest.mark.parametrize("case", list(LSE_CASES))
def test_triton_fp32_gradients_at_large_lse(device, case, gain):
    """fp32 gradients of the Triton kernels with q scaled up (max |lse| ~80 and ~126): the
    2x rule holds at ~80; at ~126 it is a known miss (benches/notes: what only a GPU can
    confirm), kept here as a strict xfail so the fix has to remove the mark."""
    from fastdf.ops import unavailable_reason

    if unavailable_reason("triton", device):
        pytest.skip(unavailable_reason("triton", device))
    B, Hq, Hkv, Tq, Tk, D, mask = LSE_CASES[case]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, t, D, generator=gen) for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))
    q = q * gain
    gen = torch.Generator().manual_seed(100)
    g_out, g_lse = torch.randn(q.shape, generator=gen), torch.randn(q.shape[:3], generator=gen)
    q, k, v, g_out, g_lse = (t.to(device) for t in (q, k, v, g_out, g_lse))
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with fastdf.backend("triton"):
        out, lse = fastdf.df_attention(*inputs, return_lse=True, **mask)
        grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), inputs)
    assert float(lse.detach().abs().max()) > 3 * gain  # the regime this test is about
    assert_matches_reference(grads, _reference_grads, q, k, v, g_out, g_lse, **mask)

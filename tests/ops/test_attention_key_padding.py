"""df_attention(key_padding_mask=...) against the reference (every backend, both triton
kernels): holes, left/right padding, all-False rows, with windows, sinks, GQA, a KV cache;
strided and expanded mask views; forward and backward by the 2x-torch-error rule."""

import pytest
import torch

from fastdf.ops.attention import df_attention, df_attention_padded, df_attention_reference
from fastdf.testing import assert_matches_reference, poisoned

F32 = torch.float32
ON_GPU = torch.cuda.is_available()


def _masks(B, Tk, kind, seed):
    """[B, Tk] bool key padding masks: row 0 random holes, row 1 right padding, row 2
    left padding with a hole, row 3 all False (as many rows as B)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, Tk, generator=g) > 0.3
    if B > 1:
        m[1] = torch.arange(Tk) < Tk - Tk // 3
    if B > 2:
        m[2] = torch.arange(Tk) >= Tk // 4
        m[2, Tk // 2: Tk // 2 + 3] = False
    if B > 3:
        m[3] = False
    if kind == "long-holes":  # whole tiles of padding between real keys
        m[0, 10:60] = False
    return m


# id: (B, Hq, Hkv, Tq, Tk, D, mask kwargs, kind)
CASES = {
    "causal-holes": (4, 2, 1, 70, 70, 16, {}, "long-holes"),
    "cache-window-sink-gqa": (3, 4, 2, 30, 90, 16, dict(frame_size=3, window_frames=6, sink_frames=1), "holes"),
    "decode-gqa": (3, 4, 1, 1, 80, 32, {}, "holes"),
    "noncausal": (4, 2, 2, 20, 50, 16, dict(causal=False), "holes"),
    "short-frame2": (4, 2, 1, 12, 24, 16, dict(frame_size=2), "holes"),
}
GPU_SELECTION = {"cache-window-sink-gqa", "decode-gqa"}


def _names():
    return [n for n in CASES if not ON_GPU or n in GPU_SELECTION]


def _inputs(name, device, seed=0):
    B, Hq, Hkv, Tq, Tk, D, mask, kind = CASES[name]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, t, D, generator=g).to(device, F32).requires_grad_()
               for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))
    return q, k, v, mask, _masks(B, Tk, kind, seed).to(device)


@pytest.fixture(params=["tiled", "short"])
def path(request, monkeypatch):
    if request.param == "tiled":
        from fastdf.kernels import attention as kernels

        monkeypatch.setattr(kernels, "SHORT_MAX", 0)
    return request.param


@pytest.mark.op("df_attention")
@pytest.mark.parametrize("name", _names())
def test_forward_backward_match_reference(backend, device, path, name):
    if backend != "triton" and path == "tiled":
        pytest.skip("only the triton backend has two kernels")
    q, k, v, mask, kpm = _inputs(name, device)
    with poisoned():
        out, lse = df_attention(q, k, v, return_lse=True, key_padding_mask=kpm, **mask)
        g_out = torch.randn_like(out)
        grads = torch.autograd.grad((out * g_out).sum() + lse.clamp(min=-1e4).sum(), (q, k, v))
    ref = lambda q, k, v: df_attention_reference(q, k, v, key_padding_mask=kpm, **mask)  # noqa: E731
    assert_matches_reference((out, lse), ref, q, k, v)

    def ref_grads(q, k, v, g_out):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        o, l = df_attention_reference(*inputs, key_padding_mask=kpm, **mask)
        return torch.autograd.grad((o * g_out).sum() + l.clamp(min=-1e4).sum(), inputs)

    assert_matches_reference(grads, ref_grads, q, k, v, g_out)
    # padding keys get no gradient; rows that see nothing give exactly 0 and -inf
    pad = ~kpm[:, None, :, None]
    assert torch.all(grads[1].masked_select(pad) == 0) and torch.all(grads[2].masked_select(pad) == 0)
    if kpm.shape[0] > 3:
        assert torch.all(out[3] == 0) and torch.all(lse[3] == float("-inf")) and torch.all(grads[0][3] == 0)


@pytest.mark.op("df_attention")
def test_all_true_mask_is_the_unmasked_kernel_bitwise(backend, device, path):
    """Tiles of real keys only run exactly the code path of no mask at all."""
    if backend != "triton" and path == "tiled":
        pytest.skip("only the triton backend has two kernels")
    q, k, v, mask, _ = _inputs("cache-window-sink-gqa", device)
    kpm = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device=device)
    with torch.no_grad():
        a = df_attention(q, k, v, return_lse=True, **mask)
        b = df_attention(q, k, v, return_lse=True, key_padding_mask=kpm, **mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.op("df_attention")
def test_strided_and_expanded_mask_views(backend, device):
    q, k, v, mask, kpm = _inputs("causal-holes", device)
    wide = torch.zeros(kpm.shape[0], 2 * kpm.shape[1], dtype=torch.bool, device=device)
    wide[:, ::2] = kpm
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    with torch.no_grad():
        want = df_attention(q, k, v, key_padding_mask=kpm.contiguous(), **mask)
        torch.testing.assert_close(df_attention(q, k, v, key_padding_mask=strided, **mask), want, rtol=0, atol=0)
        row = kpm[:1].expand_as(kpm)  # stride 0 over the batch
        torch.testing.assert_close(df_attention(q, k, v, key_padding_mask=row, **mask),
                                   df_attention(q, k, v, key_padding_mask=row.contiguous(), **mask), rtol=0, atol=0)


@pytest.mark.op("df_attention")
def test_non_finite_padding_never_reaches_a_query(backend, device, path):
    """NaN/inf in padded keys and values: outputs, lse and dq are those of zeros there."""
    if backend != "triton" and path == "tiled":
        pytest.skip("only the triton backend has two kernels")
    q, k, v, mask, kpm = _inputs("causal-holes", device, seed=3)
    pad = ~kpm[:, None, :, None]
    k_bad = k.detach().masked_fill(pad, float("nan")).requires_grad_()
    v_bad = v.detach().masked_fill(pad, float("inf")).requires_grad_()
    k0 = k.detach().masked_fill(pad, 0.0)
    v0 = v.detach().masked_fill(pad, 0.0)
    out, lse = df_attention(q, k_bad, v_bad, return_lse=True, key_padding_mask=kpm, **mask)
    want, want_lse = df_attention(q, k0, v0, return_lse=True, key_padding_mask=kpm, **mask)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    dq, = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(dq).all()


def test_padded_alias_is_the_key_padding_mask():
    q, k, v, mask, _ = _inputs("cache-window-sink-gqa", "cpu")
    starts = torch.tensor([0, 17, 90])
    kpm = torch.arange(k.shape[2]) >= starts[:, None]
    with torch.no_grad():
        a = df_attention_padded(q, k, v, starts, return_lse=True, **mask)
        b = df_attention(q, k, v, return_lse=True, key_padding_mask=kpm, **mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kpm,error,match", [
    ([[True] * 8], TypeError, "key_padding_mask must be a torch.Tensor"),
    (torch.ones(1, 8, dtype=torch.long), ValueError, "key_padding_mask must be one of"),
    (torch.ones(8, dtype=torch.bool), ValueError, "key_padding_mask must have 2 dims"),
    (torch.ones(2, 8, dtype=torch.bool), ValueError, "key_padding_mask"),
    (torch.ones(1, 7, dtype=torch.bool), ValueError, "key_padding_mask"),
])
def test_bad_key_padding_mask(kpm, error, match):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(error, match=match):
        df_attention(q, q, q, key_padding_mask=kpm)

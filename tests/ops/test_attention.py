"""df_attention against its chunked reference (every backend), gradients against fp64
autograd through the reference, FlexAttention, the mask helpers, opcheck, compile, bad input.

The case tables are sized for the interpreter. On a GPU every case is a Triton compile of
its own (seconds each), so there a representative selection runs (``_here``) and the
``gpu``-marked tests add bf16 and large shapes."""

import pytest
import torch

import fastdf
from fastdf.ops.attention import (
    df_attention_backward_reference,
    df_attention_mask,
    df_attention_padded,
    df_attention_reference,
    df_mask_mod,
    visible_pairs,
)
from fastdf.testing import assert_matches_reference, poisoned

F32, F16 = torch.float32, torch.float16

# id: (B, Hq, Hkv, Tq, Tk, D, mask). Chosen to cover every mask mode, T = 1, 2, 37, 129,
# frame sizes 1, 3, 7, 64, D = 16, 40, 64, 80, GQA 4:1 and 8:1, Tq < Tk with window and sinks.
CASES = {
    "token-T1": (1, 2, 2, 1, 1, 16, {}),
    "token-T2-mqa": (2, 2, 1, 2, 2, 64, {}),
    "frame3-T37-gqa4": (1, 4, 1, 37, 37, 40, dict(frame_size=3)),
    "frame7-T129-D80": (1, 2, 2, 129, 129, 80, dict(frame_size=7)),
    "frame64-T129-gqa8": (1, 8, 1, 129, 129, 16, dict(frame_size=64)),
    "cache-window-sink": (2, 4, 2, 37, 129, 40, dict(frame_size=7, window_frames=3, sink_frames=1)),
    "cache-window-token": (1, 2, 1, 20, 77, 16, dict(window_frames=9)),
    "window-2sinks-frame3": (1, 2, 2, 129, 129, 16, dict(frame_size=3, window_frames=5, sink_frames=2)),
    "noncausal-cache": (1, 2, 1, 37, 70, 80, dict(causal=False)),
    "decode-gqa4-window": (2, 8, 2, 1, 129, 64, dict(frame_size=3, window_frames=4, sink_frames=1)),
    "short-frame3-window": (3, 2, 1, 16, 40, 40, dict(frame_size=3, window_frames=2, sink_frames=1)),
    # windows wider than a tile, so fully visible tiles occur inside the window
    "window6-frame8-sink": (1, 2, 1, 129, 129, 16, dict(frame_size=8, window_frames=6, sink_frames=1)),
    "cache-window12-2sinks": (1, 2, 2, 50, 200, 16, dict(frame_size=5, window_frames=12, sink_frames=2)),
}
FP16_CASES = ["frame3-T37-gqa4", "cache-window-sink", "noncausal-cache", "short-frame3-window"]
GRAD_CASES = ["token-T2-mqa", "frame3-T37-gqa4", "frame7-T129-D80", "cache-window-sink", "noncausal-cache",
              "decode-gqa4-window", "short-frame3-window", "window6-frame8-sink", "cache-window12-2sinks"]
ON_GPU = torch.cuda.is_available()
GPU_SELECTION = {"cache-window-sink", "short-frame3-window", "window6-frame8-sink", "decode-gqa4-window"}


def _here(names, keep=GPU_SELECTION):
    """All of ``names`` on the CPU, the ones in ``keep`` on a GPU (compile time)."""
    return [n for n in names if not ON_GPU or n in keep]


def _inputs(case, dtype, device, seed=0, grad=False):
    B, Hq, Hkv, Tq, Tk, D, mask = CASES[case] if isinstance(case, str) else case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(device, dtype)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, mask


def _reference(q, k, v, **mask):
    return df_attention_reference(q, k, v, **mask)


@pytest.fixture(params=["tiled", "short"])
def path(request, monkeypatch):
    """Under the triton backend, also force the tiled kernels on short sequences."""
    if request.param == "tiled":
        from fastdf.kernels import attention as kernels

        monkeypatch.setattr(kernels, "SHORT_MAX", 0)
    return request.param


def _cases(names, dtype):
    return [pytest.param(n, dtype, id=f"{n}-{str(dtype)[6:]}") for n in names]


@pytest.mark.op("df_attention")
@pytest.mark.parametrize("case,dtype", _cases(_here(CASES), F32) + _cases(_here(FP16_CASES), F16)
                         + [pytest.param(n, torch.bfloat16, id=f"{n}-bf16", marks=pytest.mark.gpu)
                            for n in sorted(GPU_SELECTION | {"frame3-T37-gqa4", "noncausal-cache"})])
def test_matches_reference(backend, device, case, dtype):
    q, k, v, mask = _inputs(case, dtype, device)
    with poisoned():
        out, lse = fastdf.df_attention(q, k, v, return_lse=True, **mask)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape
    assert_matches_reference((out, lse), _reference, q, k, v, **mask)


@pytest.mark.op("df_attention")
@pytest.mark.parametrize("case", _here(["token-T2-mqa", "short-frame3-window", "decode-gqa4-window"]))
def test_short_sequences_tiled_and_short_kernels(backend, device, path, case):
    if backend != "triton" and path == "tiled":
        pytest.skip("only the triton backend has two kernels")
    q, k, v, mask = _inputs(case, F32, device, seed=3)
    with poisoned():
        out = fastdf.df_attention(q, k, v, return_lse=True, **mask)
    assert_matches_reference(out, _reference, q, k, v, **mask)


def _grads_through_reference(q, k, v, g_out, g_lse, mask):
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = df_attention_reference(*inputs, **mask)
    return torch.autograd.grad((out * g_out).sum() + (lse * g_lse.to(lse.dtype)).sum(), inputs)


@pytest.mark.op("df_attention")
@pytest.mark.parametrize("case,dtype", _cases(_here(GRAD_CASES), F32) + _cases(_here(FP16_CASES[:2]), F16)
                         + [pytest.param(n, torch.bfloat16, id=f"{n}-bf16", marks=pytest.mark.gpu)
                            for n in ("cache-window-sink", "frame7-T129-D80", "short-frame3-window")])
def test_gradients_match_fp64_autograd_through_reference(backend, device, case, dtype):
    q, k, v, mask = _inputs(case, dtype, device, seed=1, grad=True)
    gen = torch.Generator().manual_seed(2)
    g_out = torch.randn(q.shape, generator=gen).to(device, dtype)
    g_lse = torch.randn(q.shape[:3], generator=gen).to(device)
    with poisoned():
        out, lse = fastdf.df_attention(q, k, v, return_lse=True, **mask)
        grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
    ref = lambda q, k, v, g_out, g_lse: _grads_through_reference(q, k, v, g_out, g_lse, mask)  # noqa: E731
    assert_matches_reference(grads, ref, q, k, v, g_out, g_lse)


def test_backward_reference_matches_autograd_fp64():
    """The explicit chunked backward (the torch backend's) equals autograd, to fp64 precision,
    with grad through lse and a chunk size that splits the queries unevenly."""
    q, k, v, mask = _inputs("cache-window-sink", torch.float64, "cpu", grad=True)
    out, lse = df_attention_reference(q, k, v, **mask)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    got = df_attention_backward_reference(g_out, g_lse, q, k, v, out.detach(), lse.detach(), chunk=2 * 4 * 129 * 5,
                                          **mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_torch_backend_gradcheck():
    q, k, v, mask = _inputs((1, 2, 1, 5, 9, 8, dict(frame_size=2, window_frames=2, sink_frames=1)), torch.float64,
                            "cpu", grad=True)
    with fastdf.backend("torch"):
        torch.autograd.gradcheck(lambda q, k, v: fastdf.df_attention(q, k, v, return_lse=True, **mask), (q, k, v))


@pytest.mark.op("df_attention")
def test_strided_views(backend, device):
    """q/k/v as [B, H, T, D] views of [B, T, H, D] storage (a fused qkv projection), and a
    head dim with stride 2: no copies needed, same answer."""
    B, T, H, D = 2, 37, 4, 40
    qkv = torch.randn(B, T, 3, H, 2 * D, device=device)[..., ::2]
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA 2:1 from a slice of the heads
    assert not q.is_contiguous() and q.stride(-1) == 2
    mask = dict(frame_size=3, window_frames=4, sink_frames=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with poisoned():
        out = fastdf.df_attention(q, k, v, return_lse=True, **mask)
    assert_matches_reference(out, _reference, q, k, v, **mask)
    g_out = torch.randn_like(out[0])
    grads = torch.autograd.grad((out[0] * g_out).sum(), (q, k, v))
    ref = lambda q, k, v, g: _grads_through_reference(q, k, v, g, torch.zeros(q.shape[:3]).to(q), mask)  # noqa: E731
    assert_matches_reference(grads, ref, q, k, v, g_out)


@pytest.mark.op("df_attention")
def test_output_layout_and_lse(backend, device):
    q, k, v, mask = _inputs("cache-window-sink", F32, device)
    out, lse = fastdf.df_attention(q, k, v, return_lse=True, **mask)
    B, H, T, D = out.shape
    assert out.transpose(1, 2).is_contiguous()  # [B, T, H, D] memory: the out-projection reads it as is
    scores = (q @ k.transpose(-1, -2).repeat_interleave(2, 1)) * D ** -0.5
    scores = scores.masked_fill(~df_attention_mask(T, k.shape[2], **mask, device=device), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    assert torch.equal(fastdf.df_attention(q, k, v, **mask), out)


@pytest.mark.op("df_attention")
def test_scale_and_empty_queries(backend, device):
    q, k, v, mask = _inputs("frame3-T37-gqa4", F32, device)
    out = fastdf.df_attention(q, k, v, scale=0.3, **mask)
    assert_matches_reference(out, lambda q, k, v: _reference(q, k, v, scale=0.3, **mask)[0], q, k, v)
    k.requires_grad_()
    empty = fastdf.df_attention(q[:, :, :0], k, v, **mask)
    assert empty.shape == (1, 4, 0, 40)
    (grad_k,) = torch.autograd.grad(empty.sum(), k)
    assert torch.equal(grad_k, torch.zeros_like(k))


PADDED = {
    "prefill": ((3, 4, 2, 37, 37, 16), {}, [0, 5, 30]),
    "decode": ((3, 2, 1, 1, 50, 40), {}, [0, 13, 49]),  # decode step of a left-padded batch
    "window-sink": ((2, 2, 2, 20, 70, 16), dict(frame_size=4, window_frames=5, sink_frames=1), [3, 40]),
    "all-padding": ((2, 2, 1, 9, 9, 16), dict(frame_size=3), [4, 9]),  # one row is all padding
}


@pytest.mark.op("df_attention")
@pytest.mark.parametrize("shape,mask,starts", [PADDED[n] for n in _here(PADDED, {"prefill", "window-sink"})],
                         ids=_here(PADDED, {"prefill", "window-sink"}))
def test_padded_keys(backend, device, path, shape, mask, starts):
    """df_attention_padded (left padding for HF batches): keys before key_start[b] vanish;
    rows with no key give 0 / -inf; padding keys get zero gradients."""
    if backend != "triton" and path == "tiled":
        pytest.skip("only the triton backend has two kernels")
    q, k, v, _ = _inputs(shape + (mask,), F32, device, seed=6, grad=True)
    starts = torch.tensor(starts, device=device)
    with poisoned():
        out, lse = df_attention_padded(q, k, v, starts, return_lse=True, **mask)
        g_out = torch.randn_like(out)
        grads = torch.autograd.grad((out * g_out).sum() + lse.clamp(min=-1e4).sum(), (q, k, v))
    kpm = torch.arange(k.shape[2], device=device) >= starts[:, None]
    ref = lambda q, k, v: df_attention_reference(q, k, v, key_padding_mask=kpm, **mask)  # noqa: E731
    assert_matches_reference((out, lse), ref, q, k, v)

    def ref_grads(q, k, v, g_out):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        o, l = df_attention_reference(*inputs, key_padding_mask=kpm, **mask)
        return torch.autograd.grad((o * g_out).sum() + l.clamp(min=-1e4).sum(), inputs)

    assert_matches_reference(grads, ref_grads, q, k, v, g_out)
    for b, start in enumerate(starts.tolist()):
        assert torch.all(grads[1][b, :, :start] == 0) and torch.all(grads[2][b, :, :start] == 0)


def test_matches_flex_attention_on_cpu():
    """FlexAttention (eager, CPU) with the equivalent mask_mod gives the same output."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, Tq, Tk, D = 1, 2, 21, 50, 16
    mask = dict(frame_size=3, window_frames=3, sink_frames=1)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, t, D, generator=g) for t in (Tq, Tk, Tk))
    block_mask = create_block_mask(df_mask_mod(Tq, Tk, **mask), B, None, Tq, Tk, device="cpu")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile()": fine for a cross-check
        want = flex_attention(q, k, v, block_mask=block_mask)
    for name in fastdf.available_backends("cpu"):
        if name == "cuda":
            continue
        with fastdf.backend(name):
            torch.testing.assert_close(fastdf.df_attention(q, k, v, **mask), want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("tq,tk,mask", [
    (37, 37, {}), (5, 77, dict(frame_size=7)), (20, 50, dict(frame_size=3, window_frames=2, sink_frames=1)),
    (129, 129, dict(frame_size=64, window_frames=1)), (9, 30, dict(causal=False)),
    (30, 30, dict(frame_size=4, window_frames=2, sink_frames=5)),
])
def test_mask_helpers_follow_the_rule(tq, tk, mask):
    """df_attention_mask, df_mask_mod and visible_pairs against the rule written out."""
    fs, W, sink = mask.get("frame_size", 1), mask.get("window_frames"), mask.get("sink_frames", 0)
    want = torch.zeros(tq, tk, dtype=torch.bool)
    for i in range(tq):
        p = tk - tq + i
        for j in range(tk):
            if not mask.get("causal", True):
                want[i, j] = True
            else:
                want[i, j] = j // fs <= p // fs and (W is None or p // fs - j // fs < W or j // fs < sink)
    assert torch.equal(df_attention_mask(tq, tk, **mask), want)
    mod = df_mask_mod(tq, tk, **mask)
    got = mod(0, 0, torch.arange(tq)[:, None], torch.arange(tk)[None, :])
    assert torch.equal(got.expand(tq, tk), want)
    assert visible_pairs(tq, tk, **mask) == int(want.sum())


def test_opcheck():
    q, k, v, mask = _inputs("cache-window-sink", F32, "cpu")
    args = (q, k, v, None, 7, True, 3, 1, 0.125)
    torch.library.opcheck(torch.ops.fastdf.df_attention, args)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.fastdf.df_attention, (q, k, v, None, 7, True, 3, 1, 0.125))
    out, lse = torch.ops.fastdf.df_attention(q, k, v, None, 7, True, 3, 1, 0.125)
    g = torch.randn_like(out)
    args = (g, torch.randn_like(lse), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, 7, True, 3, 1,
            0.125)
    torch.library.opcheck(torch.ops.fastdf.df_attention_backward, args)
    torch.library.opcheck(torch.ops.fastdf.df_attention_backward, (g, None, *args[2:]))


def test_compiles_fullgraph():
    q, k, v, mask = _inputs("cache-window-sink", F32, "cpu", grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        out, lse = fastdf.df_attention(q * 2, k, v, return_lse=True, **mask)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1).sum() + lse.sum()

    got = f(q, k, v)
    got.backward()
    grads = [t.grad for t in (q, k, v)]
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = df_attention_reference(q2 * 2, k2, v2, **mask)
    want = out.sum() + lse.sum()
    want.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: fastdf.df_attention(q[:, :, :5], k[:, :, :3], v[:, :, :3]), ValueError, "Tq must be <= Tk"),
    (lambda q, k, v: fastdf.df_attention(q[:, :3], k, v), ValueError, r"multiple of k's heads"),
    (lambda q, k, v: fastdf.df_attention(q, k, v, causal=False, window_frames=2), ValueError, "window_frames"),
    (lambda q, k, v: fastdf.df_attention(q, k, v, causal=False, sink_frames=1), ValueError, "sink_frames"),
    (lambda q, k, v: fastdf.df_attention(q, k.half(), v), ValueError, "k has dtype float16 but q has float32"),
    (lambda q, k, v: fastdf.df_attention(q, k, v.to("meta")), ValueError, "v is on meta"),
    (lambda q, k, v: fastdf.df_attention(q[0], k, v), ValueError, "q must have 4 dims"),
    (lambda q, k, v: fastdf.df_attention(q, k[0], v), ValueError, "k must have 4 dims"),
    (lambda q, k, v: fastdf.df_attention(q, k, v[:, :, :4]), ValueError, "v must have shape"),
    (lambda q, k, v: fastdf.df_attention(q, k[..., :8], v[..., :8]), ValueError, "k must have shape"),
    (lambda q, k, v: fastdf.df_attention(q, k[:1], v[:1]), ValueError, "k must have shape"),
    (lambda q, k, v: fastdf.df_attention(q.int(), k, v), ValueError, "q must be one of"),
    (lambda q, k, v: fastdf.df_attention(q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: fastdf.df_attention(q, k, v, frame_size=0), ValueError, "frame_size must be >= 1"),
    (lambda q, k, v: fastdf.df_attention(q, k, v, frame_size=2.0), TypeError, "frame_size must be an int"),
    (lambda q, k, v: fastdf.df_attention(q, k, v, window_frames=0), ValueError, "window_frames must be >= 1"),
    (lambda q, k, v: fastdf.df_attention(q, k, v, sink_frames=-1), ValueError, "sink_frames must be >= 0"),
    (lambda q, k, v: fastdf.df_attention(q, k, v, causal=1), TypeError, "causal must be a bool"),
    (lambda q, k, v: fastdf.df_attention(q, k, v, scale=float("nan")), ValueError, "scale must be finite"),
])
def test_bad_input(call, error, match):
    q, k, v, _ = _inputs((2, 4, 2, 6, 6, 16, {}), F32, "cpu")
    with pytest.raises(error, match=match):
        call(q, k, v)


@pytest.mark.parametrize("tuned,rows", [(False, 130), (True, 130), (False, 3)],
                         ids=["heuristic-config", "autotuned-launch", "decode-config"])
def test_gpu_launch_configs_under_interpreter(monkeypatch, tuned, rows):
    """The GPU launch paths (the heuristic config, and the autotuner's launch, which pins its
    first config under the interpreter) run the tiled kernels with 128-row tiles."""
    from fastdf.kernels import attention as kernels
    from fastdf.ops import unavailable_reason

    if unavailable_reason("triton", "cpu"):
        pytest.skip("triton cannot run CPU tensors here")
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(kernels, "SHORT_MAX", 0)
    monkeypatch.setattr(kernels, "TUNE_MIN_PAIRS", 0 if tuned else float("inf"))
    q, k, v, mask = _inputs((2, 4, 2, rows, 200, 64, dict(frame_size=7, window_frames=12, sink_frames=1)), F32, "cpu",
                            grad=True)
    with fastdf.backend("triton"), poisoned():
        out = fastdf.df_attention(q, k, v, return_lse=True, **mask)
        grads = torch.autograd.grad(out[0].sum(), (q, k, v))
    assert_matches_reference(out, _reference, q, k, v, **mask)
    ones = torch.ones_like(q)
    ref = lambda q, k, v, g: _grads_through_reference(q, k, v, g, torch.zeros(q.shape[:3]), mask)  # noqa: E731
    assert_matches_reference(grads, ref, q, k, v, ones)


def test_triton_backend_refuses_what_it_cannot_run():
    from fastdf.ops import unavailable_reason

    if unavailable_reason("triton", "cpu"):
        pytest.skip("triton cannot run CPU tensors here")
    q, k, v, _ = _inputs((1, 1, 1, 3, 3, 16, {}), torch.float64, "cpu")
    with fastdf.backend("triton"), pytest.raises(fastdf.BackendUnavailableError, match="float64"):
        fastdf.df_attention(q, k, v)


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape,mask", [
    ((1, 4, 4, 1000, 1000, 128), {}),
    ((1, 8, 2, 1560, 4680, 128), dict(frame_size=1560, window_frames=2, sink_frames=1)),
    ((256, 4, 4, 16, 16, 64), {}),
])
def test_gpu_large_bf16_forward_backward(shape, mask):
    q, k, v, _ = _inputs(shape + (mask,), torch.bfloat16, "cuda", grad=True)
    g_out = torch.randn_like(q)
    with fastdf.backend("triton"):
        out, lse = fastdf.df_attention(q, k, v, return_lse=True, **mask)
        grads = torch.autograd.grad((out * g_out).sum(), (q, k, v))
        again = torch.autograd.grad((fastdf.df_attention(q, k, v, **mask) * g_out).sum(), (q, k, v))
    for a, b in zip(grads, again):
        assert torch.equal(a, b), "the backward must be deterministic (no atomics)"
    assert_matches_reference((out, lse), _reference, q, k, v, **mask)
    ref = lambda q, k, v, g: _grads_through_reference(q, k, v, g, torch.zeros(q.shape[:3]).to(q), mask)  # noqa: E731
    assert_matches_reference(grads, ref, q, k, v, g_out)


"""fastdf._cpu's attention kernels (csrc/cpu/attention.cpp), the torch backend's forward and
backward for fp32 heads of up to CPU_KERNEL_MAX_KEYS keys on AVX-512 CPUs: key ranges
against the mask rule, results and gradients against the fp64 reference by the 2x rule
across head dims, GQA, caches, frames, windows and sinks, layouts and thread counts, what
takes them and what does not, and non-finite data (the hardening suite runs through them
too)."""

import pytest
import torch

import fastdf
from fastdf import _native
from fastdf.ops import attention as A
from fastdf.ops.attention import df_attention_mask, df_attention_reference
from fastdf.testing import assert_matches_reference

pytestmark = pytest.mark.skipif(_native.cpu_module() is None, reason=str(_native.cpu_unavailable_reason()))


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _inputs(B, Hq, Hkv, Tq, Tk, D, seed=0):
    # [B, H, T, D] views of [B, T, H, D] storage, as a model's projections give them
    q = _rand(B, Tq, Hq, D, seed=seed).transpose(1, 2)
    k = _rand(B, Tk, Hkv, D, seed=seed + 1).transpose(1, 2)
    v = _rand(B, Tk, Hkv, D, seed=seed + 2).transpose(1, 2)
    return q, k, v


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the forward kernel's calls (and makes sure the module flag is on)."""
    calls = []
    run = A._attention_cpu_kernel
    monkeypatch.setattr(A, "CPU_KERNEL", True)
    monkeypatch.setattr(A, "_attention_cpu_kernel", lambda *a, **kw: calls.append(a[0].shape) or run(*a, **kw))
    return calls


@pytest.fixture
def backward_calls(monkeypatch):
    calls = []
    run = A._attention_backward_cpu_kernel
    monkeypatch.setattr(A, "_attention_backward_cpu_kernel", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    return calls


def _fwd_bwd(q, k, v, g, **mask):
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with fastdf.backend("torch"):
        out = fastdf.df_attention(*inputs, **mask)
        return (out, *torch.autograd.grad((out * g).sum(), inputs))


def _ranges_mask(tq, tk, mask):
    rule = A._normalise_mask(tk, mask.get("frame_size", 1), mask.get("causal", True), mask.get("window_frames"),
                             mask.get("sink_frames", 0))
    r = A._key_ranges(tq, tk, rule[0], mask.get("causal", True), rule[1], rule[2]).long()
    j = torch.arange(tk)
    seen = ((j >= r[:, :1]) & (j < r[:, 1:2])) | ((j >= r[:, 2:3]) & (j < r[:, 3:4]))
    assert (r[:, 1] >= r[:, 0]).all() and (r[:, 3] >= r[:, 2]).all() and ((r[:, 2] >= r[:, 1]) | (r[:, 3] == r[:, 2])).all()
    return seen


@pytest.mark.parametrize("seed", range(40))
def test_key_ranges_are_the_mask_rule(seed):
    g = torch.Generator().manual_seed(seed)
    tk = int(torch.randint(1, 70, (), generator=g))
    tq = int(torch.randint(1, tk + 1, (), generator=g))
    mask = dict(frame_size=int(torch.randint(1, 12, (), generator=g)))
    kind = seed % 4
    if kind == 1:
        mask.update(window_frames=int(torch.randint(1, 6, (), generator=g)))
    if kind == 2:
        mask.update(window_frames=int(torch.randint(1, 6, (), generator=g)), sink_frames=int(torch.randint(1, 4, (), generator=g)))
    if kind == 3:
        mask = dict(causal=False)
    assert torch.equal(_ranges_mask(tq, tk, mask), df_attention_mask(tq, tk, **mask)), mask


# (B, Hq, Hkv, Tq, Tk, D, mask)
CASES = {
    "token-causal-D64": (2, 2, 2, 40, 40, 64, {}),
    "tiny-heads-D16": (9, 4, 4, 16, 16, 16, {}),
    "cache-gqa-D32": (2, 4, 2, 13, 50, 32, {}),
    "frames-D48": (1, 2, 1, 36, 36, 48, dict(frame_size=12)),
    "frames-cache-midframe-D128": (1, 4, 2, 17, 40, 128, dict(frame_size=6)),
    "window-sink-D144": (1, 2, 2, 40, 64, 144, dict(frame_size=8, window_frames=2, sink_frames=1)),
    "window-sink-adjacent-D80": (1, 2, 2, 24, 24, 80, dict(frame_size=8, window_frames=2, sink_frames=1)),
    "token-window-D256": (1, 2, 2, 30, 30, 256, dict(window_frames=7)),
    "bidirectional-D16": (1, 2, 2, 9, 20, 16, dict(causal=False)),
    "one-query-512-keys": (1, 2, 1, 1, 512, 64, dict(frame_size=100, window_frames=3, sink_frames=1)),
    "512-keys": (1, 1, 1, 512, 512, 32, dict(frame_size=64)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_the_reference(kernel_calls, backward_calls, case):
    B, Hq, Hkv, Tq, Tk, D, mask = CASES[case]
    q, k, v = _inputs(B, Hq, Hkv, Tq, Tk, D, seed=len(case))
    with fastdf.backend("torch"):
        out, lse = fastdf.df_attention(q, k, v, return_lse=True, **mask)
    assert len(kernel_calls) == 1
    assert out.transpose(1, 2).is_contiguous()  # the documented [B, Tq, Hq, D] memory

    def reference(q, k, v):
        return df_attention_reference(q, k, v, **mask)
    assert_matches_reference((out, lse), reference, q, k, v)

    g = _rand(B, Tq, Hq, D, seed=7).transpose(1, 2)
    got = _fwd_bwd(q, k, v, g, **mask)
    assert len(backward_calls) == 1
    assert all(t.transpose(1, 2).is_contiguous() for t in got)

    def grads(q, k, v):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        o, _ = df_attention_reference(*inputs, **mask)
        return (o, *torch.autograd.grad((o * g.to(o.dtype)).sum(), inputs))
    assert_matches_reference(got, grads, q, k, v)


def test_long_dense_rows_run_on_aten(kernel_calls, backward_calls):
    """Every row seeing every one of >= CPU_KERNEL_DENSE_KEYS keys: aten's flash kernel
    (measured faster there), forward and backward, held to the reference. Shorter rows, or
    a mask that hides a key from some row, take the kernels."""
    q, k, v = _inputs(1, 2, 2, 40, A.CPU_KERNEL_DENSE_KEYS, 32, seed=4)
    g = _rand(1, 40, 2, 32, seed=5).transpose(1, 2)
    for kw in (dict(causal=False), dict(frame_size=200)):  # one frame: every key too
        got = _fwd_bwd(q, k, v, g, **kw)
        assert (len(kernel_calls), len(backward_calls)) == (0, 0)

        def ref(q, k, v, g):
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            o = df_attention_reference(*inputs, **kw)[0]
            return (o, *torch.autograd.grad((o * g.to(o.dtype)).sum(), inputs))

        assert_matches_reference(got, ref, q, k, v, g)
    with fastdf.backend("torch"):  # with lse (the custom op's route too): aten's kernel as well
        fastdf.df_attention(q, k, v, causal=False, return_lse=True)
    assert len(kernel_calls) == 0
    _fwd_bwd(q, k, v, g, frame_size=40)  # the first rows see fewer keys: the kernels
    assert (len(kernel_calls), len(backward_calls)) == (1, 1)
    _fwd_bwd(q[:, :, :16], k[:, :, :16], v[:, :, :16], g[:, :, :16], causal=False)  # short: the kernels
    assert (len(kernel_calls), len(backward_calls)) == (2, 2)


@pytest.mark.parametrize("poison", ["v", "k", "dout"])
def test_backward_poison_stays_with_what_it_reaches(backward_calls, poison):
    """NaN in the last key (behind the token-causal diagonal of every earlier row) or in the
    last row's upstream gradient: the earlier rows' outputs and dq are bitwise the clean
    run's, through the kernel in both runs (the first run's result is accepted; the second
    is rejected and runs again on zeroed data, with the reference's values where the NaN
    reaches: every key the last row sees, as in the reference)."""
    q, k, v = _inputs(1, 2, 2, 40, 40, 32, seed=22)
    g = _rand(1, 40, 2, 32, seed=23).transpose(1, 2).contiguous()
    g[:, :, -1] = 0  # the loss reads the clean rows only
    clean = _fwd_bwd(q, k, v, g)
    k2, v2, g2 = k.clone(), v.clone(), g.clone()
    {"v": v2, "k": k2, "dout": g2}[poison][:, :, -1, 3] = float("nan")
    dirty = _fwd_bwd(q, k2, v2, g2)
    # clean run 1; a NaN dO passes the forward: the kernel on the data as it is, rejected, then
    # on zeroed data; a NaN key/value fails the forward's check: the zeroed run only
    assert len(backward_calls) == (3 if poison == "dout" else 2)
    assert torch.equal(dirty[0][:, :, :-1], clean[0][:, :, :-1])
    assert torch.equal(dirty[1][:, :, :-1], clean[1][:, :, :-1])  # dq of the rows that do not see key 39
    assert any(bool(t.isnan().any()) for t in dirty[1:])


@pytest.mark.parametrize("layout", ["bhtd", "sliced", "rows-strided"])
def test_layouts_and_thread_counts_give_the_same_bits(kernel_calls, layout):
    """Any strides (rows that are not contiguous are copied first), and 1 or 2 OpenMP
    threads: each (batch, kv head) is one task, so the bits do not depend on either."""
    q, k, v = _inputs(3, 4, 2, 20, 33, 32, seed=5)
    if layout == "bhtd":
        q, k, v = (t.contiguous() for t in (q, k, v))
    elif layout == "sliced":
        q, k, v = (torch.cat([t, t], -1)[..., :32] for t in (q, k, v))
    else:
        q, k, v = (torch.stack([t, t], -1)[..., 0] for t in (q, k, v))
    mask = dict(frame_size=4, window_frames=3, sink_frames=1)
    want = fastdf.df_attention(q.contiguous(), k.contiguous(), v.contiguous(), **mask)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(fastdf.df_attention(q, k, v, **mask), want)
    finally:
        torch.set_num_threads(threads)
    assert len(kernel_calls) == 3


def test_rows_cut_across_threads_give_the_same_bits(kernel_calls):
    """Fewer (batch, kv head) pairs than threads: the forward cuts a pair's rows across
    threads (one pair, 2 threads: two row ranges), rows are independent, so the bits stay."""
    q, k, v = _inputs(1, 2, 1, 45, 60, 32, seed=8)
    mask = dict(frame_size=5, window_frames=4, sink_frames=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = fastdf.df_attention(q, k, v, return_lse=True, **mask)
        torch.set_num_threads(2)
        got = fastdf.df_attention(q, k, v, return_lse=True, **mask)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(kernel_calls) == 2


def test_what_the_kernel_takes(kernel_calls, monkeypatch):
    """fp32 only, D a multiple of 16 up to 256, at most 512 keys, no key padding; the aten
    path (checked) runs everything else, and CPU_KERNEL = False turns the kernel off."""
    def run(B, Hq, Tq, Tk, D, dtype=torch.float32, **kw):
        q, k, v = (t.to(dtype) for t in _inputs(B, Hq, Hq, Tq, Tk, D, seed=1))
        with fastdf.backend("torch"):
            fastdf.df_attention(q, k, v, **kw)
        return len(kernel_calls)

    assert run(1, 2, 8, 8, 16) == 1
    meta = torch.empty(1, 2, 8, 16, device="meta")  # not CPU memory (a CUDA tensor on the torch backend)
    assert not A._cpu_kernel_fits(meta, meta) and A._cpu_kernel_fits(torch.empty(1, 2, 8, 16), torch.empty(1, 2, 8, 16))
    for args, kw in [((1, 2, 8, 8, 40), {}), ((1, 2, 8, 8, 272), {}), ((1, 1, 8, 513, 16), {}),
                     ((1, 2, 8, 8, 16, torch.float16), {}), ((1, 2, 8, 8, 16, torch.float64), {}),
                     ((1, 2, 8, 8, 16), dict(key_padding_mask=torch.tensor([[True] * 7 + [False]])))]:
        assert run(*args, **kw) == 1, (args, kw)
    assert run(1, 2, 8, 8, 16, key_padding_mask=torch.ones(1, 8, dtype=torch.bool)) == 2  # all True: no padding
    monkeypatch.setattr(A, "CPU_KERNEL", False)
    assert run(1, 2, 8, 8, 16) == 2
    monkeypatch.setattr(A, "CPU_KERNEL", True)
    monkeypatch.setattr(_native, "cpu_module", lambda: None)
    assert run(1, 2, 8, 8, 16) == 2


def test_kernel_and_aten_path_agree_and_gradients_flow(kernel_calls, monkeypatch):
    """The backward (aten's flash backward, given the kernel's out and lse) matches the
    reference, and the aten forward agrees with the kernel's within the rule."""
    q, k, v = _inputs(2, 4, 2, 24, 40, 64, seed=11)
    g = _rand(2, 24, 4, 64, seed=12).transpose(1, 2)
    mask = dict(frame_size=8, window_frames=2, sink_frames=1)

    def fwd_bwd(q, k, v):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        with fastdf.backend("torch"):
            out = fastdf.df_attention(*inputs, **mask)
        return (out, *torch.autograd.grad((out * g).sum(), inputs))

    got = fwd_bwd(q, k, v)
    assert len(kernel_calls) == 1
    monkeypatch.setattr(A, "CPU_KERNEL", False)
    aten = fwd_bwd(q, k, v)
    for a, b in zip(got, aten):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    def reference(q, k, v):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = df_attention_reference(*inputs, **mask)
        return (out, *torch.autograd.grad((out * g.to(out.dtype)).sum(), inputs))
    assert_matches_reference(got, reference, q, k, v)


def test_poison_stays_with_the_rows_that_see_it(kernel_calls):
    """A NaN key and an inf value: rows that cannot see them are bitwise the clean run's
    (the kernel never reads a key outside a row's ranges), the rest are the reference's;
    keys nobody sees are never read at all."""
    q, k, v = _inputs(1, 2, 2, 30, 40, 32, seed=3)
    mask = dict(frame_size=5, window_frames=2, sink_frames=1)
    with fastdf.backend("torch"):
        clean, clean_lse = fastdf.df_attention(q, k, v, return_lse=True, **mask)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 22] = float("nan")  # frame 4 (keys 20-24): rows of frames 4 and 5 see it
        v2[:, :, 23, 0] = float("inf")
        out, lse = fastdf.df_attention(q, k2, v2, return_lse=True, **mask)
    seen = df_attention_mask(30, 40, **mask)[:, 22]
    assert torch.equal(out[:, :, ~seen], clean[:, :, ~seen]) and torch.equal(lse[:, :, ~seen], clean_lse[:, :, ~seen])
    ref, ref_lse = df_attention_reference(q, k2, v2, upcast=True, **mask)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.isnan(out[:, :, seen]).all()


def test_binding_refuses_what_it_cannot_run():
    mod = _native.cpu_module()
    q = torch.zeros(1, 1, 4, 40)
    lse = torch.zeros(1, 1, 4)
    ranges = torch.zeros(4, 4, dtype=torch.int32)
    args = [q.data_ptr()] * 4 + [lse.data_ptr(), 1, 1, 1, 4, 4, 40] + [(160, 160, 40)] * 4 + [(4, 4, 1),
                                                                                               ranges.data_ptr(), 1.0, 1]
    with pytest.raises(ValueError, match="multiple of 16"):
        mod.attention_forward(*args)
    args[10], args[9] = 16, 600
    with pytest.raises(ValueError, match="Tk <= 512"):
        mod.attention_forward(*args)


def test_backward_flushes_only_what_fp32_normals_cannot_hold(backward_calls):
    """Rows whose scores span 91-97 have probabilities below 2^-126. The backward kernel runs
    with flush-to-zero (each subnormal result cost a ~20x microcode assist): the dV of keys
    seen only that faintly is 0 (plain fp32 autograd: ~1e-40), every gradient still meets
    the 2x rule against fp64, and the thread's FP mode is restored after the call."""
    D, Tq, Tk = 16, 16, 32
    q = torch.zeros(1, 1, Tq, D)
    q[..., 0] = 4.0  # scale 1/4: scaled scores are k[j, 0] plus the small rest
    k = _rand(1, 1, Tk, D, seed=5) * 0.01
    k[0, 0, 0, 0] = 0.0
    k[0, 0, 1:, 0] = -91.0 - 6.0 * torch.arange(Tk - 1) / (Tk - 2)  # e^-91 .. e^-97
    v, g = _rand(1, 1, Tk, D, seed=6), _rand(1, 1, Tq, D, seed=7)
    out, dq, dk, dv = _fwd_bwd(q, k, v, g, causal=False)
    assert backward_calls, "the backward kernel must run"
    assert (dv[0, 0, 1:] == 0).all() and (dv[0, 0, 0] != 0).all()

    def grads(q, k, v):
        leaves = [t.requires_grad_() for t in (q, k, v)]
        o = df_attention_reference(*leaves, causal=False)[0]
        return torch.autograd.grad((o * g.to(o.dtype)).sum(), leaves)

    assert_matches_reference((dq, dk, dv), grads, q, k, v)
    tiny = torch.full((4,), 2.0 ** -140)
    assert (tiny * 1.5 > 0).all(), "subnormal arithmetic must work again after the kernel"


@pytest.mark.parametrize("poison", [None, "score", "value"])
def test_sharp_rows_drop_only_what_fp32_cannot_hold(kernel_calls, poison):
    """A row whose scores span more than ~87 (subnormal probabilities) normalises without
    forming subnormal weights (each would cost a microcode assist): out and lse still match
    the fp64 reference by the 2x rule, and a NaN score or value the row sees still makes
    the row NaN (the dropped lanes are only finite tiny ones; a NaN lane stays)."""
    D, Tq, Tk = 16, 16, 64
    q = torch.zeros(1, 1, Tq, D)
    q[..., 0] = 4.0
    k = _rand(1, 1, Tk, D, seed=8) * 0.01
    k[0, 0, 0::2, 0] = -torch.linspace(0.0, 3.0, Tk // 2)  # the normal weights
    k[0, 0, 1::2, 0] = -torch.linspace(88.0, 110.0, Tk // 2)  # subnormal ones, and zeros
    v = _rand(1, 1, Tk, D, seed=9)
    if poison == "score":  # 0 * NaN: a NaN score of key 5 in every (sharp) row
        k[0, 0, 5, 1] = float("nan")
    if poison == "value":
        v[0, 0, 5, 2] = float("nan")
    with fastdf.backend("torch"):
        out, lse = fastdf.df_attention(q, k, v, causal=False, return_lse=True)
    assert kernel_calls, "the forward kernel must run"
    assert_matches_reference((out, lse), lambda *t: df_attention_reference(*t, causal=False), q, k, v)
    if poison:  # every row sees the poisoned key
        assert out.isnan().all() and lse.isnan().all() == (poison == "score")
        # the kernel's own rows too (the public call sends non-finite rows to the careful path)
        raw, raw_lse = torch.full_like(out, 7.0), torch.full_like(lse, 7.0)
        ranges = A._key_ranges(Tq, Tk, Tk, False, None, 0)
        finite, _ = _native.cpu_module().attention_forward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), raw.data_ptr(), raw_lse.data_ptr(), 1, 1, 1, Tq, Tk, D,
            q.stride()[:3], k.stride()[:3], v.stride()[:3], raw.stride()[:3], raw_lse.stride(), ranges.data_ptr(),
            D ** -0.5, 1)
        assert not finite and raw.isnan().any(-1).all()  # a NaN value: its column; the public call: the row


@pytest.mark.parametrize("mask", [{}, dict(frame_size=32), dict(frame_size=16, window_frames=3, sink_frames=1)],
                         ids=["token", "frames", "window-sink"])
@pytest.mark.parametrize("spread", [5.5, 20.0])
def test_backward_of_sharp_rows_stays_in_the_kernel(backward_calls, spread, mask):
    """Rows with |lse| > 100 (sharp attention: q and k scaled by ``spread``) run the kernel's
    backward, which recomputes their max and sum from the scores (exp(s - lse) would carry
    lse's rounding, ~|lse| 2^-24, into every probability): gradients by the 2x rule."""
    B, H, T, D = 1, 2, 96, 32
    q, k, v = (t * s for t, s in zip(_inputs(B, H, H, T, T, D, seed=11), (spread, spread, 1.0)))
    g = _rand(B, H, T, D, seed=14)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with fastdf.backend("torch"):
        out, lse = fastdf.df_attention(*leaves, return_lse=True, **mask)
        got = torch.autograd.grad(out, leaves, g)
    assert float(lse.detach().abs().max()) > A.FLASH_BACKWARD_MAX_LSE and backward_calls

    def grads(q, k, v):
        ls = [t.requires_grad_() for t in (q, k, v)]
        o = df_attention_reference(*ls, **mask)[0]
        return torch.autograd.grad((o * g.to(o.dtype)).sum(), ls)

    assert_matches_reference(got, grads, q, k, v)

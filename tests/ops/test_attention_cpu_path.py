"""The torch backend's blocked CPU path (issue 11 part 4): each block of query frames runs
on the keys it can see, through the CPU flash kernel forward and a blocked recompute
backward. These tests pin the block planner to the mask rule, compare forward and backward
against the fp64 reference across the block shapes the planner makes (single-frame blocks,
grouped small frames with masked pieces, window + sink pieces merged by log-sum-exp,
token-causal squares, cut backward row blocks), and check the fallbacks. The forward of
fp32 heads that fastdf._cpu's kernel takes is under test in test_attention_cpu_kernel.py:
here it is off, so the aten path runs where the kernel would."""

import pytest
import torch

import fastdf
from fastdf.ops import attention as A
from fastdf.ops.attention import df_attention_mask, df_attention_reference
from fastdf.testing import assert_matches_reference

F32, F64, F16 = torch.float32, torch.float64, torch.float16


def _rand(*shape, seed, dtype=F32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _inputs(B, Hq, Hkv, Tq, Tk, D, dtype=F32, seed=0):
    # [B, H, T, D] views of [B, T, H, D] storage, as a model's projections give them
    q = _rand(B, Tq, Hq, D, seed=seed, dtype=dtype).transpose(1, 2)
    k = _rand(B, Tk, Hkv, D, seed=seed + 1, dtype=dtype).transpose(1, 2)
    v = _rand(B, Tk, Hkv, D, seed=seed + 2, dtype=dtype).transpose(1, 2)
    return q, k, v


def _rule(tq, tk, frame_size=1, causal=True, window_frames=None, sink_frames=0):
    return A._normalise_mask(tk, frame_size, causal, window_frames, sink_frames)


# (B, Hq, Hkv, Tq, Tk, D, mask): every kind of block _plan makes, with small FAST_* sizes
CASES = {
    "token-causal": (1, 2, 2, 40, 40, 16, {}),
    "token-causal-cache-gqa": (2, 4, 2, 13, 50, 8, {}),
    "frames-whole": (1, 2, 1, 36, 36, 16, dict(frame_size=12)),
    "frames-grouped": (1, 2, 2, 37, 37, 16, dict(frame_size=3)),
    "frames-cache-midframe": (1, 4, 2, 17, 40, 16, dict(frame_size=6)),
    "window-sink-whole": (1, 2, 2, 40, 64, 8, dict(frame_size=8, window_frames=2, sink_frames=1)),
    "window-sink-grouped": (1, 4, 1, 30, 45, 8, dict(frame_size=2, window_frames=4, sink_frames=2)),
    "window-sink-adjacent": (1, 2, 2, 24, 24, 8, dict(frame_size=8, window_frames=2, sink_frames=1)),
    "token-window": (1, 2, 2, 30, 30, 8, dict(window_frames=7)),
    "bidirectional": (1, 2, 2, 9, 20, 8, dict(causal=False)),
}


@pytest.fixture(autouse=True)
def aten_path(monkeypatch):
    monkeypatch.setattr(A, "CPU_KERNEL", False)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so the small test shapes exercise every planner branch."""
    monkeypatch.setattr(A, "FAST_FRAME_ROWS", 8)
    monkeypatch.setattr(A, "FAST_BLOCK_ROWS", 10)
    monkeypatch.setattr(A, "BACKWARD_BLOCK_ROWS", 7)
    monkeypatch.setattr(A, "DENSE_CALL_WORK", float("inf"))  # never one dense piece: the pieces are under test


@pytest.mark.parametrize("tq,tk,mask", [(c[3], c[4], c[6]) for c in CASES.values()], ids=list(CASES))
@pytest.mark.parametrize("rows", [(8, 10), (32, 128), (1, 1)], ids=["small", "default", "per-frame"])
def test_plan_covers_exactly_the_visible_keys(monkeypatch, tq, tk, mask, rows):
    """The pieces of each block cover every key some row sees, nothing twice, every row
    sees a key of each piece, and unmasked pieces are seen whole by every row."""
    monkeypatch.setattr(A, "FAST_FRAME_ROWS", rows[0])
    monkeypatch.setattr(A, "FAST_BLOCK_ROWS", rows[1])
    fs, window, sinks = _rule(tq, tk, **mask)
    causal = mask.get("causal", True)
    vis = df_attention_mask(tq, tk, frame_size=fs, causal=causal, window_frames=window, sink_frames=sinks)
    covered = torch.zeros(tq, dtype=torch.long)
    for plan in (A._plan(tq, tk, fs, causal, window, sinks),
                 A._backward_plan(3, tq, tk, fs, causal, window, sinks)):
        covered.zero_()
        for s, e, pieces in plan:
            covered[s:e] += 1
            seen = torch.zeros(e - s, tk, dtype=torch.long)
            for lo, hi, kind in pieces:
                assert 0 <= lo < hi <= tk
                seen[:, lo:hi] += 1
                part = vis[s:e, lo:hi]
                assert part.any(-1).all(), "a row sees no key of a piece"
                if kind is None:
                    assert part.all()
                elif kind == "causal":
                    assert hi - lo == e - s and torch.equal(part, torch.ones_like(part).tril())
            assert seen.max() <= 1
            assert not (vis[s:e] & (seen == 0)).any(), "a visible key is in no piece"
        assert torch.equal(covered, torch.ones_like(covered))


def _grads_reference(q, k, v, g, g_lse, mask):
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = df_attention_reference(*inputs, **mask)
    loss = (out * g.double()).sum() + (lse * g_lse.double()).sum() if g_lse is not None else (out * g.double()).sum()
    return (out, lse, *torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=["fp32", "fp64", "fp16"])
@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_match_fp64_reference(small_blocks, name, with_lse, dtype):
    B, Hq, Hkv, Tq, Tk, D, mask = CASES[name]
    q, k, v = _inputs(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, seed=3)
    g = _rand(B, Hq, Tq, D, seed=9, dtype=dtype)
    g_lse = _rand(B, Hq, Tq, seed=10) if with_lse else None
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with fastdf.backend("torch"):
        out, lse = fastdf.df_attention(*inputs, return_lse=True, **mask)
        loss = (out * g).sum() + ((lse * g_lse).sum() if with_lse else 0)
        grads = torch.autograd.grad(loss, inputs)
    want = _grads_reference(q, k, v, g, g_lse, mask)
    # fp32 arithmetic throughout (fp64 for fp64), one rounding to fp16 at the end
    tol = {F32: 2e-5, F64: 1e-12, F16: 2e-3}[dtype]
    assert out.dtype == dtype and out.transpose(1, 2).is_contiguous() and lse.is_contiguous()
    for got, ref in zip((out, lse, *grads), want):
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_fast_path_is_taken_and_skips_invisible_keys(monkeypatch):
    """The blocked kernel runs (not the reference) and never reads a key range no row of a
    block sees: frame-causal over 5 frames touches 3/5 of the key columns."""
    calls = []
    flash = A._flash_cpu()

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return flash(q, k, v, *args, **kwargs)

    monkeypatch.setattr(A, "_flash_cpu", lambda: spy)
    monkeypatch.setattr(A, "df_attention_reference", None)  # any fallback would raise
    monkeypatch.setattr(A, "DENSE_CALL_WORK", float("inf"))
    q, k, v = _inputs(1, 2, 2, 200, 200, 8, seed=4)
    with fastdf.backend("torch"), torch.no_grad():
        fastdf.df_attention(q, k, v, frame_size=40)
    assert sum(r * c for r, c in calls) == 40 * 40 * (1 + 2 + 3 + 4 + 5)


def test_padding_and_huge_values_take_the_reference(monkeypatch):
    """A key padding mask with holes, and data whose raw q . k or value sums could
    overflow float32 inside the kernel, go to the reference; an all-True mask does not."""
    q, k, v = _inputs(2, 2, 2, 10, 10, 8, seed=5)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    assert A._fast_path_data(q, k, v, kpm, 0.3) is not None
    kpm[1, 3] = False
    assert A._fast_path_data(q, k, v, kpm, 0.3) is None
    assert A._fast_path_data(q * 1e19, k * 1e19, v, None, 0.3) is None
    assert A._fast_path_data(q, k, v * 1e37, None, 0.3) is None
    assert A._fast_path_data(q[:, :, :0], k, v, None, 0.3) is None


def test_non_finite_rows_take_the_reference_values(small_blocks):
    """NaN/inf inside a masked piece (grouped small frames): rows that see it get the
    reference's NaN, the others are bitwise those of the clean run."""
    q, k, v = _inputs(1, 2, 2, 30, 30, 8, seed=6)
    mask = dict(frame_size=3)
    with fastdf.backend("torch"), torch.no_grad():
        clean, clean_lse = fastdf.df_attention(q, k, v, return_lse=True, **mask)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 13] = float("nan")  # frame 4: rows 12.. see it
        v2[:, :, 14, 0] = float("inf")
        out, lse = fastdf.df_attention(q, k2, v2, return_lse=True, **mask)
    assert torch.equal(out[:, :, :12], clean[:, :, :12]) and torch.equal(lse[:, :, :12], clean_lse[:, :, :12])
    assert torch.isnan(out[:, :, 12:]).all()
    ref, _ = df_attention_reference(q, k2, v2, upcast=True, **mask)
    torch.testing.assert_close(out, ref, equal_nan=True)


def _fwd_bwd(q, k, v, g, **mask):
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with fastdf.backend("torch"):
        out = fastdf.df_attention(*inputs, **mask)
        return (out, *torch.autograd.grad((out * g).sum(), inputs))


def test_backward_non_finite_rows_take_the_reference_values(small_blocks):
    """The flash backward with NaN/inf in a masked piece: dq of the rows that do not see
    it and dk/dv of the keys only such rows see are bitwise the clean run's; the rest is
    the reference's."""
    q, k, v = _inputs(1, 4, 2, 30, 30, 8, seed=7)
    g = _rand(1, 4, 30, 8, seed=8)
    mask = dict(frame_size=3, window_frames=2)
    clean = _fwd_bwd(q, k, v, g, **mask)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 13] = float("nan")  # frame 4: rows of frames 4-5 see it, and they see keys 9..17
    v2[:, :, 14, 0] = float("inf")
    dirty = _fwd_bwd(q, k2, v2, g, **mask)
    rows = torch.ones(30, dtype=torch.bool)
    rows[12:18] = False
    keys = torch.ones(30, dtype=torch.bool)
    keys[9:18] = False
    assert torch.equal(dirty[1][:, :, rows], clean[1][:, :, rows])  # dq
    for i in (2, 3):  # dk, dv
        assert torch.equal(dirty[i][:, :, keys], clean[i][:, :, keys])
        assert torch.isnan(dirty[i][:, :, 9:15]).any()
    # the backward reference itself (autograd through the forward reference spreads NaN)
    ref = A.df_attention_backward_reference(g.double(), None, q.double(), k2.double(), v2.double(), None, None, **mask)
    # where the reference is NaN this path may be finite: a row seeing a NaN key has a NaN
    # softmax max there, which spreads to the dv of keys it cannot see; here it does not
    for got, want in zip(dirty[1:], ref):
        assert not (torch.isnan(got) & ~torch.isnan(want)).any()
        finite = ~torch.isnan(want)
        torch.testing.assert_close(got.double()[finite], want[finite], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case", ["fp32", "lse-grad", "fp16", "large-scores"])
def test_backward_kernel_choice(monkeypatch, case):
    """The flash backward runs for fp32/fp64 without an lse gradient and moderate lse; an
    lse gradient, low precision (out rounded) or |lse| beyond FLASH_BACKWARD_MAX_LSE take
    the blocked stable-softmax recompute. Either way the result matches the reference."""
    used = []
    for name in ("_attention_backward_flash", "_attention_backward_fast"):
        fn = getattr(A, name)
        monkeypatch.setattr(A, name, lambda *a, _fn=fn, _name=name: used.append(_name) or _fn(*a))
    dtype = F16 if case == "fp16" else F32
    q, k, v = _inputs(1, 2, 2, 24, 24, 8, dtype=dtype, seed=11)
    if case == "large-scores":
        q = q * 40
    g = _rand(1, 2, 24, 8, seed=12, dtype=dtype)
    g_lse = _rand(1, 2, 24, seed=13) if case == "lse-grad" else None
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with fastdf.backend("torch"):
        out, lse = fastdf.df_attention(*inputs, return_lse=True, frame_size=4)
        loss = (out * g).sum() + ((lse * g_lse).sum() if g_lse is not None else 0)
        grads = torch.autograd.grad(loss, inputs)
    if case == "fp32":
        assert used == ["_attention_backward_flash"]
    elif case == "large-scores":
        assert lse.abs().max() > A.FLASH_BACKWARD_MAX_LSE
        assert used == ["_attention_backward_flash", "_attention_backward_fast"]
    else:
        assert used == ["_attention_backward_fast"]
    want = _grads_reference(q, k, v, g, g_lse, dict(frame_size=4))[2:]
    tol = 2e-3 if dtype == F16 else 2e-5
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))


def test_one_key_rows_follow_the_rule():
    """The rows the flash backward treats as one-key rows (P = 1 exactly), and their key,
    are those of the mask, over every small configuration (the host-side shortcut
    included)."""
    for tk in range(1, 11):
        for tq in range(1, tk + 1):
            for fs, causal, window, sinks in [(f, True, w, s) for f in range(1, 5) for w in (None, 1, 2)
                                              for s in ((0, 1) if w else (0,))] + [(1, False, None, 0)]:
                fs, window, sinks = A._normalise_mask(tk, fs, causal, window, sinks)
                rows, keys = A._one_key_rows(tq, tk, fs, causal, window, sinks, "cpu")
                vis = df_attention_mask(tq, tk, frame_size=fs, causal=causal, window_frames=window,
                                        sink_frames=sinks)
                want = (vis.sum(-1) == 1).nonzero().flatten()
                assert torch.equal(rows, want), (tq, tk, fs, causal, window, sinks)
                assert torch.equal(keys, vis[want].int().argmax(-1))


# ---------------------------------------------------------------------------- eager path


def _spy(monkeypatch, name):
    """The argument tuples of every call of ``A.<name>``, which still runs."""
    calls = []
    real = getattr(A, name)

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(A, name, spy)
    return calls


@pytest.fixture
def spy_eager(monkeypatch):
    """Counts calls of the torch forward made by the eager path (the custom op reaches the
    same function through the backend registry, which this does not patch)."""
    return _spy(monkeypatch, "_eager_forward")


EAGER_CASES = {
    "frames-gqa": (2, 4, 2, 9, 20, 8, dict(frame_size=3), False),
    "window-sink": (1, 2, 2, 24, 24, 8, dict(frame_size=4, window_frames=2, sink_frames=1), False),
    "padding": (2, 2, 1, 6, 10, 8, dict(frame_size=2), True),
    "bidirectional": (1, 2, 2, 5, 7, 8, dict(causal=False), False),
}


def _through(fn, q, k, v, with_lse, kpm, mask, grad_seed):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    res = fn(q, k, v, kpm, mask)
    out, lse = res if with_lse else (res, None)
    g = _rand(*out.shape, seed=grad_seed, dtype=out.dtype)
    loss = (out * g).sum() + (lse.nan_to_num(0.0, 0.0, 0.0).sum() if with_lse else 0)
    loss.backward()
    return out.detach(), lse, q.grad, k.grad, v.grad


def _public(q, k, v, kpm, mask, with_lse):
    return A.df_attention(q, k, v, key_padding_mask=kpm, return_lse=with_lse, **mask)


def _custom_op(q, k, v, kpm, mask, with_lse):
    fs, window, sinks, scale = A._check(q, k, v, mask.get("frame_size", 1), mask.get("causal", True),
                                        mask.get("window_frames"), mask.get("sink_frames", 0), None, with_lse)
    out, lse = torch.ops.fastdf.df_attention(q, k, v, kpm, fs, mask.get("causal", True), window, sinks, scale)
    return (out, lse) if with_lse else out


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "lse"])
@pytest.mark.parametrize("name", list(EAGER_CASES))
def test_eager_path_is_bitwise_the_custom_op(spy_eager, name, with_lse):
    """On CPU tensors df_attention skips the custom op (the spy sees the call) and gives
    bitwise the op's out, lse, layout and gradients, NaN causality included."""
    B, Hq, Hkv, Tq, Tk, D, mask, padded = EAGER_CASES[name]
    q, k, v = _inputs(B, Hq, Hkv, Tq, Tk, D, seed=3)
    v[:, :, -1, 0] = float("nan")  # only the last key's viewers (and its dv) may see it
    kpm = torch.arange(Tk)[None, :] >= torch.tensor([[0], [3]])[:B] if padded else None
    results = []
    for fn in (_public, _custom_op):
        spy_eager.clear()
        results.append(_through(lambda *a: fn(*a, with_lse), q, k, v, with_lse, kpm, mask, grad_seed=7))
        assert len(spy_eager) == (1 if fn is _public else 0)
    for got, want in zip(*results):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype and got.stride() == want.stride()
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    nan = results[0][0].isnan()
    assert nan.any() and (nan.all() if mask.get("causal") is False else not nan.all())


def test_eager_path_without_grad_and_for_padded(spy_eager):
    """No autograd node without grad; df_attention_padded takes the same path."""
    q, k, v = _inputs(1, 2, 2, 6, 9, 8, seed=5)
    with torch.no_grad():
        out = A.df_attention(q.requires_grad_(), k, v, frame_size=2)
    assert out.grad_fn is None and len(spy_eager) == 1
    key_start = torch.tensor([2])
    got = A.df_attention_padded(q, k, v, key_start, frame_size=2, return_lse=True)
    want = torch.ops.fastdf.df_attention(q, k, v, torch.arange(9)[None] >= 2, 2, True, None, 0, 8 ** -0.5)
    assert len(spy_eager) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_other_backends_and_tracing_keep_the_custom_op(spy_eager):
    """A named non-torch backend, make_fx and FakeTensorMode go through the custom op."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _inputs(1, 2, 2, 4, 6, 8, seed=9)
    with fastdf.backend("cuda"), pytest.raises(fastdf.BackendUnavailableError):
        A.df_attention(q, k, v)
    gm = make_fx(lambda q, k, v: A.df_attention(q, k, v, frame_size=2))(q, k, v)
    assert torch.ops.fastdf.df_attention.default in [n.target for n in gm.graph.nodes]
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out = A.df_attention(fq, fk, fv, frame_size=2)
    assert out.shape == q.shape
    assert not spy_eager


def test_compile_fullgraph_keeps_the_custom_op(spy_eager):
    """Under torch.compile(fullgraph=True) the graph holds the one opaque op node (the
    eager forward never runs) and gives the eager path's values; the backward is the op's."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    q, k, v = _inputs(1, 2, 1, 5, 8, 8, seed=11)
    fn = torch.compile(lambda q, k, v: A.df_attention(q, k, v, frame_size=2, return_lse=True), fullgraph=True,
                       backend=backend)
    qc, kc, vc = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(qc, kc, vc)
    (out.sum() + lse.sum()).backward()
    assert not spy_eager
    targets = [str(n.target) for g in graphs for n in g.graph.nodes]
    assert any("fastdf.df_attention" in t for t in targets), targets
    eager = _through(lambda q, k, v, kpm, mask: A.df_attention(q, k, v, return_lse=True, frame_size=2), q, k, v,
                     True, None, {}, grad_seed=0)
    torch.testing.assert_close(out, eager[0], rtol=0, atol=0)
    torch.testing.assert_close(lse, eager[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------- checked by the result


def _count_careful(monkeypatch):
    """Counts runs of the careful paths (the norm-checked forward and backward)."""
    return _spy(monkeypatch, "_fast_path_data")


@pytest.mark.parametrize("mask", [{}, dict(frame_size=3), dict(frame_size=8), dict(frame_size=4, window_frames=2,
                                                                                   sink_frames=1)],
                         ids=["token", "grouped", "frames", "window-sink"])
def test_clean_data_skips_the_input_checks(monkeypatch, small_blocks, mask):
    """Finite data of moderate size: the kernel runs once on the data as it is, forward and
    backward, and no norm of q, k or v is taken (the result is checked instead)."""
    careful = _count_careful(monkeypatch)
    q, k, v = _inputs(1, 4, 2, 24, 32, 8, seed=20)
    g = _rand(1, 4, 24, 8, seed=21)
    got = _fwd_bwd(q, k, v, g, **mask)
    assert not careful
    want = _grads_reference(q, k, v, g, None, mask)
    for a, b in zip(got, want[:1] + want[2:]):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)


def test_poison_behind_the_causal_square_takes_the_careful_path(monkeypatch):
    """Token-causal is one causal kernel call whose key block holds keys a row cannot see:
    a NaN value or key there reaches earlier rows through 0 * NaN (the check sees it), and
    the careful path keeps every earlier row, and its gradients, bitwise clean; a NaN
    upstream gradient likewise."""
    careful = _count_careful(monkeypatch)
    q, k, v = _inputs(1, 2, 2, 40, 40, 16, seed=22)
    g = _rand(1, 2, 40, 16, seed=23)
    g[:, :, -1] = 0  # the loss reads the clean rows only
    clean = _fwd_bwd(q, k, v, g)
    assert not careful
    for poison in ("v", "k"):
        k2, v2 = k.clone(), v.clone()
        (v2 if poison == "v" else k2)[:, :, -1, 3] = float("nan")
        dirty = _fwd_bwd(q, k2, v2, g)
        assert careful, poison
        careful.clear()
        assert torch.equal(dirty[0][:, :, :-1], clean[0][:, :, :-1]) and torch.isnan(dirty[0][:, :, -1]).all()
        assert torch.equal(dirty[1][:, :, :-1], clean[1][:, :, :-1])  # dq of the clean rows
    g2 = g.clone()
    g2[:, :, -1] = float("nan")  # only the last key is seen by the last row alone
    dirty = _fwd_bwd(q, k, v, g2)
    assert torch.equal(dirty[1][:, :, :-1], clean[1][:, :, :-1])
    for a, b in zip(dirty[2:], clean[2:]):
        assert torch.isnan(a).any() and torch.equal(a[:, :, -1:].isnan(), torch.ones_like(a[:, :, -1:], dtype=torch.bool))


def test_raw_products_beyond_float32_take_the_reference():
    """A tiny scale with raw q . k beyond float32 (the kernel scales after the product, so a
    key's raw -4e38 becomes -inf and drops out) while the scaled scores are moderate: the
    lse floor rejects the kernel's result and the reference's values come back."""
    q = torch.full((1, 1, 2, 2), 1e19)
    k = torch.tensor([-1.6e19, -1.75e19])[None, None, :, None].expand(1, 1, 2, 2).contiguous()
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]
    scale = 1e-37
    assert torch.isinf((q[0, 0, 1] * k[0, 0, 1]).sum())  # the raw product overflows
    with fastdf.backend("torch"):
        out, lse = fastdf.df_attention(q, k, v, scale=scale, return_lse=True)
    want = df_attention_reference(q.double(), k.double(), v.double(), scale=scale)
    assert abs(float(want[0][0, 0, 1, 1]) - 0.05) < 0.01  # the overflowing key keeps ~5%
    torch.testing.assert_close(out.double(), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), want[1], rtol=1e-5, atol=1e-5)


def test_accepted_rejects_what_the_kernel_cannot_promise():
    out, lse = torch.ones(1, 1, 3, 2), torch.full((1, 1, 3), -2.0)
    assert A._accepted(out, lse, 0.5) == 2.0
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert A._accepted(out.index_fill(2, torch.tensor([1]), bad), lse, 0.5) is None
        assert A._accepted(out, lse.index_fill(2, torch.tensor([1]), bad), 0.5) is None
    assert A._accepted(out, lse, 1e-37) is None  # |lse| 2 is within 100 of max * scale = 34


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 3, 5, 4), (2, 1, 5, 4), (2, 3, 1, 4), (1, 1, 1, 1), (2, 3, 5),
                                   (1, 3, 5), (2, 1, 5), (1, 1, 1)])
def test_dense_span_by_strides_is_the_layout_rule(shape):
    """_dense_span's stride test (the [B, T, H, ...] layout, size-1 dims free) against its
    definition, on both one-span layouts and on views that leave gaps or overlap."""
    def rule(t):
        return t.is_contiguous() or t.transpose(1, 2).is_contiguous()

    base = torch.zeros(shape)
    swapped = (shape[0], shape[2], shape[1]) + tuple(shape[3:])
    views = [base, torch.zeros(swapped).transpose(1, 2), base.transpose(1, 2),
             torch.zeros(shape[:-1] + (shape[-1] + 1,))[..., :shape[-1]],  # a gap after each row
             torch.zeros(swapped[:-1] + (swapped[-1] + 1,))[..., :swapped[-1]].transpose(1, 2),
             torch.zeros(shape[1:]).expand(shape)]  # B rows overlapping
    if len(shape) == 4:
        views.append(torch.zeros(shape[0], shape[3], shape[1], shape[2]).permute(0, 2, 3, 1))
    # the [B, T, H, ...] strides with one of them wrong (0: overlapping; one more: gaps)
    right = list(torch.zeros(swapped).transpose(1, 2).stride())
    spare = torch.zeros(4 * base.numel() + 8)
    for i in range(len(shape)):
        for wrong in (0, right[i] + 1):
            if shape[i] > 1:
                strides = list(right)
                strides[i] = wrong
                views.append(spare.as_strided(shape, strides))
    for t in views:
        assert A._dense_span(t) == rule(t), (tuple(t.shape), t.stride())
    assert any(A._dense_span(t) for t in views) and (max(shape) == 1 or not all(A._dense_span(t) for t in views))


def test_small_problems_run_as_one_masked_piece(monkeypatch):
    """Where the keys a plan skips cost less than its extra kernel calls (DENSE_CALL_WORK),
    one masked piece over every row runs (one call forward, one backward); a large problem
    keeps its blocks. Both match the fp64 reference."""
    calls = []
    flash = A._flash_cpu()
    monkeypatch.setattr(A, "_flash_cpu", lambda: lambda *a, **kw: calls.append(kw["attn_mask"]) or flash(*a, **kw))
    mask = dict(frame_size=32)
    assert A._plan(256, 256, 32, True, None, 0, work=2 * 2 * 64) == ((0, 256, ((0, 256, "mask"),)),)
    assert len(A._plan(2000, 2000, 400, True, None, 0, work=4 * 32)) == 5  # the SkyReels case keeps its blocks
    assert len(A._plan(256, 256, 32, True, None, 0)) == 8  # no work given: never dense
    q, k, v = _inputs(2, 2, 2, 64, 64, 16, seed=30)
    g = _rand(2, 2, 64, 16, seed=31)
    got = _fwd_bwd(q, k, v, g, frame_size=8)
    assert len(calls) == 1 and calls[0].shape == (64, 64)
    want = _grads_reference(q, k, v, g, None, dict(frame_size=8))
    for a, b in zip(got, want[:1] + want[2:]):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)


def test_remembered_checks_still_refuse_bad_arguments():
    """_check's memo is keyed on types as well as values: after a valid call, True for 1,
    a float for an int, a wrong dtype or shape still raise, and a valid call still works."""
    q, k, v = _inputs(1, 2, 2, 6, 6, 8, seed=40)
    A.df_attention(q, k, v, frame_size=1, sink_frames=0)
    with pytest.raises(TypeError, match="frame_size"):
        A.df_attention(q, k, v, frame_size=True)
    with pytest.raises((TypeError, ValueError), match="frame_size"):
        A.df_attention(q, k, v, frame_size=1.0)
    with pytest.raises(TypeError, match="causal"):
        A.df_attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="q"):
        A.df_attention(q.double(), k, v)
    with pytest.raises(ValueError, match="v"):
        A.df_attention(q, k, v[..., :4])
    with pytest.raises(TypeError, match="q"):
        A.df_attention(q.tolist(), k, v)
    assert A.df_attention(q, k, v, frame_size=1).shape == q.shape


def test_eager_path_first_order_under_create_graph_and_no_double_backward():
    """The eager backward skips once_differentiable's wrapper unless a graph is being built:
    with create_graph=True the first-order gradients are the same numbers, and
    differentiating them again raises (the custom op has no double backward either)."""
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 2, 8, 8, 4, seed=50))
    plain = torch.autograd.grad((A.df_attention(q, k, v, frame_size=2) ** 2).sum(), (q, k, v))
    graph = torch.autograd.grad((A.df_attention(q, k, v, frame_size=2) ** 2).sum(), (q, k, v), create_graph=True)
    for a, b in zip(plain, graph):
        assert torch.equal(a, b.detach())
    with pytest.raises(RuntimeError, match="once_differentiable"):
        graph[0].sum().backward()


# ---------------------------------------------------------------------------- dense rows

# (B, Hq, Hkv, Tq, Tk, D, mask): every row sees every key, at least CPU_KERNEL_DENSE_KEYS
DENSE_CASES = {
    "kv-chunk-window-sink": (1, 2, 2, 40, 160, 16, dict(frame_size=40, window_frames=3, sink_frames=1)),
    "gqa-one-frame": (2, 4, 2, 24, 130, 8, dict(frame_size=200)),
    "bidirectional": (1, 2, 2, 128, 128, 8, dict(causal=False)),
}


def _dense(name, dtype=F32, seed=30):
    B, Hq, Hkv, Tq, Tk, D, mask = DENSE_CASES[name]
    assert Tk >= A.CPU_KERNEL_DENSE_KEYS
    return (*_inputs(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, seed=seed), mask)


def _same(got, want):
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.stride() == b.stride()
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _aten_node(out):
    """Whether aten's flash backward node is in out's graph (behind a layout copy or not)."""
    fns = [out.grad_fn]
    while fns:
        fn = fns.pop()
        if type(fn).__name__.startswith("ScaledDotProductFlashAttentionForCpuBackward"):
            return True
        fns += [f for f, _ in fn.next_functions if f is not None] if fn is not None else []
    return False


@pytest.mark.parametrize("layout", ["bthd", "bhtd"], ids=["BTHD-storage", "BHTD-contiguous"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_dense_rows_run_aten_as_a_differentiable_op(spy_eager, name, dtype, layout):
    """Every row sees every key and no lse is asked for: the eager path calls aten's flash
    kernel as a differentiable op (aten's autograd node records the backward; the eager
    forward never runs), bitwise the custom op's out, layout ([B, T, H, D] memory, whatever
    q's layout: aten's follows q's) and gradients, and within the 2x rule of the fp64
    reference."""
    q, k, v, mask = _dense(name, dtype)
    if layout == "bhtd":
        q, k, v = (t.contiguous() for t in (q, k, v))
    out = A.df_attention(*(t.detach().requires_grad_() for t in (q, k, v)), **mask)
    assert _aten_node(out)
    assert out.transpose(1, 2).is_contiguous()
    public = _through(lambda *a: _public(*a, False), q, k, v, False, None, mask, grad_seed=7)
    assert not spy_eager
    _same(public, _through(lambda *a: _custom_op(*a, False), q, k, v, False, None, mask, grad_seed=7))
    with torch.no_grad():
        assert torch.equal(A.df_attention(q, k, v, **mask), public[0])
    assert not spy_eager
    strided = A.df_attention(*(t.detach().repeat_interleave(2, -1)[..., ::2].requires_grad_() for t in (q, k, v)),
                             **mask)  # rows that are not contiguous: the general path
    assert type(strided.grad_fn).__name__ == "_AttentionEagerBackward" and len(spy_eager) == 1
    g = _rand(*q.shape, seed=7, dtype=dtype)
    want = _grads_reference(q, k, v, g, None, mask)
    tol = 2e-5 if dtype == F32 else 1e-12
    for got, ref in zip((public[0], *public[2:]), (want[0], *want[2:])):
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_dense_rows_scan_aten_s_result_only_where_it_is_one_span(monkeypatch):
    """The dense route's result check reads out and lse as raw spans only in aten's layouts;
    an lse of any other layout (here every other element of a NaN buffer) goes through the
    strided check: the same values are accepted (aten called once), not rejected for the
    NaN between them (the raw scan of lse.numel() elements would have read those)."""
    q, k, v, mask = _dense("bidirectional")
    flash, calls = A._flash_cpu(), []

    def spread(q, k, v, **kw):
        calls.append(1)
        out, lse = flash(q, k, v, **kw)
        wide = torch.full(lse.shape + (2,), float("nan"))
        wide[..., 0] = lse
        return out, wide[..., 0]

    monkeypatch.setattr(A, "_flash_cpu", lambda: spread)
    out = A.df_attention(q, k, v, **mask)
    assert len(calls) == 1
    torch.testing.assert_close(out, flash(q, k, v, scale=q.shape[-1] ** -0.5)[0], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["clean", "nan-value", "nan-query-row", "large-scores", "with-lse", "padding-mask"])
def test_dense_rows_elsewhere_agree_with_the_custom_op(spy_eager, case):
    """What the dense route does not take (a result its check rejects, |lse| beyond the
    backward's range, lse asked for, a padding mask) runs the general eager path, bitwise
    the custom op's values, NaN and inf where they are."""
    q, k, v, mask = _dense("kv-chunk-window-sink")
    with_lse, kpm, g_seed, taken = False, None, 7, True
    if case == "nan-value":
        v = v.clone()
        v[:, :, 150, 3] = float("nan")
        taken = False
    elif case == "nan-query-row":
        q = q.clone()
        q[:, :, 5] = float("nan")
        taken = False
    elif case == "large-scores":  # |lse| > FLASH_BACKWARD_MAX_LSE: a stable recompute in the backward
        q = q * 40
        taken = False
    elif case == "with-lse":
        with_lse, taken = True, False
    elif case == "padding-mask":
        kpm, taken = torch.ones(1, q.shape[2] * 4, dtype=torch.bool), False
    got = _through(lambda *a: _public(*a, with_lse), q, k, v, with_lse, kpm, mask, grad_seed=g_seed)
    assert len(spy_eager) == (0 if taken else 1)
    want = _through(lambda *a: _custom_op(*a, with_lse), q, k, v, with_lse, kpm, mask, grad_seed=g_seed)
    _same(got, want)
    if case == "large-scores":  # without a backward to come aten's result is taken
        spy_eager.clear()
        with torch.no_grad():
            assert torch.equal(A.df_attention(q, k, v, **mask), want[0])
        assert not spy_eager


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_dense_rows_non_finite_upstream_gradient(bad):
    """A row's inf / NaN upstream gradient reaches aten's backward as it is (every row sees
    every key: nothing can cross a mask), on the eager path's node and through the custom
    op alike: the other rows' dq are bitwise the clean run's, and the gradients are
    non-finite exactly where plain autograd through the fp64 softmax makes them so."""
    q, k, v, mask = _dense("kv-chunk-window-sink")
    g = _rand(*q.shape, seed=9)
    clean = _fwd_bwd(q, k, v, g, **mask)
    g[:, :, 7, 1] = bad
    dirty = _fwd_bwd(q, k, v, g, **mask)
    rows = torch.arange(q.shape[2]) != 7
    assert torch.equal(dirty[1][:, :, rows], clean[1][:, :, rows])
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    _same(dirty[1:], torch.autograd.grad((_custom_op(*inputs, None, mask, False) * g).sum(), inputs))
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    scores = inputs[0] @ inputs[1].transpose(-1, -2) * q.shape[-1] ** -0.5
    plain = torch.autograd.grad(((scores.softmax(-1) @ inputs[2]) * g.double()).sum(), inputs)
    for got, want in zip(dirty[1:], plain):
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))


def test_dense_rows_have_no_double_backward():
    """aten's node, like the custom op, has no double backward: differentiating the
    gradients raises; their first-order values are the plain backward's."""
    q, k, v, mask = _dense("bidirectional")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    plain = torch.autograd.grad((A.df_attention(q, k, v, **mask) ** 2).sum(), (q, k, v))
    graph = torch.autograd.grad((A.df_attention(q, k, v, **mask) ** 2).sum(), (q, k, v), create_graph=True)
    for a, b in zip(plain, graph):
        assert torch.equal(a, b.detach())
    with pytest.raises(RuntimeError, match="not implemented"):
        graph[0].sum().backward()


@pytest.mark.parametrize("D", [32, 8], ids=["kernel-D32", "blocked-D8"])
@pytest.mark.parametrize("spread", [1.0, 2.5, 4.5])
def test_dense_rows_of_peaky_attention_meet_the_rule(D, spread):
    """Every row sees all 128 keys, scores of std spread^2 (max |lse| ~6 / ~28 / ~88): the
    gradients meet the 2x rule against fp64. aten's backward (exp(s - lse)) left it from
    max |lse| ~17 on, so beyond FLASH_BACKWARD_MAX_LSE (16) such rows run fastdf._cpu's
    kernel (fp32, D % 16 == 0; it recomputes their max and sum) or the blocked recompute."""
    g = torch.Generator().manual_seed(int(spread * 10) + D)
    q, k = ((torch.randn(1, 128, 2, D, generator=g) * spread).transpose(1, 2) for _ in range(2))
    v = torch.randn(1, 128, 2, D, generator=g).transpose(1, 2)
    grad = torch.randn(1, 2, 128, D, generator=g)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = A.df_attention(*leaves, causal=False, return_lse=True)
    got = torch.autograd.grad(out, leaves, grad)
    assert (float(lse.detach().abs().max()) > A.FLASH_BACKWARD_MAX_LSE) == (spread > 1.0)

    def grads(q, k, v):
        ls = [t.requires_grad_() for t in (q, k, v)]
        o = df_attention_reference(*ls, causal=False)[0]
        return torch.autograd.grad((o * grad.to(o.dtype)).sum(), ls)

    assert_matches_reference(got, grads, q, k, v)
    # the public call without lse (the dense route's own decision) gives the same
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    assert_matches_reference(torch.autograd.grad(A.df_attention(*leaves, causal=False), leaves, grad), grads, q, k, v)

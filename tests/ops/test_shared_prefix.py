"""shared_prefix_attention against attention over each sample's concatenated prefix + suffix
keys, with ragged lengths, GQA, split-K and multi-tile M, every backend."""

import pytest
import torch

import fastdf
from fastdf.ops import cascade as cascade_ops
from fastdf.ops.cascade import shared_prefix_attention_reference
from fastdf.testing import assert_matches_reference, poisoned

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def concatenated_attention(q, k_prefix, v_prefix, k_suffix, v_suffix, prefix_lens, suffix_lens, scale):
    """Independent reference: per sample, ordinary attention over cat(prefix[:L], suffix[:S])."""
    G, N, Hq, D = q.shape
    Hkv = k_prefix.shape[1]
    gs = Hq // Hkv
    out = torch.zeros_like(q)
    lse = torch.full((G, N, Hq), float("-inf"), dtype=q.dtype if q.dtype == torch.float64 else torch.float32)
    for g in range(G):
        for n in range(N):
            L, S = int(prefix_lens[g]), int(suffix_lens[g, n])
            k = torch.cat([k_prefix[g, :, :L], k_suffix[g, n, :, :S]], 1).repeat_interleave(gs, 0)  # [Hq, L+S, D]
            v = torch.cat([v_prefix[g, :, :L], v_suffix[g, n, :, :S]], 1).repeat_interleave(gs, 0)
            if L + S == 0:
                continue
            s = torch.einsum("hd,hkd->hk", q[g, n].to(k.dtype), k) * scale
            out[g, n] = torch.einsum("hk,hkd->hd", torch.softmax(s, -1), v).to(q.dtype)
            lse[g, n] = torch.logsumexp(s, -1).to(lse.dtype)
    return out, lse


def _inputs(G, N, Hq, Hkv, D, P, S, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    return mk(G, N, Hq, D), mk(G, Hkv, P, D), mk(G, Hkv, P, D), mk(G, N, Hkv, S, D), mk(G, N, Hkv, S, D)


def _lens(G, N, P, S, device, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    pl = torch.randint(0, P + 1, (G,), generator=g)
    sl = torch.randint(0, S + 1, (G, N), generator=g)
    pl[0] = P
    sl[0, 0] = S
    return pl.to(device), sl.to(device)


@pytest.mark.op("shared_prefix_attention")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "G,N,Hq,Hkv,D,P,S",
    [(2, 3, 4, 2, 24, 37, 9), (1, 5, 6, 2, 40, 70, 3), (3, 2, 4, 1, 16, 19, 17), (2, 2, 3, 3, 32, 5, 20)],
)
def test_matches_concatenated_attention(backend, device, dtype, G, N, Hq, Hkv, D, P, S):
    args = _inputs(G, N, Hq, Hkv, D, P, S, dtype, device)
    pl, sl = _lens(G, N, P, S, device)
    with poisoned():
        out = fastdf.shared_prefix_attention(*args, prefix_lens=pl, suffix_lens=sl, return_lse=True)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    assert_matches_reference(out, concatenated_attention, *args, pl, sl, D ** -0.5)


@pytest.mark.op("shared_prefix_attention")
def test_reference_matches_concatenated_attention(backend, device):
    """The op's own reference (the prefix as one matrix product) against the plain loop."""
    args = _inputs(2, 4, 8, 2, 16, 23, 6, torch.float64, "cpu", seed=1)
    pl, sl = _lens(2, 4, 23, 6, "cpu", seed=1)
    got = shared_prefix_attention_reference(*args, pl, sl, 0.3)
    want = concatenated_attention(*args, pl, sl, 0.3)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.op("shared_prefix_attention")
def test_split_k_and_multiple_query_tiles(backend, device):
    """N x Hq/Hkv = 160 rows (two 128-row tiles) and the prefix cut into 3 key splits."""
    args = _inputs(1, 40, 8, 2, 16, 150, 4, torch.float32, device, seed=2)
    pl, sl = _lens(1, 40, 150, 4, device, seed=2)
    old = cascade_ops.TRITON_PREFIX_SPLITS[0]
    cascade_ops.TRITON_PREFIX_SPLITS[0] = 3
    try:
        out = fastdf.shared_prefix_attention(*args, prefix_lens=pl, suffix_lens=sl, scale=0.2, return_lse=True)
    finally:
        cascade_ops.TRITON_PREFIX_SPLITS[0] = old
    assert_matches_reference(out, concatenated_attention, *args, pl, sl, 0.2)


@pytest.mark.op("shared_prefix_attention")
def test_strided_views(backend, device):
    """q from a [G, N, D, Hq] buffer, prefix from [G, P, Hkv, D], suffix a slice of a larger
    preallocated cache (the sampler's layout)."""
    G, N, Hq, Hkv, D, P, S = 2, 3, 4, 2, 16, 21, 5
    g = torch.Generator().manual_seed(3)
    q = torch.randn(G, N, D, Hq, generator=g).to(device).transpose(2, 3)
    kp = torch.randn(G, P, Hkv, D, generator=g).to(device).transpose(1, 2)
    vp = torch.randn(G, Hkv, P, 2 * D, generator=g).to(device)[..., ::2]
    cache_k = torch.randn(G, N, Hkv, 16, D, generator=g).to(device)
    cache_v = torch.randn(G, N, Hkv, 16, D, generator=g).to(device)
    ks, vs = cache_k[:, :, :, :S], cache_v[:, :, :, :S]
    pl, sl = _lens(G, N, P, S, device, seed=3)
    assert not (q.is_contiguous() or kp.is_contiguous() or vp.is_contiguous() or ks.is_contiguous())
    with poisoned():
        out = fastdf.shared_prefix_attention(q, kp, vp, ks, vs, prefix_lens=pl, suffix_lens=sl)
    assert_matches_reference(out, lambda *a: concatenated_attention(*a)[0], q, kp, vp, ks, vs, pl, sl, D ** -0.5)


@pytest.mark.op("shared_prefix_attention")
def test_no_visible_key_gives_zeros_and_default_lengths(backend, device):
    args = _inputs(2, 2, 2, 1, 16, 8, 4, torch.float32, device, seed=4)
    pl = torch.tensor([0, 8], device=device)
    sl = torch.tensor([[0, 2], [0, 0]], device=device)
    o, lse = fastdf.shared_prefix_attention(*args, prefix_lens=pl, suffix_lens=sl, return_lse=True)
    assert torch.equal(o[0, 0], torch.zeros_like(o[0, 0])) and torch.isneginf(lse[0, 0]).all()
    assert torch.isfinite(lse[0, 1]).all() and torch.isfinite(lse[1]).all()
    full = fastdf.shared_prefix_attention(*args)  # lengths default to all of P and S
    want, _ = concatenated_attention(*args, torch.tensor([8, 8]), torch.full((2, 2), 4), 16 ** -0.5)
    torch.testing.assert_close(full, want, atol=1e-5, rtol=1e-5)


@pytest.mark.op("shared_prefix_attention")
@pytest.mark.parametrize("D", [128, 256])
def test_large_head_dims(backend, device, D):
    args = _inputs(1, 2, 2, 1, D, 20, 3, torch.float16, device, seed=5)
    pl, sl = _lens(1, 2, 20, 3, device, seed=5)
    out = fastdf.shared_prefix_attention(*args, prefix_lens=pl, suffix_lens=sl)
    assert_matches_reference(out, lambda *a: concatenated_attention(*a)[0], *args, pl, sl, D ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,P,S", [(128, 2048, 64), (16, 8192, 300), (64, 512, 1)])
def test_decode_shapes_on_gpu(dtype, N, P, S):
    """Benchmark-sized decode steps (Hq=32, Hkv=8, D=128) on the triton backend."""
    args = _inputs(2, N, 32, 8, 128, P, S, dtype, "cuda", seed=6)
    pl = torch.tensor([P, P - 77], device="cuda")
    sl = torch.randint(0, S + 1, (2, N), device="cuda")
    with fastdf.backend("triton"), poisoned():
        out = fastdf.shared_prefix_attention(*args, prefix_lens=pl, suffix_lens=sl, return_lse=True)
    ref = lambda *a: shared_prefix_attention_reference(*a)  # noqa: E731
    assert_matches_reference(out, ref, *args, pl, sl, 128 ** -0.5)


def test_gradients_are_refused_clearly():
    args = [t.requires_grad_() for t in _inputs(1, 2, 2, 1, 16, 4, 2, torch.float32, "cpu")]
    with pytest.raises(NotImplementedError, match="decode-only"):
        fastdf.shared_prefix_attention(*args)
    with torch.no_grad():
        fastdf.shared_prefix_attention(*args)


def test_opcheck():
    args = _inputs(2, 2, 4, 2, 16, 6, 3, torch.float32, "cpu")
    pl, sl = _lens(2, 2, 6, 3, "cpu")
    torch.library.opcheck(torch.ops.fastdf.shared_prefix_attention, (*args, pl, sl, 0.25))


def test_compiles_fullgraph():
    args = _inputs(1, 3, 4, 2, 16, 6, 3, torch.float32, "cpu")
    pl, sl = _lens(1, 3, 6, 3, "cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, *rest):
        return fastdf.shared_prefix_attention(q * 2, *rest, prefix_lens=pl, suffix_lens=sl) + 1

    want = concatenated_attention(args[0] * 2, *args[1:], pl, sl, 0.25)[0] + 1
    torch.testing.assert_close(f(*args), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda a, k: ((a[0].numpy(), *a[1:]), k), TypeError, "q must be a torch.Tensor"),
        (lambda a, k: ((a[0][0], *a[1:]), k), ValueError, "q must have 4 dims"),
        (lambda a, k: ((a[0], a[1].half(), *a[2:]), k), ValueError, "k_prefix has dtype float16 but q has float32"),
        (lambda a, k: ((a[0], a[1][:, :, :3], *a[2:]), k), ValueError, "v_prefix must have shape"),
        (lambda a, k: ((a[0], a[1], a[2], a[3][:1], a[4]), k), ValueError, "k_suffix must have shape"),
        (lambda a, k: ((a[0], a[1], a[2], a[3], a[4][..., :2, :]), k), ValueError, "v_suffix must have shape"),
        (lambda a, k: ((a[0][:, :, :3], a[1], a[2], a[3], a[4]), k), ValueError, r"q's heads \(3\) must be a multiple"),
        (lambda a, k: (a, {**k, "prefix_lens": torch.tensor([1])}), ValueError, r"prefix_lens must have shape \(2,\)"),
        (lambda a, k: (a, {**k, "suffix_lens": torch.ones(2, 3, dtype=torch.int32)}), ValueError,
         r"suffix_lens must have shape \(2, 2\)"),
        (lambda a, k: (a, {**k, "suffix_lens": torch.ones(2, 2)}), ValueError, "suffix_lens must be one of int32"),
        (lambda a, k: (a, {**k, "scale": -1.0}), ValueError, "scale must be > 0"),
        (lambda a, k: ((a[0], a[1], a[2].to("meta"), a[3], a[4]), k), ValueError, "v_prefix is on meta"),
    ],
)
def test_bad_input(mutate, error, match):
    args = _inputs(2, 2, 4, 2, 16, 6, 3, torch.float32, "cpu")
    args, kwargs = mutate(args, {})
    with pytest.raises(error, match=match):
        fastdf.shared_prefix_attention(*args, **kwargs)

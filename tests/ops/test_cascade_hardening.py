"""merge_attention_states and shared_prefix_attention under hostile input (issue 9):
infinite and empty states, scores near -3e30, values near float32's max, lengths beyond
int32 or passed as views, bad knobs. Torch and triton backends."""

import pytest
import torch

import fastdf
from fastdf.ops.cascade import merge_attention_states_reference, shared_prefix_attention_reference
from fastdf.testing import assert_matches_reference, poisoned

INF, NAN = float("inf"), float("nan")


@pytest.fixture(params=["torch", "triton"])
def be(request):
    from fastdf.ops import unavailable_reason

    reason = unavailable_reason(request.param, "cpu")
    if reason:
        pytest.skip(reason)
    with fastdf.backend(request.param):
        yield request.param


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- merge


def test_merge_infinite_and_empty_states(be):
    """Empty states (lse -inf) contribute nothing even when their o is NaN (SDPA's empty
    row); a +inf state takes all the weight (half each if both are +inf); NaN lse stays NaN."""
    o_a, o_b = _rand(7, 8, seed=1), _rand(7, 8, seed=2)
    lse_a = torch.tensor([-INF, 0.5, INF, INF, -INF, 1.0, NAN])
    lse_b = torch.tensor([0.3, -INF, 2.0, INF, -INF, INF, 0.0])
    o_a[0] = NAN  # empty, NaN: dropped
    o_b[1] = NAN
    o_a[4] = NAN
    o_b[4] = NAN  # both empty: zeros
    o, lse = fastdf.merge_attention_states(o_a, lse_a, o_b, lse_b)
    assert torch.equal(o[0], o_b[0]) and lse[0] == 0.3
    assert torch.equal(o[1], o_a[1]) and lse[1] == 0.5
    assert torch.equal(o[2], o_a[2]) and lse[2] == INF
    torch.testing.assert_close(o[3], (o_a[3] + o_b[3]) / 2) and lse[3] == INF
    assert torch.equal(o[4], torch.zeros(8)) and lse[4] == -INF
    assert torch.equal(o[5], o_b[5]) and lse[5] == INF
    assert torch.isnan(o[6]).all() and torch.isnan(lse[6])
    ref = merge_attention_states_reference(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(o, ref[0], equal_nan=True)
    torch.testing.assert_close(lse, ref[1], equal_nan=True)


def test_merge_gradients_of_empty_nan_state_are_finite(be):
    o_a, o_b = _rand(4, 8, seed=3).requires_grad_(), _rand(4, 8, seed=4)
    o_b[0] = NAN
    o_b.requires_grad_()
    lse_a = torch.tensor([0.2, -1.0, 3.0, 0.0], requires_grad=True)
    lse_b = torch.tensor([-INF, 0.5, -INF, 1.0], requires_grad=True)
    o, lse = fastdf.merge_attention_states(o_a, lse_a, o_b, lse_b)
    grads = torch.autograd.grad((o * _rand(4, 8, seed=5)).sum() + lse.sum(), (o_a, lse_a, o_b, lse_b))
    for g in grads:
        assert torch.isfinite(g).all()
    assert grads[3][0] == 0 and torch.equal(grads[2][0], torch.zeros(8))


# ---------------------------------------------------------------------------- shared prefix


def _decode(G=2, N=3, Hq=4, Hkv=2, P=20, S=7, D=16, seed=10):
    q = _rand(G, N, Hq, D, seed=seed)
    return (q, _rand(G, Hkv, P, D, seed=seed + 1), _rand(G, Hkv, P, D, seed=seed + 2),
            _rand(G, N, Hkv, S, D, seed=seed + 3), _rand(G, N, Hkv, S, D, seed=seed + 4))


LENS = (torch.tensor([20, 5]), torch.tensor([[7, 0, 3], [1, 2, 7]]))


def _ref(q, kp, vp, ks, vs, pl, sl, scale=None):
    return shared_prefix_attention_reference(q, kp, vp, ks, vs, pl, sl, q.shape[-1] ** -0.5 if scale is None else scale)


def test_shared_prefix_scores_near_minus_3e30(be):
    """All scores about -3e30 (ties in fp32): out is the mean of the visible values, with
    prefix and suffix weighed by their key counts (an fp32 lse would lose log(count))."""
    q, kp, vp, ks, vs = _decode()
    q = torch.ones_like(q)
    shift = -3e30 / (16 ** -0.5) / 16
    kp, ks = torch.full_like(kp, shift), torch.full_like(ks, shift)
    with poisoned():
        out = fastdf.shared_prefix_attention(q, kp, vp, ks, vs, prefix_lens=LENS[0], suffix_lens=LENS[1],
                                             return_lse=True)
    assert_matches_reference(out, _ref, q, kp, vp, ks, vs, *LENS)
    g, n = 1, 1  # 5 prefix keys + 2 suffix keys, head 0 reads KV head 0
    want = (vp[g, 0, :5].sum(0) + vs[g, n, 0, :2].sum(0)) / 7
    torch.testing.assert_close(out[0][g, n, 0], want)


def test_shared_prefix_values_near_float32_max(be):
    q, kp, vp, ks, vs = _decode(seed=20)
    vp, vs = vp.clamp(-3, 3) * 1e38, vs.clamp(-3, 3) * 1e38
    with poisoned():
        out = fastdf.shared_prefix_attention(q, kp, vp, ks, vs, prefix_lens=LENS[0], suffix_lens=LENS[1],
                                             return_lse=True)
    assert torch.isfinite(out[0]).all()
    assert_matches_reference(out, _ref, q, kp, vp, ks, vs, *LENS)


def test_shared_prefix_lengths_beyond_int32_are_clamped_and_views_work(be):
    q, kp, vp, ks, vs = _decode(seed=30)
    full = fastdf.shared_prefix_attention(q, kp, vp, ks, vs)
    huge_p = torch.tensor([2**32 + 1, 2**31])
    huge_s = torch.full((2, 3), 2**40)
    torch.testing.assert_close(fastdf.shared_prefix_attention(q, kp, vp, ks, vs, prefix_lens=huge_p,
                                                              suffix_lens=huge_s), full)
    none = fastdf.shared_prefix_attention(q, kp, vp, ks, vs, prefix_lens=torch.tensor([-1, -(2**40)]),
                                          suffix_lens=torch.zeros(2, 3, dtype=torch.long), return_lse=True)
    assert torch.equal(none[0], torch.zeros_like(none[0])) and torch.isneginf(none[1]).all()
    pl_view = torch.tensor([20, 99, 5, 99])[::2]
    sl_view = torch.tensor([[7, 1], [0, 2], [3, 7]]).t()  # [2, 3], non-contiguous
    assert not pl_view.is_contiguous() and not sl_view.is_contiguous()
    got = fastdf.shared_prefix_attention(q, kp, vp, ks, vs, prefix_lens=pl_view, suffix_lens=sl_view)
    torch.testing.assert_close(got, _ref(q, kp, vp, ks, vs, torch.tensor([20, 5]), sl_view.contiguous())[0])


def test_shared_prefix_nan_in_unused_cache_slots(be):
    q, kp, vp, ks, vs = _decode(seed=40)
    clean = fastdf.shared_prefix_attention(q, kp, vp, ks, vs, prefix_lens=LENS[0], suffix_lens=LENS[1])
    kp, vp, ks, vs = kp.clone(), vp.clone(), ks.clone(), vs.clone()
    kp[1, :, 5:] = NAN
    vp[1, :, 5:] = INF
    ks[0, 1] = NAN
    vs[0, 1] = NAN
    vs[1, 0, :, 1:] = -INF
    dirty = fastdf.shared_prefix_attention(q, kp, vp, ks, vs, prefix_lens=LENS[0], suffix_lens=LENS[1])
    assert torch.equal(dirty, clean)


@pytest.mark.parametrize("scale", [1e300, NAN, INF, 0.0, -1.0])
def test_shared_prefix_bad_scale(scale):
    q, kp, vp, ks, vs = _decode()
    with pytest.raises(ValueError, match="scale"):
        fastdf.shared_prefix_attention(q, kp, vp, ks, vs, scale=scale)


@pytest.mark.parametrize("what,match", [("D", "head dim"), ("Hq", "at least one head"), ("Hkv", "KV heads")])
def test_shared_prefix_empty_dims(what, match):
    q, kp, vp, ks, vs = _decode()
    if what == "D":
        q, kp, vp, ks, vs = (t[..., :0] for t in (q, kp, vp, ks, vs))
    elif what == "Hq":
        q = q[:, :, :0]
    else:
        kp, vp, ks, vs = kp[:, :0], vp[:, :0], ks[:, :, :0], vs[:, :, :0]
    with pytest.raises(ValueError, match=match):
        fastdf.shared_prefix_attention(q, kp, vp, ks, vs)

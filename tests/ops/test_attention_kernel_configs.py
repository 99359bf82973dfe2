"""The launch configurations the compile gates chose (kernels/attention.py), run under the
interpreter: the dK/dV kernel's fused and two-pass (``SPLIT``) forms, each shipped dK/dV
config with its own tile sizes, the decode forward's config, and the forward's key-split
(flash-decoding) path. tests/bench/test_compile.py checks what the compiler makes of them."""

import pytest
import torch

import fastdf
from fastdf.ops.attention import df_attention_mask, df_attention_reference
from fastdf.testing import assert_matches_reference



def _inputs(shape, seed):
    B, Hq, Hkv, Tq, Tk, D, mask = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, t, D, generator=gen).requires_grad_() for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))
    return q, k, v, torch.randn(B, Hq, Tq, D, generator=gen), mask


def _reference(q, k, v, **mask):
    return df_attention_reference(q, k, v, **mask)


def _reference_grads(mask):
    def grads(q, k, v, g):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad((df_attention_reference(*inputs, **mask)[0] * g).sum(), inputs)
    return grads


@pytest.fixture
def kernels(monkeypatch):
    from fastdf.kernels import attention as kernels
    from fastdf.ops import unavailable_reason

    if unavailable_reason("triton", "cpu"):
        pytest.skip("triton cannot run CPU tensors here")
    monkeypatch.setattr(kernels, "SHORT_MAX", 0)
    return kernels


def _run(q, k, v, g, mask):
    with fastdf.backend("triton"):
        out, lse = fastdf.df_attention(q, k, v, return_lse=True, **mask)
        grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    return (out, lse), grads


def test_dkdv_fused_and_two_pass_agree_bit_for_bit(kernels, monkeypatch):
    """The two-pass dK/dV (dV, then dK) feeds each accumulator the same products in the same
    order as the fused pass: equal gradients, and both match the reference (GQA, window,
    sinks, Tq < Tk, a NaN upstream gradient on the first frame's queries)."""
    shape = (1, 2, 1, 30, 64, 16, dict(frame_size=7, window_frames=3, sink_frames=1))
    q, k, v, g, mask = _inputs(shape, seed=3)
    runs = {}
    for split in (True, False):
        monkeypatch.setattr(kernels, "INTERPRET_SPLIT", split)
        runs[split] = _run(q, k, v, g, mask)[1]
    for a, b in zip(runs[True], runs[False]):
        assert torch.equal(a, b)
    assert_matches_reference(runs[False], _reference_grads(mask), q, k, v, g)

    g_nan = g.clone()
    g_nan[:, :, :7] = float("nan")
    seen = df_attention_mask(30, 64, **mask)[:7].any(0)  # keys the NaN rows see: NaN there, finite elsewhere
    for split in (True, False):
        monkeypatch.setattr(kernels, "INTERPRET_SPLIT", split)
        _, dk, dv = _run(q, k, v, g_nan, mask)[1]
        for d in (dk, dv):
            assert torch.isnan(d).any(-1).all(1).squeeze(0).equal(seen), split
            assert torch.isfinite(d[:, :, ~seen]).all(), split


def _gpu_config_ids():
    from fastdf.kernels import attention as kernels

    return [pytest.param(tier, i, id=f"{tier}-{'-'.join(map(str, c))}")
            for tier in ("d128", "d64") for i, c in enumerate(kernels._CONFIGS["dkdv"][tier])]


@pytest.mark.parametrize("tier, index", _gpu_config_ids())
def test_every_shipped_dkdv_config(kernels, monkeypatch, tier, index):
    """Each dK/dV config of the bf16 tiers, with its own tile sizes and SPLIT, as the untuned
    launch would run it (D = 80 pads to 128 for the d128 tier, D = 48 to 64 for d64)."""
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(kernels, "TUNE_MIN_PAIRS", float("inf"))
    table = dict(kernels._CONFIGS["dkdv"])
    table[tier] = [table[tier][index]]
    monkeypatch.setitem(kernels._CONFIGS, "dkdv", table)
    d = 80 if tier == "d128" else 48
    shape = (1, 2, 1, 70, 150, d, dict(frame_size=9, window_frames=4, sink_frames=1))
    q, k, v, g, mask = _inputs(shape, seed=5)
    out, grads = _run(q, k, v, g, mask)
    assert_matches_reference(out, _reference, q, k, v, **mask)
    assert_matches_reference(grads, _reference_grads(mask), q, k, v, g)

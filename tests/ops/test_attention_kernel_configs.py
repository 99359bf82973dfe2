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


@pytest.mark.parametrize("shape, sms", [
    ((1, 4, 2, 35, 200, 16, dict(frame_size=7, window_frames=20, sink_frames=1)), 8),
    ((2, 2, 1, 20, 150, 40, dict(frame_size=5)), 4),
    ((1, 2, 2, 3, 190, 16, dict(causal=False)), 4),
], ids=["window-sinks-gqa", "frame5-D40", "decode-noncausal"])
def test_key_split_forward_matches_reference(kernels, monkeypatch, shape, sms):
    """The flash-decoding forward (key tiles of each query block split over programs,
    partial states merged by _merge_splits_kernel) against the reference, and the backward
    from its out/lse; the split count is the launcher's own for a device of ``sms`` SMs."""
    monkeypatch.setattr(kernels, "KEY_SPLIT_SLOTS", sms)
    monkeypatch.setattr(kernels, "MIN_SPLIT_TILES", 1)
    counts = []
    real = kernels._key_splits
    monkeypatch.setattr(kernels, "_key_splits", lambda *a: counts.append(real(*a)) or counts[-1])
    q, k, v, g, mask = _inputs(shape, seed=7)
    out, grads = _run(q, k, v, g, mask)
    assert counts and counts[0] > 1, counts
    assert_matches_reference(out, _reference, q, k, v, **mask)
    assert_matches_reference(grads, _reference_grads(mask), q, k, v, g)


def test_key_split_count_fills_whole_waves(kernels, monkeypatch):
    """The split count: unsplit when the grid fills >= 90% of its last wave; otherwise the
    fewest splits that do (the attention (c) chunk: 444 query blocks on 132 SMs -> 2), never
    fewer than MIN_SPLIT_TILES key tiles per split."""
    import types

    monkeypatch.setattr(kernels, "KEY_SPLIT_SLOTS", 132)
    cpu = types.SimpleNamespace(type="cpu")
    assert kernels._key_splits(3072, 32760, 64, cpu) == 1  # 23.3 waves: 97% of the last one
    assert kernels._key_splits(444, 23400, 64, cpu) == 2  # 3.36 waves (84%) -> 6.73 (96%)
    assert kernels._key_splits(12, 32760, 128, cpu) == 10  # decode: 12 programs -> 120 of 132 SMs
    assert kernels._key_splits(12, 2048, 128, cpu) == 1  # 2 splits at most (8 tiles each): none fills
    monkeypatch.setattr(kernels, "KEY_SPLIT_SLOTS", None)
    assert kernels._key_splits(12, 32760, 128, cpu) == 1  # the interpreter without a test's SM count

"""The tiled attention kernels' TMA-descriptor path (fastdf.kernels.attention): K/V of the
forward and of dQ, q/dO of dK/dV, loaded through device-side tensor descriptors in the
unmasked key (query) ranges, pointer loads elsewhere. Checks which launches take the
descriptors (``tma_operands``: alignment, strides, head dim, device) and that the
descriptor path and every fallback give the reference's output and gradients.

Runs under the interpreter (which checks TMA's alignment rules and zero-fills out-of-bounds
boxes as the hardware does), through the public op, on shapes whose masks have fully
visible tiles (descriptor loads) next to edge tiles (pointer loads), several batch rows and
K/V heads (so a descriptor with the wrong base or coordinate reads another head's rows).
"""

import pytest
import torch

import fastdf
from fastdf.ops.attention import df_attention_reference
from fastdf.testing import assert_matches_reference

FLAGS = {"fwd": "KV_TMA", "dq": "KV_TMA", "dkdv": "QD_TMA"}


@pytest.fixture
def kernels(monkeypatch):
    from fastdf.kernels import attention as kernels
    from fastdf.ops import unavailable_reason

    if unavailable_reason("triton", "cpu"):
        pytest.skip("triton cannot run CPU tensors here")
    monkeypatch.setattr(kernels, "SHORT_MAX", 0)  # the tiled kernels only
    return kernels


@pytest.fixture
def launches(kernels, monkeypatch):
    """{kernel name: its TMA flag} of each tiled launch that follows."""
    seen = {}
    real = kernels._launch_config

    def spy(kernel, name, configs, big, grid_rows, args, meta):
        seen[name] = meta[FLAGS[name]]
        return real(kernel, name, configs, big, grid_rows, args, meta)

    monkeypatch.setattr(kernels, "_launch_config", spy)
    return seen


def _rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _heads(B, H, T, D, seed, dtype=torch.float32, layout="bhtd"):
    """[B, H, T, D] in one of the layouts the op passes through unchanged (unit stride on D):
    contiguous, [B, T, H, D] transposed, rows padded (stride D + 1, not a 16-byte multiple in
    fp32) or one element past an aligned base."""
    if layout == "bthd":
        return _rand(B, T, H, D, seed=seed, dtype=dtype).transpose(1, 2)
    if layout == "padded":
        return _rand(B, H, T, D + 1, seed=seed, dtype=dtype)[..., :D]
    if layout == "offset":
        flat = _rand(B * H * T * D + 1, seed=seed, dtype=dtype)
        return flat[1:].view(B, H, T, D)
    return _rand(B, H, T, D, seed=seed, dtype=dtype)


def _run(q, k, v, g, mask):
    """Output and gradients of the triton op; ``g`` None: the loss is out.sum() (its upstream
    gradient reaches the backward as an expanded, stride-0 tensor)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with fastdf.backend("triton"):
        out = fastdf.df_attention(q, k, v, **mask)
        grads = torch.autograd.grad(out.sum() if g is None else (out * g).sum(), (q, k, v))
    return (q, k, v), out, grads


def _reference_grads(mask):
    def grads(q, k, v, g):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad((df_attention_reference(*inputs, **mask)[0] * g).sum(), inputs)
    return grads


def _check(q, k, v, g, mask):
    (q, k, v), out, grads = _run(q, k, v, g, mask)
    g = torch.ones_like(out) if g is None else g
    assert_matches_reference(out, lambda *a, **m: df_attention_reference(*a, **m)[0], q, k, v, **mask)
    assert_matches_reference(grads, _reference_grads(mask), q, k, v, g)


# Window + sinks + frames, Tq < Tk, sized against the interpreter's tiles (forward and dQ:
# 32 keys, dK/dV: 32 queries): every query block sees a full unmasked sink tile and at least
# one full unmasked window tile next to masked edges; the sink key blocks and those of the
# middle frames see every query (unmasked dK/dV tiles).
MASK = dict(frame_size=16, window_frames=4, sink_frames=2)
B, HQ, HKV, TQ, TK = 2, 4, 2, 48, 128


@pytest.mark.parametrize("layout, D, dtype, want", [
    ("bhtd", 16, torch.float32, True),
    ("bthd", 16, torch.float32, True),    # transposed [B, T, H, D]: strides still 16-byte multiples
    ("bhtd", 24, torch.float32, True),    # D < BLOCK_D = 32: the box's columns past D read zeros
    ("bhtd", 8, torch.float16, True),     # 16 bytes of fp16
    ("padded", 16, torch.float32, False),  # row stride 68 B
    ("offset", 16, torch.float32, False),  # base 4 B past a 16-byte boundary
    ("bhtd", 6, torch.float32, False),    # D = 24 B
    ("bhtd", 12, torch.float16, False),   # D = 24 B
], ids=["contiguous", "bthd", "d24-pad-columns", "fp16-d8", "row-stride", "base", "fp32-d6", "fp16-d12"])
def test_descriptor_path_and_alignment_fallbacks(kernels, launches, layout, D, dtype, want):
    """The launchers choose descriptors exactly when TMA can read every operand, and both
    paths match the reference (GQA, window, sinks; two batch rows on the descriptor path,
    where a wrong per-head base would read the other row; the fallbacks run the pointer
    loads other tests cover, on a smaller problem)."""
    b, tq, tk = (B, TQ, TK) if want else (1, 32, 64)
    q = _heads(b, HQ, tq, D, 1, dtype, layout)
    k = _heads(b, HKV, tk, D, 2, dtype, layout)
    v = _heads(b, HKV, tk, D, 3, dtype, layout)
    g = _heads(b, HQ, tq, D, 4, dtype, layout)
    assert kernels.tma_operands(D, k, v) is want
    _check(q, k, v, g, MASK)
    assert launches == {"fwd": want, "dq": want, "dkdv": want}


def test_each_operand_checked_on_its_own(kernels, launches):
    """K/V eligibility (forward, dQ) and q/dO eligibility (dK/dV) are separate: padded K rows
    keep the forward and dQ on pointers; a loss of out.sum() sends an expanded (stride-0)
    upstream gradient, which keeps dK/dV on pointers."""
    D = 16
    q, v, g = _heads(B, HQ, TQ, D, 1), _heads(B, HKV, TK, D, 3), _heads(B, HQ, TQ, D, 4)
    _check(q, _heads(B, HKV, TK, D, 2, layout="padded"), v, g, MASK)
    assert launches == {"fwd": False, "dq": False, "dkdv": True}
    launches.clear()
    _check(q, _heads(B, HKV, TK, D, 2), v, None, MASK)
    assert launches == {"fwd": True, "dq": True, "dkdv": False}


def test_no_descriptors_without_sm90(kernels, launches, monkeypatch):
    """Devices before sm_90 (_device.tma_capable, read at call time: the compile report
    patches the same name) keep every load a pointer load."""
    from fastdf.kernels import _device

    monkeypatch.setattr(_device, "tma_capable", lambda device: False)
    D = 16
    q, k, v, g = (_heads(B, h, t, D, s) for s, (h, t) in enumerate(((HQ, 32), (HKV, 64), (HKV, 64), (HQ, 32))))
    assert kernels.tma_operands(D, k, v) is False
    _check(q, k, v, g, MASK)
    assert launches == {"fwd": False, "dq": False, "dkdv": False}


def test_empty_operand_never_gets_a_descriptor(kernels):
    """A descriptor has no empty dimension: zero keys keep pointer loads."""
    assert kernels.tma_operands(16, torch.empty(1, 1, 0, 16), torch.empty(1, 1, 0, 16)) is False
    assert kernels.tma_operands(0, torch.empty(1, 1, 4, 0)) is False


@pytest.mark.parametrize("mask, kpm", [
    (dict(causal=False), False),
    (dict(frame_size=7), True),
], ids=["noncausal-full-tiles", "frames-key-padding"])
def test_descriptor_path_unmasked_ranges(kernels, launches, mask, kpm):
    """Non-causal (every tile but the last unmasked: nearly every load a descriptor load) and
    key padding (tiles mixing padding and real keys in the unmasked ranges read through the
    descriptors; padding rows carry NaN, which must reach no output or gradient)."""
    D = 16
    q, k, v, g = (_heads(B, h, t, D, 10 + s) for s, (h, t) in enumerate(((HQ, TQ), (HKV, TK), (HKV, TK), (HQ, TQ))))
    if not kpm:
        _check(q, k, v, g, mask)
    else:
        keep = torch.ones(B, TK, dtype=torch.bool)
        keep[0, 40:47] = False  # a hole inside the fully visible keys of the later queries
        keep[1, :5] = False
        k, v = k.clone(), v.clone()
        k[~keep[:, None, :, None].expand_as(k)] = float("nan")
        v[~keep[:, None, :, None].expand_as(v)] = float("nan")
        (_, _, _), out, grads = _run(q, k, v, g, {**mask, "key_padding_mask": keep})
        # The reference reads the padding as zeros: NaN there must not reach any result.
        k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
        full = {**mask, "key_padding_mask": keep}
        assert_matches_reference(out, lambda *a, **m: df_attention_reference(*a, **m)[0], q, k0, v0, **full)
        assert_matches_reference(grads, _reference_grads(full), q, k0, v0, g)
    assert launches == {"fwd": True, "dq": True, "dkdv": True}


def test_descriptor_path_with_key_splits(kernels, launches, monkeypatch):
    """The flash-decoding forward: each split's share of the unmasked ranges, whole tiles,
    through the descriptors."""
    monkeypatch.setattr(kernels, "KEY_SPLIT_SLOTS", 8)
    monkeypatch.setattr(kernels, "MIN_SPLIT_TILES", 1)
    D = 16
    q, k, v, g = (_heads(1, h, t, D, 20 + s) for s, (h, t) in enumerate(((4, 35), (2, 200), (2, 200), (4, 35))))
    _check(q, k, v, g, dict(frame_size=7, window_frames=20, sink_frames=1))
    assert launches == {"fwd": True, "dq": True, "dkdv": True}

"""Frame-causal flash attention for Diffusion Forcing (DESIGN.md §4, issue #3).

The mask, for q ``[B, Hq, Tq, D]`` against k, v ``[B, Hkv, Tk, D]``: query i sits at absolute
position ``p = Tk - Tq + i`` (the queries are the newest tokens; the first ``Tk - Tq`` keys
are cache), ``frame(x) = x // frame_size``, and key j is visible to position p iff

    frame(j) <= frame(p)  and  (window_frames is None
                                or frame(p) - frame(j) < window_frames
                                or frame(j) < sink_frames).

``causal=False`` makes every key visible. An optional ``key_padding_mask`` [B, Tk] (True = a
real key) is ANDed with that rule; a query row left without any key gives zeros and
lse = -inf (without a padding mask every query sees at least its own key).

Implementations: ``triton`` (kernels/attention.py: FA2-style forward with tile
classification, deterministic backward) and ``torch`` (the CPU path: blocks of query
frames through PyTorch's CPU flash kernel on the key ranges each block sees, and the
chunked reference below wherever that could not match it exactly). Both are one
``torch.library`` custom op, ``fastdf::df_attention``, with a fake and an autograd formula
whose backward is the custom op ``fastdf::df_attention_backward``.
On the torch backend outside any compiler or tracer, :func:`df_attention` calls the torch
implementation directly, without the op's dispatch (see _eager.py); same results bitwise.
Where every row sees every key (of at least CPU_KERNEL_DENSE_KEYS) and no lse is asked for,
that direct call is aten's flash kernel as a differentiable op: its backward is aten's own
autograd node (still the same bits; a backend chosen between forward and backward is not
consulted there).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import _native
from . import _alloc, _checks
from ._backend import Op
from ._eager import PLAIN, _is_compiling, cpu_kernel_route, plain_tensors, torch_backend_eager
from ._library import custom_op

ATTENTION = Op("df_attention", prefer=("triton", "torch"))
ATTENTION_BACKWARD = Op("df_attention_backward", prefer=("triton", "torch"))

# The reference materialises scores for this many (batch, head, query, key) entries at a
# time: memory-sane for a few thousand tokens.
REFERENCE_CHUNK = 1 << 24


# ---------------------------------------------------------------------------- the mask


def visible(q_pos: Tensor, k_pos: Tensor, *, frame_size: int = 1, causal: bool = True,
            window_frames: int | None = None, sink_frames: int = 0) -> Tensor:
    """Boolean visibility of keys at absolute positions ``k_pos`` to queries at absolute
    positions ``q_pos`` (broadcast against each other), per the rule above."""
    if not causal:
        return torch.ones(torch.broadcast_shapes(q_pos.shape, k_pos.shape), dtype=torch.bool, device=q_pos.device)
    fq = torch.div(q_pos, frame_size, rounding_mode="floor")
    fk = torch.div(k_pos, frame_size, rounding_mode="floor")
    ok = fk <= fq
    if window_frames is not None:
        ok = ok & ((fq - fk < window_frames) | (fk < sink_frames))
    return ok


def df_attention_mask(tq: int, tk: int, *, frame_size: int = 1, causal: bool = True, window_frames: int | None = None,
                      sink_frames: int = 0, device=None) -> Tensor:
    """The ``[tq, tk]`` boolean mask (True = visible) that :func:`df_attention` applies;
    pass it to SDPA as ``attn_mask`` for an equivalent (slow) computation."""
    if tq > tk:
        raise ValueError(f"tq ({tq}) must be <= tk ({tk}): queries are the newest tq of the tk positions")
    q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
    k_pos = torch.arange(tk, device=device)[None, :]
    return visible(q_pos, k_pos, frame_size=frame_size, causal=causal, window_frames=window_frames,
                   sink_frames=sink_frames)


def df_mask_mod(tq: int, tk: int, *, frame_size: int = 1, causal: bool = True, window_frames: int | None = None,
                sink_frames: int = 0):
    """The same rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` (for baselines and
    cross-checks: ``create_block_mask(df_mask_mod(...), B, None, tq, tk)``)."""
    offset = tk - tq

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_idx + offset, kv_idx, frame_size=frame_size, causal=causal, window_frames=window_frames,
                       sink_frames=sink_frames)

    return mask_mod


def visible_pairs(tq: int, tk: int, *, frame_size: int = 1, causal: bool = True, window_frames: int | None = None,
                  sink_frames: int = 0) -> int:
    """How many (query, key) pairs the mask keeps, counted frame by frame (no [tq, tk]
    tensor): the FLOP count of a benchmark is ``4 * D * heads * batch * visible_pairs``."""
    if not causal:
        return tq * tk
    total = 0
    first = tk - tq
    for f in range(first // frame_size, (tk - 1) // frame_size + 1):
        rows = min(tk, (f + 1) * frame_size) - max(first, f * frame_size)
        end = min(tk, (f + 1) * frame_size)
        if window_frames is None:
            keys = end
        else:
            start = max(0, (f - window_frames + 1) * frame_size)
            keys = end - start + min(sink_frames * frame_size, start)
        total += rows * keys
    return total


# ---------------------------------------------------------------------------- reference


def _chunks(tq: int, per_row: int, chunk: int):
    rows = max(1, chunk // max(1, per_row))
    return [(s, min(tq, s + rows)) for s in range(0, tq, rows)]


def _chunk_mask(s, e, Tq, Tk, key_padding_mask, device, **mask):
    """Visibility ``[c, Tk]``, or ``[B, 1, 1, c, Tk]`` with a key padding mask."""
    k_pos = torch.arange(Tk, device=device)[None, :]
    vis = visible(torch.arange(Tk - Tq + s, Tk - Tq + e, device=device)[:, None], k_pos, **mask)
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.to(device)[:, None, None, None, :]
    return vis


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(qc: Tensor, k: Tensor, scale: float, dtype) -> Tensor:
    """Scaled scores ``(qc * scale) @ k^T`` in ``dtype``. Scaling before the product keeps
    the raw ``q . k`` (which may exceed fp16's 65504) out of low precision; the forward
    and the backward share this so their scores are bitwise equal."""
    return (qc.to(dtype) * scale) @ k.to(dtype).transpose(-1, -2)


def _finite_or_zero(t: Tensor) -> Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def _bad_rows(t: Tensor) -> Tensor:
    """Rows (last dim reduced) holding a NaN or an infinity."""
    return ~torch.isfinite(t).all(-1)


def df_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, frame_size: int = 1, causal: bool = True,
                           window_frames: int | None = None, sink_frames: int = 0, scale: float | None = None,
                           key_padding_mask: Tensor | None = None, chunk: int = REFERENCE_CHUNK,
                           upcast: bool = False) -> tuple[Tensor, Tensor]:
    """Readable torch reference: ``(out, lse)`` as :func:`df_attention` with ``return_lse``
    (``key_padding_mask`` bool [B, Tk], True = a real key, as there).

    ``upcast=False`` is plain PyTorch in q's dtype (the baseline of the 2x-error rule, as
    flash-attention's ``attention_ref``): ``(q * scale) @ k^T``, softmax and the product
    with v in q's dtype. ``upcast=True`` (the torch backend) computes scores, softmax and
    the product with v in float32 (float64 for float64 inputs) and rounds once at the end.
    lse is float32 (float64 for float64 inputs) either way, from the same scores. Queries
    are processed in chunks so no more than ``chunk`` scores exist at once. A row that
    sees no key (only possible with ``key_padding_mask``) gives zeros and lse = -inf.

    Causality holds for non-finite data: masked scores are -inf (whatever q . k was), and a
    NaN/inf value behind a key a row cannot see is zeroed for the product; rows that do
    see a non-finite value get NaN. Differentiable by autograd.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    lse_dtype = _acc_dtype(q.dtype)
    dtype = lse_dtype if upcast else q.dtype
    if Tq == 0:
        return q.new_empty(q.shape), q.new_empty((B, Hq, 0), dtype=lse_dtype)
    qg = q.reshape(B, Hkv, G, Tq, D)
    bad_v = _bad_rows(v)[:, :, None, None, :]  # [B, Hkv, 1, 1, Tk]
    v_clean = _finite_or_zero(v).to(dtype)
    outs, lses = [], []
    for s, e in _chunks(Tq, B * Hq * Tk, chunk):
        c = e - s
        scores = _scores(qg[:, :, :, s:e].reshape(B, Hkv, G * c, D), k, scale, dtype).view(B, Hkv, G, c, Tk)
        mask = _chunk_mask(s, e, Tq, Tk, key_padding_mask, q.device, frame_size=frame_size, causal=causal,
                           window_frames=window_frames, sink_frames=sink_frames)
        scores = scores.masked_fill(~mask, float("-inf"))
        if key_padding_mask is not None:  # rows without keys: zeros and -inf, not NaN (nor NaN gradients)
            empty = ~mask.any(-1, keepdim=True)
            scores = scores.masked_fill(empty, 0.0)
            lses.append(torch.logsumexp(scores.to(lse_dtype), -1).masked_fill(empty[..., 0], float("-inf")))
            p = torch.softmax(scores, -1).masked_fill(empty, 0.0)
        else:
            lses.append(torch.logsumexp(scores.to(lse_dtype), -1))
            p = torch.softmax(scores, -1)
        o = (p.reshape(B, Hkv, G * c, Tk) @ v_clean).view(B, Hkv, G, c, D)
        sees_bad = (mask & bad_v).any(-1, keepdim=True)
        outs.append(o.masked_fill(sees_bad, float("nan")).to(q.dtype))
    out = torch.cat(outs, 3).reshape(B, Hq, Tq, D)
    lse = torch.cat(lses, 3).reshape(B, Hq, Tq)
    return out, lse


def df_attention_backward_reference(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                                    out: Tensor, lse: Tensor, *, frame_size: int = 1, causal: bool = True,
                                    window_frames: int | None = None, sink_frames: int = 0,
                                    scale: float | None = None, key_padding_mask: Tensor | None = None,
                                    chunk: int = REFERENCE_CHUNK):
    """Chunked backward in fp32 (fp64 for fp64 inputs): returns ``(dq, dk, dv)``.

    With P the attention probabilities (recomputed, as a softmax, from the scores of
    ``df_attention_reference(upcast=True)``; ``lse`` is accepted and unused) and dP = dO V^T,
    dS = P * (dP - rowsum(P * dP) + dlse), dQ = scale dS K, dK = scale dS^T Q,
    dV = P^T dO (GQA: summed over the query heads of each K/V head).

    ``rowsum(P * dP)`` equals ``rowsum(dO * O)`` but comes from the same float32
    quantities as dP, so no low-precision ``out`` enters (``out`` is accepted and unused)
    and a row with one visible key (P = 1) gets exactly zero dS. Non-finite data of an
    invisible (query, key) pair reaches neither side's gradient.
    """
    del out, lse
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    k_clean, vf = _finite_or_zero(k).to(acc), v.to(acc)
    dq = torch.empty(B, Hq, Tq, D, dtype=acc, device=q.device)
    dk = torch.zeros(B, Hkv, Tk, D, dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    dv_bad = torch.zeros(B, Hkv, Tk, dtype=torch.bool, device=q.device)
    qg = q.reshape(B, Hkv, G, Tq, D)
    gg = grad_out.reshape(B, Hkv, G, Tq, D)
    dlg = grad_lse.reshape(B, Hkv, G, Tq) if grad_lse is not None else None
    for s, e in _chunks(Tq, B * Hq * Tk, chunk):
        c = e - s
        qc = qg[:, :, :, s:e].reshape(B, Hkv, G * c, D)
        gc = gg[:, :, :, s:e].reshape(B, Hkv, G * c, D).to(acc)
        mask = _chunk_mask(s, e, Tq, Tk, key_padding_mask, q.device, frame_size=frame_size, causal=causal,
                           window_frames=window_frames, sink_frames=sink_frames)
        mask = mask.expand(B, Hkv, G, c, Tk).reshape(B, Hkv, G * c, Tk)
        # P from the recomputed scores' own max and sum (a stable softmax), not exp(s - lse):
        # an fp32 lse carries an error of ulp(|lse|), which P would inherit (measured 2.6x
        # plain fp32's dk error on a 1000-key decode step). Rows without keys: P = 0.
        scores = _scores(qc, k, scale, acc).masked_fill(~mask, float("-inf"))
        m = scores.amax(-1, keepdim=True)
        p = torch.exp(scores - torch.where(torch.isneginf(m), torch.zeros_like(m), m))
        total = p.sum(-1, keepdim=True)
        p = p / torch.where(total > 0, total, torch.ones_like(total))
        dp = (gc @ vf.transpose(-1, -2)).masked_fill(~mask, 0.0)
        delta = (p * dp).sum(-1, keepdim=True)
        if dlg is not None:
            delta = delta - dlg[..., s:e].reshape(B, Hkv, G * c, 1).to(acc)
        ds = (p * (dp - delta)).masked_fill(~mask, 0.0)
        # a non-finite dO of a query reaches only the keys that query sees
        dv_bad |= (mask & _bad_rows(gc)[..., None]).any(-2)
        dv += p.transpose(-1, -2) @ _finite_or_zero(gc)
        dq.view(B, Hkv, G, Tq, D)[:, :, :, s:e] = (ds @ k_clean * scale).view(B, Hkv, G, c, D)
        dk += ds.transpose(-1, -2) @ _finite_or_zero(qc).to(acc) * scale
    dv = dv.masked_fill(dv_bad[..., None], float("nan"))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------- backends


def _empty_bthd(b, h, t, d, *, dtype, device):
    """A [B, H, T, D] result whose memory is [B, T, H, D] (what the next projection wants,
    and what SDPA's fused backends return)."""
    return _alloc.empty((b, t, h, d), dtype=dtype, device=device).transpose(1, 2)


def _bthd_layout(t):
    """Whether ``t`` [B, H, T, D] is laid out as [B, T, H, D] (the outputs' layout): a
    stride comparison first (``transpose`` + ``is_contiguous`` are two dispatches)."""
    _, H, T, D = t.shape
    return t.stride() == (T * H * D, D, H * D, 1) or t.transpose(1, 2).is_contiguous()


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# The torch backend (what ``auto`` runs on CPU tensors) touches only the keys each block of
# queries can see: whole frames of queries share one visible key range, so most blocks need
# no mask at all, and each (block, key range) piece runs through the CPU flash kernel behind
# SDPA, which also returns the log-sum-exp the pieces are merged with. Frames of at least
# FAST_FRAME_ROWS rows run one per block (no mask: the kernel's additive mask costs about
# as much as the keys it hides); shorter frames are grouped into blocks of about
# FAST_BLOCK_ROWS rows with one masked piece each, so tiny frames do not cost one kernel
# call each (measured on 2 cores, fp32: frames of 8-64 tokens, 256-1024 queries).
FAST_FRAME_ROWS = 32
FAST_BLOCK_ROWS = 128


def _flash_cpu():
    # the torch.* binding: a few microseconds less per call than torch.ops.aten's packet
    return getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None)


@functools.lru_cache(maxsize=None)
def _flash_cpu_backward():
    # the op's overload, resolved once: calling the torch.ops packet resolves it per call
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


# fastdf._cpu's kernels (csrc/cpu/attention.cpp): fp32 heads of at most CPU_KERNEL_MAX_KEYS
# keys on AVX-512 CPUs, forward and backward. They read only the keys each row sees (two
# ranges per row: sinks and window) and the forward sums normalised weights, so a row is
# non-finite only where it sees non-finite data, and its result needs no read-back check;
# the aten kernel above is checked by one read of out and lse (issue 11: that check alone
# kept small calls below SDPA's speed). Measured against SDPA on the CPU suite's cases a-e
# (1 thread, AVX-512): forward 1.16-1.35x on a, b, d, e. False turns them off (tests
# compare both routes).
CPU_KERNEL = True
CPU_KERNEL_MAX_KEYS = 512
# Where every row sees all of at least this many keys (nothing to skip), aten's CPU flash
# kernel runs unmasked, forward and backward (GEMM-based), measured faster there (1 thread,
# AVX-512): the kernel's backward ran 0.82x / 1.00x / 0.93x its speed on 96 x 288 keys at
# D = 128 / 64 / 32, 0.88x bidirectional 288 x 288 D32, but 1.21x on 16-key heads and
# 1.23-1.56x wherever a mask hides keys; its forward ran 0.9x aten's on 96 x 288 D32. With
# no lse asked for, the eager path calls aten's kernel as a differentiable op (see
# _attention_dense), so its backward is aten's own autograd node: no Python between the
# engine and the kernel (issue 11: that host work kept case c at 0.77x SDPA's backward).
CPU_KERNEL_DENSE_KEYS = 128


def _cpu_kernel_fits(q, k):
    """Whether fastdf._cpu takes these tensors (CPU memory only: it gets raw pointers; the
    torch backend also runs CUDA tensors when chosen)."""
    D, Tk = q.shape[3], k.shape[2]
    return (q.is_cpu and k.is_cpu and q.dtype == torch.float32 and D % 16 == 0 and D <= 256
            and Tk <= CPU_KERNEL_MAX_KEYS and _native.cpu_module() is not None)


def _dense(tq, tk, frame_size, causal, window_frames, sink_frames):
    """Every row sees all of at least CPU_KERNEL_DENSE_KEYS keys (aten's kernel runs)."""
    return tk >= CPU_KERNEL_DENSE_KEYS and _sees_every_key(tq, tk, frame_size, causal, window_frames, sink_frames)


def _cpu_kernel_backward(q, k, out, lse, mask, sharp=False):
    """Whether the backward runs fastdf._cpu's kernel (see CPU_KERNEL_DENSE_KEYS): also on
    dense rows where some |lse| is beyond FLASH_BACKWARD_MAX_LSE (``sharp``), which aten's
    kernel cannot take within the rule and this one can."""
    if not (CPU_KERNEL and out.dtype == torch.float32 and lse.dtype == torch.float32 and _cpu_kernel_fits(q, k)):
        return False
    return sharp or not _dense(q.shape[2], k.shape[2], **mask)


@functools.lru_cache(maxsize=256)
def _sees_every_key(tq, tk, frame_size, causal, window_frames, sink_frames):
    r = _key_ranges(tq, tk, frame_size, causal, window_frames, sink_frames)
    return bool(((r[:, 0] == 0) & (r[:, 1] == tk)).all())


@functools.lru_cache(maxsize=256)
def _key_ranges(tq, tk, frame_size, causal, window_frames, sink_frames):
    """int32 ``[tq, 4]``: the keys query row i sees, as ``[lo0, hi0)`` and ``[lo1, hi1)``
    (sink frames, then the window; the second range may be empty), the rule of
    :func:`visible` in closed form."""
    p = torch.arange(tk - tq, tk, dtype=torch.int64)
    zero = torch.zeros_like(p)
    if not causal:
        return torch.stack([zero, torch.full_like(p, tk), zero, zero], 1).to(torch.int32).contiguous()
    f = torch.div(p, frame_size, rounding_mode="floor")
    end = ((f + 1) * frame_size).clamp(max=tk)
    if window_frames is None:
        return torch.stack([zero, end, zero, zero], 1).to(torch.int32).contiguous()
    start = ((f - window_frames + 1) * frame_size).clamp(min=0)
    sinks = min(sink_frames * frame_size, tk)
    if sinks == 0:
        return torch.stack([start, end, zero, zero], 1).to(torch.int32).contiguous()
    joined = start <= sinks  # the sinks reach the window: one range [0, end)
    lo0, hi0 = zero, torch.where(joined, end, torch.full_like(p, sinks))
    lo1, hi1 = torch.where(joined, zero, start), torch.where(joined, zero, end)
    return torch.stack([lo0, hi0, lo1, hi1], 1).to(torch.int32).contiguous()


def _attention_cpu_kernel(q, k, v, frame_size, causal, window_frames, sink_frames, scale):
    """``(out, lse, max |lse|)`` from fastdf._cpu where every element is finite and lse
    passes _accepted's floor, else None (:func:`_attention_cpu_careful` then runs)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    q, k, v = _last_dim_contiguous(q, k, v)
    ranges = _key_ranges(Tq, Tk, frame_size, causal, window_frames, sink_frames)
    out = _empty_bthd(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    lse = _alloc.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    finite, absmax = _native.cpu_module().attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), B, Hq, Hkv, Tq, Tk, D,
        q.stride()[:3], k.stride()[:3], v.stride()[:3], out.stride()[:3], lse.stride(), ranges.data_ptr(), scale,
        torch.get_num_threads())
    # the raw q . k is scaled after the product, as in the aten kernel: the same floor
    if finite and absmax < _FLOAT_MAX[torch.float32] * scale - LSE_FLOOR_MARGIN:
        return out, lse, absmax
    return None


def _attention_backward_cpu_kernel(grad_out, q, k, v, out, lse, frame_size, causal, window_frames, sink_frames,
                                   scale):
    """``(dq, dk, dv)`` from fastdf._cpu's backward (the forward's out and lse given), or
    None where an element is not finite (the callers' other routes then run). The kernel
    multiplies a pair a row cannot see by 0, which is exact for the finite q and out an
    accepted forward implies; a non-finite dO also shows in dq, so it is rejected too."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    q, k, v, out, grad_out = _last_dim_contiguous(q, k, v, out, grad_out)
    ranges = _key_ranges(Tq, Tk, frame_size, causal, window_frames, sink_frames)
    dq = _empty_bthd(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    dk = _empty_bthd(B, Hkv, Tk, D, dtype=q.dtype, device=q.device)
    dv = _empty_bthd(B, Hkv, Tk, D, dtype=q.dtype, device=q.device)
    strides = tuple(t.stride()[:3] for t in (q, k, v, out, grad_out, lse, dq, dk, dv))
    finite = _native.cpu_module().attention_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), grad_out.data_ptr(), lse.data_ptr(), dq.data_ptr(),
        dk.data_ptr(), dv.data_ptr(), B, Hq, Hkv, Tq, Tk, D, strides, ranges.data_ptr(), scale,
        torch.get_num_threads())
    return (dq, dk, dv) if finite else None


def _attention_cpu_careful(q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale):
    """``(out, lse)`` where the kernel's result was not accepted: the kernel again on the data
    with its non-finite elements zeroed (rows that see none of them never read those, so
    they keep the clean data's bits) and the rows that hold or see one from the reference,
    as the aten path's careful route does; data beyond the norms' bounds goes there."""
    data = _fast_path_data(q, k, v, key_padding_mask, scale)
    mask = dict(frame_size=frame_size, causal=causal, window_frames=window_frames, sink_frames=sink_frames)
    result = None
    if data is not None and data[3] is not None:
        result = _attention_cpu_kernel(*data[:3], scale=scale, **mask)
    if result is None:
        return _attention_careful(q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale)
    out, lse = _reference_rows(result[0], result[1], 0, q.shape[2], [(0, k.shape[2], None)], data[3], q, k, v,
                               scale, mask)
    if not _bthd_layout(out):
        out = _empty_bthd(*q.shape, dtype=q.dtype, device=q.device).copy_(out)
    return out, lse


def _fast_path_data(q, k, v, key_padding_mask, scale):
    """``(q, k, v, bad)`` for the blocked path, or None where only the reference is exact.

    The path needs every query row to see a key (no padding), finite raw products q . k
    (the kernel scales after the product; an overflow to -inf would empty a row the
    reference keeps) and finite unnormalised sums of values: Frobenius norms bound both
    (Cauchy-Schwarz), at one reduction per tensor. Finite data comes back as it is, with
    ``bad`` None. Otherwise the non-finite elements are zeroed (the flash kernel multiplies
    masked probabilities, 0, by V, so a NaN behind a mask would reach queries that cannot
    see it) and ``bad`` holds ``(bad_q [B, Hq, Tq], bad_kv [B, Hkv, Tk])`` rows: queries
    that hold or see one take the reference's values, the others are bitwise those of
    clean data."""
    if q.device.type != "cpu" or _flash_cpu() is None or q.numel() == 0:
        return None
    if key_padding_mask is not None and not bool(key_padding_mask.all()):
        return None
    acc = _acc_dtype(q.dtype)

    def norms(*ts):
        return [float(torch.linalg.vector_norm(t, dtype=acc)) for t in ts]

    nq, nk, nv = norms(q, k, v)
    bad = None
    if not math.isfinite(nq * nk * nv):
        bad = (_bad_rows(q), _bad_rows(k) | _bad_rows(v))
        q, k, v = _finite_or_zero(q), _finite_or_zero(k), _finite_or_zero(v)
        nq, nk, nv = norms(q, k, v)
    # the kernel's unnormalised output sums reach Tk max|v| before the final division
    if not (nq * nk * max(scale, 1.0) < 1e38 and nv * k.shape[2] < 1e38):
        return None
    return q, k, v, bad


# Each kernel call costs tens of microseconds whatever its size (measured on 2 cores, fp32:
# a 1-row call ~20 us, 96 x 96 rows x keys ~45 us above its share of the work), which small
# problems cut into many blocks pay many times over. Where the keys a plan skips are cheaper
# than its extra calls, one call over every row with a cached additive mask does the work
# (frame-causal 8 x 32 tokens, B2 H2 D64: 0.85-1.0 ms against 1.1-1.3 ms in 8 calls). The
# skipped work is counted in (query, key) pairs times B * Hq * D; DENSE_CALL_WORK is one
# extra call's worth of it.
DENSE_CALL_WORK = 1.5e6


def _plan(tq, tk, frame_size, causal, window_frames, sink_frames, work=0):
    """A cached :func:`_make_plan` (a model calls attention with a few shapes only; the
    Python planning is a few microseconds of every call otherwise). ``work`` (B * Hq * D,
    0 = never) lets a small problem run as one masked piece (see DENSE_CALL_WORK)."""
    work_calls = work / DENSE_CALL_WORK if work and tq * tk <= PIECE_MASK_CACHE_MAX else 0.0
    return _cached_plan(tq, tk, frame_size, causal, window_frames, sink_frames, FAST_FRAME_ROWS, FAST_BLOCK_ROWS,
                        work_calls)


@functools.lru_cache(maxsize=256)
def _cached_plan(tq, tk, frame_size, causal, window_frames, sink_frames, frame_rows, block_rows, work_calls):
    plan = tuple((s, e, tuple(pieces)) for s, e, pieces in _make_plan(tq, tk, frame_size, causal, window_frames,
                                                                      sink_frames, frame_rows, block_rows))
    calls = sum(len(pieces) for *_, pieces in plan)
    if work_calls and calls > 1:
        lo = min(p[0] for *_, pieces in plan for p in pieces)
        hi = max(p[1] for *_, pieces in plan for p in pieces)
        skipped = tq * (hi - lo) - sum((e - s) * (p[1] - p[0]) for s, e, pieces in plan for p in pieces)
        if skipped * work_calls < calls - 1:
            return ((0, tq, ((lo, hi, "mask"),)),)
    return plan


def _make_plan(tq, tk, frame_size, causal, window_frames, sink_frames, frame_rows, block_rows):
    """Query blocks and the keys they see: a list of ``(s, e, pieces)`` for query rows
    ``[s, e)``, each piece ``(lo, hi, kind)`` a key range, ``kind`` None (every row of the
    block sees every key of the range), ``"causal"`` (a square, top-left causal range) or
    ``"mask"`` (the rule decides per pair). Pieces of a block are disjoint, their union is
    every key some row of the block sees, and every row sees at least one key of each piece
    (so each piece's softmax has a finite log-sum-exp to merge)."""
    off = tk - tq
    if not causal:
        return [(0, tq, [(0, tk, None)])]
    if frame_size == 1 and window_frames is None:
        # token-causal: the cache is seen by every query, the rest is one causal square
        return [(0, tq, ([(0, off, None)] if off else []) + [(off, tk, "causal")])]
    fs = frame_size
    sink_end = min(sink_frames * fs, tk) if window_frames is not None else 0
    per = 1 if fs >= frame_rows else max(1, block_rows // fs)
    blocks = []
    for f0 in range(off // fs, (tk - 1) // fs + 1, per):
        f1 = min(f0 + per - 1, (tk - 1) // fs)
        s, e = max(off, f0 * fs) - off, min(tk, (f1 + 1) * fs) - off
        end = e + off
        if window_frames is None:
            pieces = [(0, end, None)] if f0 == f1 else [(0, f0 * fs, None), (f0 * fs, end, "mask")]
        else:
            start = max(0, (f0 - window_frames + 1) * fs)
            sinks = min(sink_end, start)
            main = (start, end, None if f0 == f1 else "mask")
            if f0 == f1 and sinks == start:  # sinks adjacent to the window: one range
                main, sinks = (0, end, None), 0
            pieces = [(0, sinks, None), main]
        blocks.append((s, e, [p for p in pieces if p[1] > p[0]]))
    return blocks


def _piece_mask(s, e, off, lo, hi, dtype, device, **mask):
    """Additive [e - s, hi - lo] mask (0 / -inf) of one piece, as the flash kernel takes it
    (cached: building it costs more than a small piece's kernel call; the kernel only
    reads it, and nothing else gets it)."""
    if (e - s) * (hi - lo) > PIECE_MASK_CACHE_MAX:
        return _build_piece_mask(s, e, off, lo, hi, dtype, device, mask)
    return _cached_piece_mask(s, e, off, lo, hi, dtype, torch.device(device), tuple(sorted(mask.items())))


# masks up to this many elements are cached (32 of them at most)
PIECE_MASK_CACHE_MAX = 1 << 18


@functools.lru_cache(maxsize=32)
def _cached_piece_mask(s, e, off, lo, hi, dtype, device, mask):
    with torch.inference_mode(False):  # normal tensors, whatever mode the first caller ran in
        return _build_piece_mask(s, e, off, lo, hi, dtype, device, dict(mask))


def _build_piece_mask(s, e, off, lo, hi, dtype, device, mask):
    vis = visible(torch.arange(off + s, off + e, device=device)[:, None], torch.arange(lo, hi, device=device)[None, :],
                  **mask)
    return torch.zeros(vis.shape, dtype=dtype, device=device).masked_fill_(~vis, float("-inf"))


def _last_dim_contiguous(*ts):
    # the common case (every row already contiguous) returns the tensors as they are,
    # without building a list: this runs on every small CPU call
    if all(t.stride(-1) == 1 for t in ts):
        return ts
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _span(t, lo, hi):
    """``t[:, :, lo:hi]``, or ``t`` itself for its whole length (each view is a dispatched op,
    microseconds that add up on small problems)."""
    return t if lo == 0 and hi == t.shape[2] else t[:, :, lo:hi]


def _attention_fast(q, k, v, frame_size, causal, window_frames, sink_frames, scale, data):
    """The blocked forward: ``(out, lse)`` as df_attention_reference(upcast=True) computes
    them (fp32 scores, softmax and product; fp64 for fp64), on _fast_path_data's ``data``.
    ``lse`` may be a strided view (the kernel's own layout): callers that return it make it
    contiguous."""
    q0, k0, v0 = q, k, v
    q, k, v, bad = data
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    dtype, acc = q.dtype, _acc_dtype(q.dtype)
    flash = _flash_cpu()
    # the kernel reads rows of D as contiguous: other views are copied, once
    if dtype != acc:
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
    q, k, v = _last_dim_contiguous(q, k, v)
    mask = dict(frame_size=frame_size, causal=causal, window_frames=window_frames, sink_frames=sink_frames)
    plan = _plan(Tq, Tk, **mask, work=B * Hq * D)
    outs, lses = [], []
    for s, e, pieces in plan:
        o = l = None
        qb = _span(q, s, e)
        for lo, hi, kind in pieces:
            attn_mask = _piece_mask(s, e, Tk - Tq, lo, hi, acc, q.device, **mask) if kind == "mask" else None
            op, lp = flash(qb, _span(k, lo, hi), _span(v, lo, hi), 0.0, kind == "causal", attn_mask=attn_mask,
                           scale=scale)
            if o is None:
                o, l = op, lp
            else:  # two softmaxes over disjoint keys, merged by their log-sum-exps
                new = torch.logaddexp(l, lp)
                o = o * torch.exp(l - new)[..., None] + op * torch.exp(lp - new)[..., None]
                l = new
        if bad is not None:
            o, l = _reference_rows(o, l, s, e, pieces, bad, q0, k0, v0, scale, mask)
        outs.append(o)
        lses.append(l)
    if len(outs) == 1 and outs[0].dtype == dtype and _bthd_layout(outs[0]):
        return outs[0], lses[0]  # the kernel's result already has the output's layout
    # one concatenation each (not a copy per block): on a shared machine every parallel
    # region can cost a scheduler slice
    result = _empty_bthd(B, Hq, Tq, D, dtype=dtype, device=q.device)
    torch.cat([o.transpose(1, 2) for o in outs], 1, out=result.transpose(1, 2))
    return result, (lses[0] if len(lses) == 1 else torch.cat(lses, 2))


def _sees(s, e, pieces, bad_kv, tq, tk, mask):
    """[B, Hkv, e - s]: which query rows of a block see a key flagged in ``bad_kv``."""
    off = tk - tq
    q_pos = torch.arange(off + s, off + e, device=bad_kv.device)[:, None]
    out = torch.zeros(bad_kv.shape[0], bad_kv.shape[1], e - s, dtype=torch.bool, device=bad_kv.device)
    for lo, hi, _ in pieces:
        vis = visible(q_pos, torch.arange(lo, hi, device=bad_kv.device)[None, :], **mask)
        out |= (vis & bad_kv[:, :, None, lo:hi]).any(-1)
    return out


def _reference_rows(o, l, s, e, pieces, bad, q, k, v, scale, mask):
    """The block's rows that hold a non-finite q or see a non-finite key/value, from the
    reference (the queries are the newest ``e - s`` of the first ``s + Tk - Tq`` keys)."""
    bad_q, bad_kv = bad
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    rows = bad_q[:, :, s:e] | _sees(s, e, pieces, bad_kv, Tq, Tk, mask).repeat_interleave(Hq // Hkv, 1)
    if not bool(rows.any()):
        return o, l
    end = Tk - Tq + e
    ro, rl = df_attention_reference(q[:, :, s:e], k[:, :, :end], v[:, :, :end], scale=scale, upcast=True, **mask)
    return torch.where(rows[..., None], ro.to(o.dtype), o), torch.where(rows, rl.to(l.dtype), l)


# The blocked path first runs on the data as it is and checks its result instead of its
# inputs: reading out and lse once costs less than norms of q, k and v (three reads of
# inputs that may be larger than out, e.g. a KV cache), and only data outside the kernel's
# range can fail it. What can go wrong in the kernel, and what the check sees:
# - a NaN/inf in q, or in a key a row sees: the row's out or lse is NaN/inf;
# - a NaN/inf value behind a mask inside the kernel's key block: 0 * NaN makes rows NaN
#   (checked); every key of a piece is seen by some row, so a non-finite value anywhere in
#   a piece makes some row non-finite, the check fails and the careful path runs;
# - a raw q . k beyond the accumulator's range (the kernel scales after the product): +inf
#   gives NaN; -inf drops a key the reference keeps only if that key's scaled score, at most
#   -max * scale, is within ~100 of the row's lse: an lse above that floor rules it out;
# - value sums beyond the range: inf, or NaN after the rescale.
# A key = -inf component with q . k = -inf for every row seeing it passes (weight 0 in the
# kernel and the reference alike); keys no piece holds are never read.
LSE_FLOOR_MARGIN = 100.0
_F32 = torch.float32
_FLOAT_MAX = {dtype: float(torch.finfo(dtype).max) for dtype in (torch.float32, torch.float64)}  # lse's dtypes


def _dense_span(t):
    """Whether ``t`` ([B, H, T] or [B, H, T, D]) fills one span of memory as [B, H, T, ...]
    or [B, T, H, ...]. The second layout by its strides (aten's lse is [B, T, H] memory, its
    out follows q's): ``transpose`` + ``is_contiguous`` were ~1 us of dispatch each."""
    if t.is_contiguous():
        return True
    shape, stride = t.shape, t.stride()
    if len(shape) == 4:
        B, H, T, D = shape
        sb, sh, st, sd = stride
        return (D == 1 or sd == 1) and (H == 1 or sh == D) and (T == 1 or st == H * D) and (B == 1 or sb == T * H * D)
    if len(shape) == 3:
        B, H, T = shape
        sb, sh, st = stride
        return (H == 1 or sh == 1) and (T == 1 or st == H) and (B == 1 or sb == T * H)
    return t.transpose(1, 2).is_contiguous()


def _accepted(out, lse, scale):
    """max |lse| if the kernel's ``(out, lse)`` pass the check above, else None (one call
    into fastdf._cpu for fp32 results in one span each, else three reductions: on small
    problems each op's dispatch is a measurable share)."""
    mod = _native.cpu_module()
    if (mod is not None and out.dtype is _F32 and lse.dtype is _F32 and out.is_cpu and _dense_span(out)
            and _dense_span(lse)):
        finite, absmax = mod.finite_absmax(out.data_ptr(), out.numel(), lse.data_ptr(), lse.numel())
        return absmax if finite and absmax < _FLOAT_MAX[torch.float32] * scale - LSE_FLOOR_MARGIN else None
    # NaN/inf anywhere; an overflow of a finite sum is a false alarm, safe (detached: out may be
    # the output of a differentiable op, see _attention_dense)
    total = float(out.detach().sum())
    # amax and amin propagate NaN (both are NaN if any is, and max() keeps its first NaN);
    # vector_norm(lse, inf) costs ~3 ns an element on the CPU, the two ~0.2 ns
    absmax = max(float(lse.amax()), -float(lse.amin()))
    # lse >= -absmax: above the floor when absmax is below it (a false alarm only for
    # |lse| ~ max * scale, where scores themselves are near the range's end)
    if math.isfinite(total) and absmax < _FLOAT_MAX[lse.dtype] * scale - LSE_FLOOR_MARGIN:
        return absmax
    return None


def _attention_forward(q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale):
    """``(out, lse, lse_absmax)``: the blocked path on the data as it is where its result
    passes the check (``lse_absmax`` = max |lse| then), else the careful blocked path or the
    reference (``lse_absmax`` None)."""
    if q.is_cpu and q.numel() and (key_padding_mask is None or bool(key_padding_mask.all())):
        if (CPU_KERNEL and _cpu_kernel_fits(q, k)
                and not _dense(q.shape[2], k.shape[2], frame_size, causal, window_frames, sink_frames)):
            result = _attention_cpu_kernel(q, k, v, frame_size, causal, window_frames, sink_frames, scale)
            if result is not None:
                return result
            return (*_attention_cpu_careful(q, k, v, key_padding_mask, frame_size, causal, window_frames,
                                            sink_frames, scale), None)
        if _flash_cpu() is not None:
            out, lse = _attention_fast(q, k, v, frame_size, causal, window_frames, sink_frames, scale,
                                       (q, k, v, None))
            absmax = _accepted(out, lse, scale)
            if absmax is not None:
                return out, lse, absmax
    return (*_attention_careful(q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale),
            None)


@ATTENTION.register("torch")
def _attention_torch(q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale):
    out, lse, _ = _attention_forward(q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale)
    return out, lse.contiguous()


def _attention_careful(q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale):
    """The blocked path with non-finite data zeroed and its rows from the reference, or the
    reference where the norms rule the kernel out (see _fast_path_data)."""
    data = _fast_path_data(q, k, v, key_padding_mask, scale)
    if data is not None:
        return _attention_fast(q, k, v, frame_size, causal, window_frames, sink_frames, scale, data)
    out, lse = df_attention_reference(q, k, v, frame_size=frame_size, causal=causal, window_frames=window_frames,
                                      sink_frames=sink_frames, scale=scale, key_padding_mask=key_padding_mask, upcast=True)
    result = _empty_bthd(*q.shape, dtype=q.dtype, device=q.device)
    result.copy_(out)
    return result, lse.contiguous()


# The backward materialises a block's scores: blocks of _plan are cut into row blocks of at
# most this many rows (and REFERENCE_CHUNK scores), each on the keys its own rows see, so a
# token-causal sequence also skips the keys above the diagonal.
BACKWARD_BLOCK_ROWS = 256


def _backward_plan(heads, tq, tk, frame_size, causal, window_frames, sink_frames):
    """_plan's blocks cut into row blocks: a range not seen whole ends at the last key the
    row block's last row sees (every kind other than None becomes "mask")."""
    off = tk - tq
    fs = frame_size if causal else max(tk, 1)
    out = []
    for s, e, pieces in _plan(tq, tk, frame_size, causal, window_frames, sink_frames):
        keys = sum(hi - lo for lo, hi, _ in pieces)
        rows = max(1, min(BACKWARD_BLOCK_ROWS, REFERENCE_CHUNK // max(1, heads * keys)))
        for s2 in range(s, e, rows):
            e2 = min(e, s2 + rows)
            seen_end = min(tk, ((off + e2 - 1) // fs + 1) * fs)
            cut = [(lo, hi if kind is None else min(hi, seen_end), kind and "mask") for lo, hi, kind in pieces]
            out.append((s2, e2, [p for p in cut if p[1] > p[0]]))
    return out


def _attention_backward_fast(grad_out, grad_lse, q, k, v, frame_size, causal, window_frames, sink_frames, scale):
    """df_attention_backward_reference's arithmetic, block by block of _plan, on the keys
    each block sees (its ranges side by side, a mask only where a range is not seen whole):
    the same stable float32 softmax recomputed, the same masking of non-finite data, so a
    query row's gradients do not depend on keys outside its block's ranges."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    mask = dict(frame_size=frame_size, causal=causal, window_frames=window_frames, sink_frames=sink_frames)
    # finite data (the norms say so, one reduction each) skips the cleaning passes
    clean = all(bool(torch.isfinite(torch.linalg.vector_norm(t, dtype=acc))) for t in (q, k, grad_out))
    k_clean, vf = (k if clean else _finite_or_zero(k)).to(acc), v.to(acc)
    dq = _empty_bthd(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    dk = torch.zeros(B, Hkv, Tk, D, dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    dv_bad = torch.zeros(B, Hkv, Tk, dtype=torch.bool, device=q.device)
    for s, e, pieces in _backward_plan(B * Hq, Tq, Tk, **mask):
        c = e - s
        ranges = [(lo, hi) for lo, hi, _ in pieces]

        def keys(t):
            return t[:, :, ranges[0][0]:ranges[0][1]] if len(ranges) == 1 else torch.cat(
                [t[:, :, lo:hi] for lo, hi in ranges], 2)

        kb, kb_clean, vb = keys(k), keys(k_clean), keys(vf)
        vis = None
        if any(kind is not None for *_, kind in pieces):
            k_pos = torch.cat([torch.arange(lo, hi, device=q.device) for lo, hi in ranges])
            vis = visible(torch.arange(Tk - Tq + s, Tk - Tq + e, device=q.device)[:, None], k_pos[None, :], **mask)
            vis = vis.repeat(G, 1)  # rows of [G * c]: head g's row i is g * c + i
        qc = q[:, :, s:e].reshape(B, Hkv, G * c, D)
        gc = grad_out[:, :, s:e].reshape(B, Hkv, G * c, D).to(acc)
        scores = _scores(qc, kb, scale, acc)
        if vis is not None:
            scores.masked_fill_(~vis, float("-inf"))
        m = scores.amax(-1, keepdim=True)
        p = torch.exp(scores - torch.where(torch.isneginf(m), torch.zeros_like(m), m))
        total = p.sum(-1, keepdim=True)
        p = p / torch.where(total > 0, total, torch.ones_like(total))
        dp = gc @ vb.transpose(-1, -2)
        if vis is not None:
            dp.masked_fill_(~vis, 0.0)
        delta = (p * dp).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta = delta - grad_lse[:, :, s:e].reshape(B, Hkv, G * c, 1).to(acc)
        ds = p * (dp - delta)
        if vis is not None:
            ds.masked_fill_(~vis, 0.0)
        if not clean:
            bad_g = _bad_rows(gc)[..., None]
            sees = (vis & bad_g).any(-2) if vis is not None else bad_g.any(-2).expand(B, Hkv, kb.shape[2])
            qc, gc = _finite_or_zero(qc), _finite_or_zero(gc)
        dq[:, :, s:e] = (ds @ kb_clean * scale).view(B, Hq, c, D)
        dk_b = ds.transpose(-1, -2) @ qc.to(acc) * scale
        dv_b = p.transpose(-1, -2) @ gc
        at = 0
        for lo, hi in ranges:
            dk[:, :, lo:hi] += dk_b[:, :, at:at + hi - lo]
            dv[:, :, lo:hi] += dv_b[:, :, at:at + hi - lo]
            if not clean:
                dv_bad[:, :, lo:hi] |= sees[:, :, at:at + hi - lo]
            at += hi - lo
    if not clean:
        dv = dv.masked_fill(dv_bad[..., None], float("nan"))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# aten's flash backward recomputes P = exp(s - lse) from the forward's float32 lse, whose
# rounding, ulp(|lse|), P inherits: within plain PyTorch's error (the 2x rule) for |lse| up
# to about this; beyond, fastdf._cpu's kernel (it recomputes such rows' max and sum) or the
# blocked recompute (a stable softmax). Measured on 128-key dense heads (D = 32, scores of
# std 4-25): gradients left the rule from max |lse| ~17 on (this was 100 until then).
FLASH_BACKWARD_MAX_LSE = 16.0


def _affected(q, k, v, grad_out, blocks, mask):
    """``(rows [B, Hq, Tq], keys [B, Hkv, Tk])``: query rows that hold a non-finite q or
    upstream gradient or see a non-finite key/value, and the keys such rows see."""
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    bad_kv = _bad_rows(k) | _bad_rows(v)
    rows = _bad_rows(q) | _bad_rows(grad_out)
    for s, e, pieces in blocks:
        rows[:, :, s:e] |= _sees(s, e, pieces, bad_kv, Tq, Tk, mask).repeat_interleave(Hq // Hkv, 1)
    keys = _sees_keys(rows.reshape(B, Hkv, Hq // Hkv, Tq).any(2), blocks, Tq, Tk, mask)
    return rows, keys


def _sees_keys(rows, blocks, tq, tk, mask):
    """[B, Hkv, Tk]: keys seen by a query row flagged in ``rows`` [B, Hkv, Tq]."""
    keys = torch.zeros(rows.shape[0], rows.shape[1], tk, dtype=torch.bool, device=rows.device)
    off = tk - tq
    for s, e, pieces in blocks:
        q_pos = torch.arange(off + s, off + e, device=rows.device)[:, None]
        for lo, hi, _ in pieces:
            vis = visible(q_pos, torch.arange(lo, hi, device=rows.device)[None, :], **mask)
            keys[:, :, lo:hi] |= (vis & rows[:, :, s:e, None]).any(-2)
    return keys


_CPU = torch.device("cpu")


def _one_key_rows(tq, tk, frame_size, causal, window_frames, sink_frames, device):
    """Positions (query indices) of the rows that see exactly one key, and that key
    (cached: callers only read them)."""
    return _cached_one_key_rows(tq, tk, frame_size, causal, window_frames, sink_frames, torch.device(device))[:2]


@functools.lru_cache(maxsize=64)
def _cached_one_key_rows(tq, tk, frame_size, causal, window_frames, sink_frames, device):
    """``(rows, keys, span)``: _build_one_key_rows' tensors and, where the rows are
    ``r0..r1-1`` and their keys ``k0..k0+r1-r0-1`` (token-causal: row 0 and key 0), ``span =
    (r0, r1, k0)`` for slices instead of index ops (each index op costs ~10-20 us on the
    CPU), else None."""
    with torch.inference_mode(False):  # normal tensors, whatever mode the first caller ran in
        rows, keys = _build_one_key_rows(tq, tk, frame_size, causal, window_frames, sink_frames, device)
    span = None
    if rows.numel():
        r, k = rows.tolist(), keys.tolist()
        if r == list(range(r[0], r[0] + len(r))) and k == list(range(k[0], k[0] + len(k))):
            span = (r[0], r[0] + len(r), k[0])
    return rows, keys, span


def _build_one_key_rows(tq, tk, frame_size, causal, window_frames, sink_frames, device):
    fs, off = frame_size, tk - tq
    # one key is only possible with one-token frames or a one-token last frame (cheap to
    # rule out here, on the host, before any tensor op)
    if not causal:
        fs, window_frames = max(tk, 1), None  # one frame of every key
    if (fs > 1 and tk % fs != 1) or (window_frames is None and (fs > 1 or off > 0) and tk != 1):
        none = torch.zeros(0, dtype=torch.long, device=device)
        return none, none
    f = torch.arange(tq, device=device).add_(off).div_(fs, rounding_mode="floor")
    end = ((f + 1) * fs).clamp_(max=tk)
    if window_frames is None:
        count = end
    else:
        start = ((f - window_frames + 1) * fs).clamp_(min=0)
        count = end - start + start.clamp(max=min(sink_frames * fs, tk))
    rows = (count == 1).nonzero().flatten()
    return rows, f[rows] * fs


def _flash_backward_pieces(grad_out, q, k, v, out, lse, plan, mask, scale):
    """``(dq, dk, dv)`` from the flash kernel's backward on each piece of ``plan``, each given
    the whole row's out and lse, so each piece's share is exact (rows [B, H, T, D] with the
    last dim contiguous). One piece over every row and key is one call, its results as
    they are."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    bwd = _flash_cpu_backward()
    if len(plan) == 1 and len(plan[0][2]) == 1 and plan[0][2][0][:2] == (0, Tk):
        kind = plan[0][2][0][2]
        attn_mask = _piece_mask(0, Tq, Tk - Tq, 0, Tk, q.dtype, q.device, **mask) if kind == "mask" else None
        return bwd(grad_out, q, k, v, out, lse, 0.0, kind == "causal", attn_mask=attn_mask, scale=scale)
    dqs = []
    dk = _empty_bthd(*k.shape, dtype=k.dtype, device=k.device).zero_()
    dv = _empty_bthd(*v.shape, dtype=v.dtype, device=v.device).zero_()
    for s, e, pieces in plan:
        dq = None
        for lo, hi, kind in pieces:
            attn_mask = _piece_mask(s, e, Tk - Tq, lo, hi, q.dtype, q.device, **mask) if kind == "mask" else None
            dq_p, dk_p, dv_p = bwd(grad_out[:, :, s:e], q[:, :, s:e], k[:, :, lo:hi], v[:, :, lo:hi], out[:, :, s:e],
                                   lse[:, :, s:e], 0.0, kind == "causal", attn_mask=attn_mask, scale=scale)
            dq = dq_p if dq is None else dq + dq_p
            dk[:, :, lo:hi] += dk_p
            dv[:, :, lo:hi] += dv_p
        dqs.append(dq)
    if len(dqs) == 1 and _bthd_layout(dqs[0]):
        return dqs[0], dk, dv
    result = _empty_bthd(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    torch.cat([d.transpose(1, 2) for d in dqs], 1, out=result.transpose(1, 2))
    return result, dk, dv


def _attention_backward_raw(grad_out, q, k, v, out, lse, frame_size, causal, window_frames, sink_frames, scale):
    """The flash kernel's backward on the data as it is, checked by its result: ``(dq, dk,
    dv)``, or None where dq is not finite (the careful path then runs).

    Callers make sure the forward's out is finite (so every value of every piece is: each
    is seen by some row) and |lse| <= FLASH_BACKWARD_MAX_LSE. What is left reaches dq: a
    NaN/inf dO of a row makes its dq NaN (its dP against any key it sees), as does a key
    with a non-finite component (q . k = +inf or NaN: P NaN; -inf: P = 0 times the key).
    On small problems this path's host work is a visible share of the call (issue 11), so
    it runs as few tensor ops as it can: slices where index ops would do."""
    mask = dict(frame_size=frame_size, causal=causal, window_frames=window_frames, sink_frames=sink_frames)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    plan = _plan(Tq, Tk, **mask, work=B * Hq * D)
    # A row that sees one key has P = 1 exactly: zero dq and dk, and its dO goes to that
    # key's dV as it is (the reference's stable softmax gives that bitwise, exp(s - lse)
    # nearly). An lse of +inf makes the kernel's P = exp(s - lse) exactly 0 for that row,
    # bitwise what the careful path's dO = 0 gives, at the cost of a copy of lse, not of dO.
    one_rows, one_keys, span = _cached_one_key_rows(Tq, Tk, frame_size, causal, window_frames, sink_frames,
                                                    _CPU if q.is_cpu else q.device)
    if one_rows.numel():
        lse = lse.index_fill(2, one_rows, math.inf)
    grad_out, q, k, v, out = _last_dim_contiguous(grad_out, q, k, v, out)
    dq, dk, dv = _flash_backward_pieces(grad_out, q, k, v, out, lse, plan, mask, scale)
    # Where every row sees every key (one unmasked call) nothing non-finite can cross a mask,
    # so aten's values stand, as on the eager path's autograd node (see _attention_dense);
    # elsewhere a non-finite dq sends the call to the careful path (an overflow of a finite
    # sum is a false alarm, safe).
    if not _dense(Tq, Tk, **mask) and not math.isfinite(float(dq.sum())):
        return None
    if span is not None:
        r0, r1, k0 = span
        one_grad = grad_out[:, :, r0:r1]
        if Hq != Hkv:
            one_grad = one_grad.reshape(B, Hkv, Hq // Hkv, r1 - r0, D).sum(2)
        dv[:, :, k0:k0 + r1 - r0] += one_grad
    elif one_rows.numel():
        one_grad = grad_out[:, :, one_rows]
        dv.index_add_(2, one_keys, one_grad if Hq == Hkv else one_grad.reshape(B, Hkv, Hq // Hkv, -1, D).sum(2))
    return dq, dk, dv


def _attention_backward_flash(grad_out, q, k, v, out, lse, frame_size, causal, window_frames, sink_frames, scale,
                              lse_absmax=None):
    """The CPU flash kernel's backward on _plan's pieces, each given the whole row's out and
    lse (so each piece's share is exact), or None where it cannot match the reference.

    First on the data as it is (fastdf._cpu's kernel, or _attention_backward_raw) where the
    forward's out is finite (``lse_absmax`` given: the eager forward checked it; else read
    here) and, for aten's kernel, |lse| is in range. Otherwise, and where that fails,
    non-finite data: zeroed for the kernel (a NaN
    behind a mask would spread through its 0 * NaN), the affected rows' gradients zeroed,
    and their dq and the dk/dv of the keys they see taken from the reference; everything
    else is bitwise that of clean data."""
    if lse_absmax is None and math.isfinite(float(out.sum())):
        lse_absmax = float(torch.linalg.vector_norm(lse, float("inf")))
    mask = dict(frame_size=frame_size, causal=causal, window_frames=window_frames, sink_frames=sink_frames)
    kernel = _cpu_kernel_backward(q, k, out, lse, mask,
                                  sharp=lse_absmax is None or lse_absmax > FLASH_BACKWARD_MAX_LSE)
    # fastdf._cpu's backward recomputes the max and sum of rows with |lse| beyond the bound
    # (aten's uses exp(s - lse) everywhere, which loses accuracy there)
    if lse_absmax is not None and (kernel or lse_absmax <= FLASH_BACKWARD_MAX_LSE):
        if kernel:
            grads = _attention_backward_cpu_kernel(grad_out, q, k, v, out, lse, scale=scale, **mask)
        else:
            grads = _attention_backward_raw(grad_out, q, k, v, out, lse, frame_size, causal, window_frames,
                                            sink_frames, scale)
        if grads is not None:
            return grads
    data = _fast_path_data(q, k, v, None, scale)
    if data is None:
        return None
    (qf, kf, vf), bad = (t if t.stride(-1) == 1 else t.contiguous() for t in data[:3]), data[3]
    finite_lse = None
    if not kernel and not float(torch.linalg.vector_norm(lse, float("inf"))) <= FLASH_BACKWARD_MAX_LSE:
        finite_lse = torch.isfinite(lse)
        if bool((lse.abs() > FLASH_BACKWARD_MAX_LSE).logical_and_(finite_lse).any()):
            return None
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    plan = _plan(Tq, Tk, **mask, work=B * Hq * D)
    grad_in, rows = grad_out, None
    if bad is not None or not bool(torch.isfinite(torch.linalg.vector_norm(grad_out))):
        rows, keys = _affected(q, k, v, grad_out, plan, mask)
        grad_out = _finite_or_zero(grad_out).masked_fill(rows[..., None], 0.0)
        out, lse = _finite_or_zero(out), _finite_or_zero(lse)
    if kernel:  # on the zeroed data: the rows and keys that none of it reaches keep their bits
        grads = _attention_backward_cpu_kernel(grad_out, qf, kf, vf, out, lse, scale=scale, **mask)
        if grads is None:
            return None
        result, dk, dv = grads
        return _patch_affected(result, dk, dv, rows, keys if rows is not None else None, grad_in, q, k, v, scale,
                               mask)
    # A row that sees one key has P = 1 exactly: zero dq and dk, and its dO goes to that
    # key's dV as it is (the reference's stable softmax gives that bitwise, exp(s - lse)
    # nearly). Such rows run with dO = 0 and are added below.
    one_rows, one_keys = _one_key_rows(Tq, Tk, **mask, device=q.device)
    if one_rows.numel():
        one_grad = grad_out[:, :, one_rows]
        grad_out = grad_out.index_fill(2, one_rows, 0.0)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    result, dk, dv = _flash_backward_pieces(grad_out, qf, kf, vf, out, lse, plan, mask, scale)
    if one_rows.numel():
        Hkv = k.shape[1]
        dv.index_add_(2, one_keys, one_grad.reshape(B, Hkv, Hq // Hkv, -1, D).sum(2))
    return _patch_affected(result, dk, dv, rows, keys if rows is not None else None, grad_in, q, k, v, scale, mask)


def _patch_affected(dq, dk, dv, rows, keys, grad_out, q, k, v, scale, mask):
    """The reference's dq of ``rows`` and dk/dv of ``keys`` (those non-finite data reaches)."""
    if rows is not None and bool(rows.any()):
        rq, rk, rv = df_attention_backward_reference(grad_out, None, q, k, v, None, None, scale=scale, **mask)
        dq.copy_(torch.where(rows[..., None], rq, dq))
        dk.copy_(torch.where(keys[..., None], rk, dk))
        dv.copy_(torch.where(keys[..., None], rv, dv))
    return dq, dk, dv


@ATTENTION_BACKWARD.register("torch")
def _attention_backward_torch(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, frame_size, causal, window_frames,
                              sink_frames, scale, *, lse_absmax=None):
    """The torch backward (``lse_absmax``: max |lse| from an eager forward whose result
    passed the check, see _attention_forward; None reads what it needs from out and lse)."""
    grads = None
    if q.numel() and (key_padding_mask is None or bool(key_padding_mask.all())):
        if (q.dtype in (torch.float32, torch.float64) and out.dtype == q.dtype
                and (grad_lse is None or not bool(grad_lse.any()))):
            grads = _attention_backward_flash(grad_out, q, k, v, out, lse, frame_size, causal, window_frames,
                                              sink_frames, scale, lse_absmax)
        if grads is None:
            grads = _attention_backward_fast(grad_out, grad_lse, q, k, v, frame_size, causal, window_frames,
                                             sink_frames, scale)
    else:
        grads = df_attention_backward_reference(grad_out, grad_lse, q, k, v, out, lse, frame_size=frame_size,
                                                causal=causal, window_frames=window_frames, sink_frames=sink_frames,
                                                scale=scale, key_padding_mask=key_padding_mask)
    results = []
    for g, like in zip(grads, (q, k, v)):
        if g.dtype == like.dtype and _bthd_layout(g):
            results.append(g)
            continue
        r = _empty_bthd(*like.shape, dtype=like.dtype, device=like.device)
        r.copy_(g)
        results.append(r)
    return tuple(results)


def _triton_supports(q, *tensors):
    if q.dtype not in _checks.FLOAT_DTYPES:
        return f"the triton kernels take float32/float16/bfloat16, got {str(q.dtype).removeprefix('torch.')}"
    if q.shape[-1] > 256:
        return f"the triton kernels take head dims up to 256, got {q.shape[-1]}"
    for t in (q, *tensors):
        # Offsets inside one batch row are int32 in the kernels (the batch offset is int64).
        if isinstance(t, Tensor) and t.dim() == 4:
            if sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) >= 2**31:
                return f"one batch row of a {tuple(t.shape)} tensor spans more than 2**31 elements"
    return None


@ATTENTION.register("triton", supports=_triton_supports)
def _attention_triton(q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale):
    from fastdf.kernels.attention import attention_forward

    B, Hq, Tq, D = q.shape
    out = _empty_bthd(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    lse = _alloc.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    if out.numel():
        attention_forward(q, k, v, out, lse, _mask_args(q, k, frame_size, causal, window_frames, sink_frames), scale,
                          key_padding_mask)
    return out, lse


@ATTENTION_BACKWARD.register("triton", supports=lambda grad_out, grad_lse, q, k, v, out, *_:
                             _triton_supports(q, k, v, grad_out, out))
def _attention_backward_triton(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, frame_size, causal, window_frames,
                               sink_frames, scale):
    from fastdf.kernels.attention import attention_backward

    dq = _empty_bthd(*q.shape, dtype=q.dtype, device=q.device)
    dk = _empty_bthd(*k.shape, dtype=k.dtype, device=k.device)
    dv = _empty_bthd(*v.shape, dtype=v.dtype, device=v.device)
    if q.numel():
        attention_backward(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv,
                           _mask_args(q, k, frame_size, causal, window_frames, sink_frames), scale, key_padding_mask)
    elif k.numel():
        dk.zero_()
        dv.zero_()
    return dq, dk, dv


def _mask_args(q, k, frame_size, causal, window_frames, sink_frames):
    """The mask in the kernels' terms: ``(frame_size, window or None, sink_end)``.

    ``causal=False`` is one frame spanning every key; a frame longer than the keys is the
    same; a window covering every frame is no window (which also keeps the kernels' int32
    position arithmetic in range)."""
    tk = k.shape[2]
    fs = max(tk, 1) if not causal else min(frame_size, max(tk, 1))
    frames = -(-tk // fs)
    window = window_frames if causal and window_frames is not None and window_frames < frames else None
    sink_end = min(sink_frames * fs, tk) if window is not None else 0
    return fs, window, sink_end


# ---------------------------------------------------------------------------- custom ops


@custom_op(ATTENTION)
def _attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, frame_size: int, causal: bool,
                  window_frames: int | None, sink_frames: int, scale: float) -> tuple[Tensor, Tensor]:
    ...


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale):
    B, Hq, Tq, D = q.shape
    out = q.new_empty((B, Tq, Hq, D)).transpose(1, 2)
    return out, q.new_empty((B, Hq, Tq), dtype=_lse_dtype(q.dtype))


@custom_op(ATTENTION_BACKWARD)
def _attention_backward_op(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                           lse: Tensor, key_padding_mask: Tensor | None, frame_size: int, causal: bool,
                           window_frames: int | None, sink_frames: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    ...


@_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale):
    def like(t):
        B, H, T, D = t.shape
        return t.new_empty((B, T, H, D)).transpose(1, 2)

    return like(q), like(k), like(v)


def _setup(ctx, inputs, output):
    q, k, v, key_padding_mask, *ctx.mask = inputs
    ctx.save_for_backward(q, k, v, key_padding_mask, *output)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, *ctx.mask)
    return dq, dk, dv, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------- eager path
# The custom op's Python dispatch (schema handling, its autograd wrapper, backend
# selection) costs about 50-70 us a call on the CPU, as much as a whole small SDPA call
# (issue 11). Where the torch backend would run and nothing traces, df_attention calls the
# torch backend's forward directly, and the same backward functions through a plain
# autograd.Function: the same numbers bitwise, without the dispatch.


def _eager_forward(*args):
    """The eager path's forward: _attention_forward (its own name, so tests can tell the
    eager path's calls from the custom op's)."""
    return _attention_forward(*args)


class _AttentionEager(torch.autograd.Function):
    # Unused outputs get None, not zeros (the custom op's wrapper materialises them): the
    # torch backward treats a None and a zero lse gradient alike, bitwise, and a zero dO
    # is made here for the rare lse-only loss.

    @staticmethod
    def forward(ctx, need_lse, q, k, v, key_padding_mask, *mask):
        out, lse, ctx.lse_absmax = _eager_forward(q, k, v, key_padding_mask, *mask)
        ctx.mask = mask
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
        return out, (lse.contiguous() if need_lse else lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        # once_differentiable's wrapper (a no_grad block, ~25 us on a small CPU call) is only
        # needed when a graph is being built (create_graph=True): then double backward must
        # raise, as the custom op's does
        if torch.is_grad_enabled():
            return _eager_backward_once(ctx, grad_out, grad_lse)
        return _eager_backward(ctx, grad_out, grad_lse)


def _eager_backward(ctx, grad_out, grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    args = (grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, *ctx.mask)
    # the backend is read when the backward runs, as the custom op's backward does
    if torch_backend_eager(_CPU if q.is_cpu else q.device) and plain_tensors(grad_out, grad_lse):
        dq, dk, dv = _attention_backward_torch(*args, lse_absmax=ctx.lse_absmax)
    else:
        if grad_lse is None:
            grad_lse = torch.zeros_like(lse)
        dq, dk, dv = _attention_backward_op(*args[:1], grad_lse, *args[2:])
    return (None, dq, dk, dv) + (None,) * (1 + len(ctx.mask))


_eager_backward_once = torch.autograd.function.once_differentiable(_eager_backward)


def _attention_dense(q, k, v, scale):
    """The eager path where every row sees all of >= CPU_KERNEL_DENSE_KEYS keys of nonempty
    CPU tensors in _DENSE_DTYPES (the caller knows: :func:`_check_dense`, remembered with the
    argument checks) and no lse is returned:
    aten's CPU flash kernel on the tensors as they are, as a differentiable op, so autograd
    records aten's own backward node. Bitwise what the torch backend gives there (its
    forward's and its backward's single unmasked flash call). ``(out, lse)``, or None where
    the route does not apply, the result fails _accepted's check, or a backward will run
    with |lse| > FLASH_BACKWARD_MAX_LSE (that backward recomputes a stable softmax)."""
    # _bthd_layout and _accepted's common case written out: each Python call is ~1-2 us here
    # when the caches are cold (case c of the CPU bench: ~130 us a call between other
    # providers, ~80 us hot), and this route is the whole call
    if not (q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1):  # strides are not in the key
        return None
    flash = _flash_cpu()
    if flash is None:
        return None
    out, lse = flash(q, k, v, scale=scale)
    B, H, T, D = out.shape
    bthd = out.stride() == (T * H * D, D, H * D, 1)
    mod = _native.cpu_module()
    if (mod is not None and bthd and out.dtype is _F32 and lse.dtype is _F32
            and lse.stride() in ((T * H, 1, H), (H * T, T, 1))):  # aten's fp32 layouts: one span each
        finite, absmax = mod.finite_absmax(out.data_ptr(), out.numel(), lse.data_ptr(), lse.numel())
        if not (finite and absmax < _FLOAT_MAX[_F32] * scale - LSE_FLOOR_MARGIN):
            return None
    else:
        absmax = _accepted(out, lse, scale)
        if absmax is None:
            return None
    if absmax > FLASH_BACKWARD_MAX_LSE and out.requires_grad:
        return None
    if not (bthd or _bthd_layout(out)):  # aten's out follows q's layout: the documented one is [B, T, H, D]
        out = out.transpose(1, 2).contiguous().transpose(1, 2)  # differentiable, as the torch backend's copy
    return out, lse


_DENSE_DTYPES = (torch.float32, torch.float64)


def _attention(q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale, need_lse=True):
    """``(out, lse)`` of checked arguments: the eager path where it may run, else the op.
    With ``need_lse`` False the eager path may return lse as a strided view (the kernel's
    layout), saving a copy nobody reads. (df_attention tries :func:`_attention_dense` first.)"""
    if q.is_cpu:  # the same rule in fewer calls: each is microseconds beside a small CPU call
        eager = (cpu_kernel_route() and type(q) in PLAIN and type(k) in PLAIN and type(v) in PLAIN
                 and (key_padding_mask is None or type(key_padding_mask) in PLAIN))
    else:
        eager = torch_backend_eager(q.device) and plain_tensors(q, k, v, key_padding_mask)
    args = (q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale)
    if not eager:
        return _attention_op(*args)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _AttentionEager.apply(need_lse, *args)
    out, lse, _ = _eager_forward(*args)
    return out, (lse.contiguous() if need_lse else lse)


# ---------------------------------------------------------------------------- public


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).smallest_normal)


def check_scale(name: str, scale, head_dim: int) -> float:
    """The softmax scale as a float: ``head_dim ** -0.5`` for None, else a finite number
    > 0 that float32 represents as a normal number with ``scale * log2(e)`` finite (the
    kernels fold log2(e) into it)."""
    if scale is None:
        return float(head_dim ** -0.5)
    scale = _checks.finite_float(name, scale, low=0, low_open=True, dtype=torch.float32)
    if not FLOAT32_TINY <= scale <= FLOAT32_MAX / 1.4426950408889634:
        raise ValueError(f"{name} must be representable in float32 after folding in log2(e) (between "
                         f"{FLOAT32_TINY:.3g} and {FLOAT32_MAX / 1.4426950408889634:.3g}), got {scale}")
    return scale


def _normalise_mask(tk, frame_size, causal, window_frames, sink_frames):
    """The same rule with every knob within the sequence: a frame longer than the keys is
    one frame of Tk; a window (or sinks) covering every frame is no window. So any Python
    int is legal (10**30 included), and the op schema's int64 always holds the result."""
    if not causal:
        return min(frame_size, max(tk, 1)), None, 0
    frame_size = min(frame_size, max(tk, 1))
    frames = -(-tk // frame_size)
    if window_frames is not None and (window_frames >= frames or sink_frames >= frames):
        window_frames = None
    if window_frames is None:
        sink_frames = 0
    return frame_size, window_frames, sink_frames


# Arguments that passed _check, by everything the checks read (types included: True must
# not pass for 1, nor a tensor subclass for a tensor), with _check's result: the checks cost
# about 10 us a call, several percent of a small attention call on the CPU. Eager calls only
# (a compiler traces the checks themselves).
_CHECKED: dict = {}
_CHECKED_MAX = 256


def _check_cached(q, k, v, frame_size, causal, window_frames, sink_frames, scale, return_lse, compiling):
    """:func:`_check` and :func:`_dense` of its normalised mask, remembered for arguments that
    passed it before (``compiling``: torch.compiler.is_compiling(), nothing remembered)."""
    if compiling:  # the op runs (the eager route is off): no dense test to trace
        return (*_check(q, k, v, frame_size, causal, window_frames, sink_frames, scale, return_lse), False)
    try:
        key = (type(q), type(k), type(v), q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, q.shape, k.shape,
               v.shape, type(frame_size), frame_size, type(causal), causal, type(window_frames), window_frames,
               type(sink_frames), sink_frames, type(scale), scale, type(return_lse), return_lse)
        result = _CHECKED.get(key)  # hashes the key once
    except (AttributeError, TypeError):  # not tensors, or unhashable knobs: the checks say what is wrong
        return _check_dense(q, k, v, frame_size, causal, window_frames, sink_frames, scale, return_lse)
    if result is None:
        result = _check_dense(q, k, v, frame_size, causal, window_frames, sink_frames, scale, return_lse)
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = result
    return result


def _check_dense(q, k, v, frame_size, causal, window_frames, sink_frames, scale, return_lse):
    """``(*_check(...), dense)``: whether :func:`_attention_dense` may take the call as far
    as the cache key tells (nonempty CPU tensors of a dtype it runs, every row seeing all of
    >= CPU_KERNEL_DENSE_KEYS keys), so those tests run once per key, not per call."""
    frame_size, window_frames, sink_frames, scale = _check(q, k, v, frame_size, causal, window_frames, sink_frames,
                                                           scale, return_lse)
    dense = (q.is_cpu and q.dtype in _DENSE_DTYPES and q.numel() > 0
             and _dense(q.shape[2], k.shape[2], frame_size, causal, window_frames, sink_frames))
    return frame_size, window_frames, sink_frames, scale, dense


def _check(q, k, v, frame_size, causal, window_frames, sink_frames, scale, return_lse):
    """Validate the arguments of df_attention; returns ``(frame_size, window_frames,
    sink_frames, scale)`` normalised (see _normalise_mask, check_scale)."""
    dtypes = _checks.FLOAT_DTYPES + (torch.float64,)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, ndim=4, dtypes=dtypes)
    _checks.same_dtype(q=q, k=k, v=v)
    _checks.same_device(q=q, k=k, v=v)
    B, Hq, Tq, D = q.shape
    if D == 0:
        raise ValueError(f"q must have a head dim (last dim) >= 1, got shape {tuple(q.shape)}")
    if Hq == 0:
        raise ValueError(f"q must have at least one head (dim 1), got shape {tuple(q.shape)}")
    _checks.shape("k", k, (B, None, None, D), what="([B, Hkv, Tk, D] with q's B and D)")
    _checks.shape("v", v, tuple(k.shape), what="(the shape of k)")
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hkv == 0:
        raise ValueError(f"k must have at least one head (dim 1), got shape {tuple(k.shape)}")
    if Hq % Hkv:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's heads ({Hkv}) (GQA/MQA: Hq % Hkv == 0)")
    if Tq > Tk:
        raise ValueError(f"q has more tokens ({Tq}) than k ({Tk}): Tq must be <= Tk (queries are the newest tokens)")
    _checks.number("frame_size", frame_size, low=1, integer=True)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window_frames is not None:
        _checks.number("window_frames", window_frames, low=1, integer=True)
        if not causal:
            raise ValueError("window_frames needs causal=True (without causality every key is visible)")
    _checks.number("sink_frames", sink_frames, low=0, integer=True)
    if sink_frames and not causal:
        raise ValueError("sink_frames needs causal=True (without causality every key is visible)")
    scale = check_scale("scale", scale, D)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return (*_normalise_mask(Tk, frame_size, causal, window_frames, sink_frames), scale)


def _check_key_padding_mask(key_padding_mask, q, k):
    """Check a given mask: bool [B, Tk] on q's device (any strides, views welcome)."""
    _checks.tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
    _checks.shape("key_padding_mask", key_padding_mask, (q.shape[0], k.shape[2]), what="([B, Tk] with q's B and k's Tk)")
    _checks.same_device(q=q, key_padding_mask=key_padding_mask)


def df_attention(q: Tensor, k: Tensor, v: Tensor, *, frame_size: int = 1, causal: bool = True,
                 window_frames: int | None = None, sink_frames: int = 0, scale: float | None = None,
                 return_lse: bool = False, key_padding_mask: Tensor | None = None):
    """Frame-causal attention with KV cache, sliding window and sink frames.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` with ``Tq <= Tk`` and
            ``Hq % Hkv == 0`` (GQA/MQA: query head h reads K/V head ``h // (Hq // Hkv)``,
            nothing is repeated in memory). float32, float16 or bfloat16 (float64 on the
            torch backend), all one dtype and device; any strides, e.g. ``[B, T, H, D]``
            storage viewed as ``[B, H, T, D]``.
        frame_size: tokens per frame; query i sits at absolute position
            ``p = Tk - Tq + i`` and ``frame(x) = x // frame_size``. 1 = token-causal.
            Any positive int; one longer than the sequence makes it one frame.
        causal: key j is visible to p iff ``frame(j) <= frame(p)`` and the window rule
            holds. False: every key is visible (window and sinks are then an error).
        window_frames: keep only keys with ``frame(p) - frame(j) < window_frames``
            (None: unlimited; a window covering every frame, e.g. 10**30, is no window)...
        sink_frames: ...except keys with ``frame(j) < sink_frames``, always visible.
        scale: score scale, default ``D ** -0.5``; a finite number > 0 representable in
            float32 (ValueError otherwise).
        return_lse: also return the log-sum-exp of the visible scaled scores.
        key_padding_mask: optional bool ``[B, Tk]``, True = a real key (any strides, e.g.
            an expanded or sliced view). ANDed with the rule above: a False key is seen by
            no query of that batch row. Rows left with no visible key give zeros and
            lse = -inf (and zero gradients). Holes, left/right padding, whole-False rows
            all work; key tiles of real keys only run exactly the unpadded code path.

    Returns:
        ``out`` ``[B, Hq, Tq, D]`` in q's dtype (memory laid out as ``[B, Tq, Hq, D]``, so
        ``out.transpose(1, 2).reshape(B, Tq, Hq * D)`` is free), and with ``return_lse``
        also ``lse`` ``[B, Hq, Tq]`` float32, natural log. Differentiable in q, k, v (and
        through lse).

    Range: scores are computed in float32 (fp64 on the torch backend for fp64 inputs) and
    masked with -inf, so the forward meets the 2x-torch-error rule for any inputs whose
    scaled scores ``scale * q . k`` (and, on the triton backend, the raw ``q . k``) are
    finite in float32, however negative (-3e38 works), and any finite v up to the dtype's
    maximum. Backward: the torch backend recomputes a stable float32 softmax wherever
    ``|lse| > 16`` (and for fp16/bf16 or a gradient through lse), so its gradients are as
    exact as plain PyTorch's over the same range (below that, on CPU tensors, it uses the
    CPU flash kernel's ``exp(s - lse)``, measured within the rule there; fastdf._cpu's
    kernel, fp32 heads of up to 512 keys, recomputes each row's max and sum itself wherever
    ``|lse| > 16``, at any ``|lse|``); the triton backend
    recomputes probabilities as ``exp(s - lse)`` (as FlashAttention does), whose relative
    error grows with ``|lse| * 2**-24``: in float32 its gradients left the 2x rule from
    max ``|lse|`` ~85 on (peaky rows; measured under the Triton interpreter, 64 keys; bf16
    and fp16 not measured on a GPU), and far beyond (|scores| ~ 1e30) its dk/dv are wrong.

    Causality under non-finite data (both backends, forward and backward): a NaN or inf in
    a key or value that a query cannot see never reaches that query's output, lse or dq,
    and a non-finite q or upstream gradient of a query never reaches the dk/dv of keys it
    cannot see. A query that sees a non-finite key or value gets NaN (or inf). Note that
    a query whose output is not used (zero upstream gradient) still passes its NaN
    probabilities to the dk/dv of the keys it does see (0 * NaN), as in PyTorch. Where
    every query sees every key, the torch backend's gradients of a non-finite upstream
    gradient are non-finite where plain autograd's are (an inf reaches dv as inf).
    """
    compiling = _is_compiling()
    frame_size, window_frames, sink_frames, scale, dense = _check_cached(q, k, v, frame_size, causal, window_frames,
                                                                         sink_frames, scale, return_lse, compiling)
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, q, k)
    elif (dense and not return_lse and cpu_kernel_route(compiling) and type(q) in PLAIN and type(k) in PLAIN
          and type(v) in PLAIN):  # dense: CPU tensors (_check_dense)
        # every row sees every key: aten's kernel as it is (the rest of the eager path's rule
        # in _attention, here so that the dense call is a few Python lines end to end)
        result = _attention_dense(q, k, v, scale)
        if result is not None:
            return result[0]
    out, lse = _attention(q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale, return_lse)
    return (out, lse) if return_lse else out


def df_attention_padded(q: Tensor, k: Tensor, v: Tensor, key_start: Tensor, *, frame_size: int = 1,
                        causal: bool = True, window_frames: int | None = None, sink_frames: int = 0,
                        scale: float | None = None, return_lse: bool = False):
    """:func:`df_attention` for left-padded batches: in batch row b the keys before
    ``key_start[b]`` (an int tensor ``[B]``) are invisible (padding), everything else is as
    in df_attention (positions still count from key 0). Query rows that see no key at all
    (padding queries) give zeros and lse = -inf. Values outside ``[0, Tk]`` are clamped.

    A thin alias: it is ``df_attention(..., key_padding_mask=arange(Tk) >= key_start[:, None])``
    (one kernel mechanism; the kernels skip the padding tiles either way)."""
    frame_size, window_frames, sink_frames, scale = _check(q, k, v, frame_size, causal, window_frames, sink_frames,
                                                           scale, return_lse)
    _checks.tensor("key_start", key_start, ndim=1, dtypes=(torch.int32, torch.int64))
    _checks.shape("key_start", key_start, (q.shape[0],), what="([B] with q's B)")
    _checks.same_device(q=q, key_start=key_start)
    # clamped in its own dtype before the int32 cast, so 2**32 + 1 cannot wrap to 1
    key_start = key_start.clamp(0, k.shape[2])
    key_padding_mask = torch.arange(k.shape[2], device=key_start.device) >= key_start[:, None]
    out, lse = _attention(q, k, v, key_padding_mask, frame_size, causal, window_frames, sink_frames, scale, return_lse)
    return (out, lse) if return_lse else out

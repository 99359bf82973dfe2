"""Triton kernels for the routed-experts layer around the grouped GEMMs: the weighted
combine back to tokens and the fused activation backward.

The gather into expert order and the activation forward live in the grouped GEMM itself
(row-index prologue, GLU epilogue: fastdf.kernels.grouped_mm).
"""

import triton
import triton.language as tl

from .grouped_mm import act_fwd, act_grad


@triton.jit
def _combine_kernel(
    y_ptr, inv_ptr, w_ptr, out_ptr, T, H, KS,
    s_ym, s_yh, s_wt, s_wk, s_ot, s_oh,
    HAS_W: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
):
    """out[t] = sum_k w[t, k] * y[inv[t * KS + k]], fp32, slots summed in order (no atomics)."""
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    rh = tl.program_id(1) * BH + tl.arange(0, BH)
    t_mask = rt < T
    mask = t_mask[:, None] & (rh < H)[None, :]
    acc = tl.zeros((BT, BH), dtype=tl.float32)
    for k in range(0, KS):
        s = tl.load(inv_ptr + rt.to(tl.int64) * KS + k, mask=t_mask, other=0).to(tl.int64)
        v = tl.load(y_ptr + s[:, None] * s_ym + rh[None, :] * s_yh, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            wv = tl.load(w_ptr + rt.to(tl.int64) * s_wt + k * s_wk, mask=t_mask, other=0.0).to(tl.float32)
            v = v * wv[:, None]
        acc += v
    tl.store(out_ptr + rt.to(tl.int64)[:, None] * s_ot + rh[None, :] * s_oh, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine(y, inverse, weights, out):
    """out [T, H] = per-token (weighted) sum of the K rows of ``y`` at ``inverse`` [T * K]."""
    T, H = out.shape
    KS = inverse.numel() // max(T, 1)
    inverse = inverse.contiguous()  # read as a flat [T * K] array
    w = weights if weights is not None else out
    block_h = min(triton.next_power_of_2(max(H, 16)), 256)
    block_t = max(1, 2048 // block_h)
    grid = (triton.cdiv(T, block_t), triton.cdiv(H, block_h))
    _combine_kernel[grid](
        y, inverse, w, out, T, H, KS,
        y.stride(0), y.stride(1), w.stride(0), w.stride(1) if w.dim() > 1 else 0, out.stride(0), out.stride(1),
        HAS_W=weights is not None, BT=block_t, BH=block_h, num_warps=4,
    )
    return out


@triton.jit
def _gather_kernel(x_ptr, rows_ptr, out_ptr, S, H, s_xm, s_xh, s_om, s_oh, BS: tl.constexpr, BH: tl.constexpr):
    rs = tl.program_id(0) * BS + tl.arange(0, BS)
    rh = tl.program_id(1) * BH + tl.arange(0, BH)
    s_mask = rs < S
    mask = s_mask[:, None] & (rh < H)[None, :]
    src = tl.load(rows_ptr + rs, mask=s_mask, other=0).to(tl.int64)
    v = tl.load(x_ptr + src[:, None] * s_xm + rh[None, :] * s_xh, mask=mask)
    tl.store(out_ptr + rs.to(tl.int64)[:, None] * s_om + rh[None, :] * s_oh, v, mask=mask)


def gather(x, rows, out):
    """out[s] = x[rows[s]] (only the unfused-activation path needs the gather on its own)."""
    S, H = out.shape
    rows = rows.contiguous()  # read as a flat array
    block_h = min(triton.next_power_of_2(max(H, 16)), 256)
    block_s = max(1, 2048 // block_h)
    grid = (triton.cdiv(S, block_s), triton.cdiv(H, block_h))
    _gather_kernel[grid](x, rows, out, S, H, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                         BS=block_s, BH=block_h, num_warps=4)
    return out


@triton.jit
def _glu_bwd_kernel(
    h_ptr, da_ptr, w_ptr, dh_ptr, dw_ptr, aw_ptr, S, I,
    s_hm, s_hn, s_am, s_an, s_dm, s_dn, s_wm, s_wn,
    ACT: tl.constexpr, STORE_AW: tl.constexpr, BS: tl.constexpr, BI: tl.constexpr,
):
    """Backward of out = sum_k w_k * down(act(gate) * up) through the activation, per row:
    with da the unweighted gradient of act(gate) * up (= dout[token] @ down_e),
      dw = <da, a>,  dgate = w da up act'(gate),  dup = w da act(gate),
    and a_w = w * a (the down projection's weight-gradient operand) when asked."""
    rs = tl.program_id(0) * BS + tl.arange(0, BS)
    s_mask = rs < S
    rs64 = rs.to(tl.int64)
    wv = tl.load(w_ptr + rs, mask=s_mask, other=0.0).to(tl.float32)
    dot = tl.zeros((BS,), dtype=tl.float32)
    ty = h_ptr.dtype.element_ty
    for i0 in range(0, I, BI):
        ri = i0 + tl.arange(0, BI)
        mask = s_mask[:, None] & (ri < I)[None, :]
        h_ptrs = h_ptr + rs64[:, None] * s_hm + ri[None, :] * s_hn
        g = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptrs + I * s_hn, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(da_ptr + rs64[:, None] * s_am + ri[None, :] * s_an, mask=mask, other=0.0).to(tl.float32)
        ag = act_fwd(g, ACT)
        a = (ag * u).to(ty).to(tl.float32)  # the rounded a the forward fed to the down GEMM
        dot += tl.sum(d * a, axis=1)
        dd = d * wv[:, None]
        dh_ptrs = dh_ptr + rs64[:, None] * s_dm + ri[None, :] * s_dn
        tl.store(dh_ptrs, (dd * u * act_grad(g, ACT)).to(ty), mask=mask)
        tl.store(dh_ptrs + I * s_dn, (dd * ag).to(ty), mask=mask)
        if STORE_AW:
            tl.store(aw_ptr + rs64[:, None] * s_wm + ri[None, :] * s_wn, (a * wv[:, None]).to(ty), mask=mask)
    tl.store(dw_ptr + rs, dot, mask=s_mask)


def glu_backward(h, da, w_sorted, act, dh, dw, aw=None):
    """Fill dh [S, 2I], dw [S] (fp32) and, if given, aw [S, I] from h [S, 2I] and da [S, I]."""
    S, I2 = h.shape
    I = I2 // 2
    w_sorted = w_sorted.contiguous()  # read as a flat [S] array
    block_i = min(triton.next_power_of_2(max(I, 16)), 128)
    block_s = 16
    a_t = aw if aw is not None else da
    _glu_bwd_kernel[(triton.cdiv(S, block_s),)](
        h, da, w_sorted, dh, dw, a_t, S, I,
        h.stride(0), h.stride(1), da.stride(0), da.stride(1), dh.stride(0), dh.stride(1), a_t.stride(0), a_t.stride(1),
        ACT=act, STORE_AW=aw is not None, BS=block_s, BI=block_i, num_warps=4,
    )

"""Triton kernels for per-frame AdaLN (fastdf.adaln_modulate, fastdf.gated_residual).

Rows are tokens of x [B, T, C]; token t of sample b reads its frame's table row
(b, t // S) directly, so no per-token modulation tensor exists. Forward: one pass over x
(statistics in fp32, mean/rstd saved). Backward: one program per (sample, frame, chunk of
the frame's tokens) walks its tokens once, writes dx and keeps the per-frame sums of the
table (and affine) gradients in registers; the chunk partials ([B, F, n_chunks, C], far
smaller than [B, T, C]) are summed afterwards.
"""

import triton
import triton.language as tl

from . import INTERPRET

# Programs the backward aims for (enough to fill an H100's 132 SMs a few times over).
TARGET_PROGRAMS = 1024


@triton.jit
def _token_rows(n_rows, T, S, ROWS: tl.constexpr):
    """This program's ROWS tokens of the flattened [B * T] rows: (valid, row, b, t, frame)."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = row < n_rows
    row = tl.where(rmask, row, 0).to(tl.int64)
    t = row % T
    return rmask, row, row // T, t, t // S


@triton.jit(do_not_specialize=["n_rows", "T", "S"])
def _modulate_fwd_kernel(X, SHIFT, SCALE, W, BIAS, Y, MEAN, RSTD,
                         sxb, sxt, sxc, shb, shf, shc, scb, scf, scc,
                         n_rows, T, S, C, eps,
                         BLOCK_C: tl.constexpr, ROWS: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
                         HAS_B: tl.constexpr):
    rmask, row, b, t, f = _token_rows(n_rows, T, S, ROWS)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(X + (b * sxb + t * sxt)[:, None] + c[None, :] * sxc, mask=m2, other=0.0).to(tl.float32)
    if RMS:
        mean = tl.zeros([ROWS], dtype=tl.float32)
        xc = x
    else:
        mean = tl.sum(x, 1) / C
        xc = tl.where(m2, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, 1) / C + eps)
    n = xc * rstd[:, None]
    if HAS_W:
        n = n * tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        n = n + tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sc = tl.load(SCALE + (b * scb + f * scf)[:, None] + c[None, :] * scc, mask=m2, other=0.0).to(tl.float32)
    sh = tl.load(SHIFT + (b * shb + f * shf)[:, None] + c[None, :] * shc, mask=m2, other=0.0).to(tl.float32)
    y = n * (1.0 + sc) + sh
    tl.store(Y + row[:, None] * C + c[None, :], y.to(Y.dtype.element_ty), mask=m2)
    tl.store(MEAN + row, mean, mask=rmask)
    tl.store(RSTD + row, rstd, mask=rmask)


@triton.jit
def _frame_chunk(n_chunks, F, S, TOK):
    """This backward program's sample b, frame f and token range [t_start, t_end)."""
    pid = tl.program_id(0)
    chunk = pid % n_chunks
    bf = pid // n_chunks
    f = bf % F
    t_start = f * S + chunk * TOK
    return pid, (bf // F).to(tl.int64), f, t_start, tl.minimum(t_start + TOK, (f + 1) * S)


@triton.jit(do_not_specialize=["T", "S", "F", "n_chunks", "TOK"])
def _modulate_bwd_kernel(DY, X, SCALE, W, BIAS, MEAN, RSTD, DX, P_SHIFT, P_SCALE, P_W, P_B,
                         sgb, sgt, sgc, sxb, sxt, sxc, scb, scf, scc,
                         T, S, F, C, n_chunks, TOK,
                         BLOCK_C: tl.constexpr, ROWS: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
                         HAS_B: tl.constexpr):
    pid, b, f, t_start, t_end = _frame_chunk(n_chunks, F, S, TOK)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    scale1 = 1.0 + tl.load(SCALE + b * scb + f * scf + c * scc, mask=cmask, other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        bias = tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(t_start, t_end, ROWS):
        t = t0 + tl.arange(0, ROWS)
        tmask = t < t_end
        m2 = tmask[:, None] & cmask[None, :]
        row = b * T + t
        x = tl.load(X + (b * sxb + t * sxt)[:, None] + c[None, :] * sxc, mask=m2, other=0.0).to(tl.float32)
        dy = tl.load(DY + (b * sgb + t * sgt)[:, None] + c[None, :] * sgc, mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row, mask=tmask, other=0.0)
        rstd = tl.load(RSTD + row, mask=tmask, other=0.0)
        xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
        n = xhat
        if HAS_W:
            n = n * w[None, :]
        if HAS_B:
            n = n + bias[None, :]
        acc_shift += tl.sum(dy, 0)
        acc_scale += tl.sum(dy * n, 0)
        dn = dy * scale1[None, :]
        acc_b += tl.sum(dn, 0)
        acc_w += tl.sum(dn * xhat, 0)
        dxh = dn
        if HAS_W:
            dxh = dxh * w[None, :]
        inner = dxh - xhat * (tl.sum(dxh * xhat, 1) / C)[:, None]
        if not RMS:
            inner = inner - (tl.sum(dxh, 1) / C)[:, None]
        tl.store(DX + row[:, None] * C + c[None, :], (inner * rstd[:, None]).to(DX.dtype.element_ty), mask=m2)
    out = pid.to(tl.int64) * C + c
    tl.store(P_SHIFT + out, acc_shift, mask=cmask)
    tl.store(P_SCALE + out, acc_scale, mask=cmask)
    if HAS_W:
        tl.store(P_W + out, acc_w, mask=cmask)
    if HAS_B:
        tl.store(P_B + out, acc_b, mask=cmask)


@triton.jit(do_not_specialize=["n_rows", "T", "S"])
def _gated_fwd_kernel(X, Y, GATE, OUT, sxb, sxt, sxc, syb, syt, syc, sgb, sgf, sgc, n_rows, T, S, C,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rmask, row, b, t, f = _token_rows(n_rows, T, S, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m2 = rmask[:, None] & (c < C)[None, :]
    x = tl.load(X + (b * sxb + t * sxt)[:, None] + c[None, :] * sxc, mask=m2, other=0.0).to(tl.float32)
    y = tl.load(Y + (b * syb + t * syt)[:, None] + c[None, :] * syc, mask=m2, other=0.0).to(tl.float32)
    g = tl.load(GATE + (b * sgb + f * sgf)[:, None] + c[None, :] * sgc, mask=m2, other=0.0).to(tl.float32)
    tl.store(OUT + row[:, None] * C + c[None, :], (x + g * y).to(OUT.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["T", "S", "F", "n_chunks", "TOK"])
def _gated_bwd_kernel(DOUT, Y, GATE, DY, P_GATE, sob, sot, soc, syb, syt, syc, sgb, sgf, sgc,
                      T, S, F, C, n_chunks, TOK, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, b, f, t_start, t_end = _frame_chunk(n_chunks, F, S, TOK)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    g = tl.load(GATE + b * sgb + f * sgf + c * sgc, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(t_start, t_end, ROWS):
        t = t0 + tl.arange(0, ROWS)
        m2 = (t < t_end)[:, None] & cmask[None, :]
        go = tl.load(DOUT + (b * sob + t * sot)[:, None] + c[None, :] * soc, mask=m2, other=0.0).to(tl.float32)
        y = tl.load(Y + (b * syb + t * syt)[:, None] + c[None, :] * syc, mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(go * y, 0)
        tl.store(DY + (b * T + t)[:, None] * C + c[None, :], (go * g[None, :]).to(DY.dtype.element_ty), mask=m2)
    tl.store(P_GATE + pid.to(tl.int64) * C + c, acc, mask=cmask)


# ---------------------------------------------------------------------------- launchers


def _row_config(C):
    block_c = triton.next_power_of_2(C)
    rows = 2 if INTERPRET else max(1, min(16, 8192 // block_c))
    warps = 4 if block_c <= 2048 else (8 if block_c <= 8192 else 16)
    return block_c, rows, warps


def _chunks(B, F, S, rows):
    """Tokens per backward program (a multiple of ``rows``) and chunks per frame."""
    if B * F == 0 or S == 0:
        return rows, 0  # no tokens: no programs, the per-frame sums are empty (zero)
    want = max(1, triton.cdiv(TARGET_PROGRAMS, B * F))
    tok = triton.cdiv(triton.cdiv(S, want), rows) * rows
    return tok, triton.cdiv(S, tok)


def _strides3(t):
    return list(t.stride())


def modulate_forward(x, shift, scale, weight, bias, y, mean, rstd, rms, eps):
    B, T, C = x.shape
    F = shift.shape[1]
    block_c, rows, warps = _row_config(C)
    n_rows = B * T
    _modulate_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        x, shift, scale, weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd,
        *_strides3(x), *_strides3(shift), *_strides3(scale), n_rows, T, T // F, C, eps,
        BLOCK_C=block_c, ROWS=rows, RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, num_warps=warps)


def modulate_backward(grad, x, scale, weight, bias, mean, rstd, dx, rms):
    """Writes dx; returns fp32 (d_shift, d_scale, d_weight or None, d_bias or None)."""
    import torch

    B, T, C = x.shape
    F = scale.shape[1]
    S = T // F
    block_c, rows, warps = _row_config(C)
    if not INTERPRET and rows * block_c >= 8192:
        # The backward holds ~3x the forward's live values: on a full 8192-element tile at 4
        # warps it hits 255 registers and spills 12-16 B on sm_90a (BLOCK_C 1024 and 2048 alike);
        # twice the warps halve the per-thread share (179 registers at 2048, no spill).
        warps = min(16, 2 * warps)
    tok, n_chunks = _chunks(B, F, S, rows)
    part = lambda on: torch.empty((B, F, n_chunks, C) if on else (1,), dtype=torch.float32, device=x.device)  # noqa: E731
    p_shift, p_scale, p_w, p_b = part(True), part(True), part(weight is not None), part(bias is not None)
    if x.numel():
        _modulate_bwd_kernel[(B * F * n_chunks,)](
            grad, x, scale, weight if weight is not None else x, bias if bias is not None else x, mean, rstd, dx,
            p_shift, p_scale, p_w, p_b, *_strides3(grad), *_strides3(x), *_strides3(scale),
            T, S, F, C, n_chunks, tok,
            BLOCK_C=block_c, ROWS=rows, RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, num_warps=warps)
    else:
        for p in (p_shift, p_scale, p_w, p_b):
            p.zero_()
    d_weight = p_w.sum((0, 1, 2)) if weight is not None else None
    d_bias = p_b.sum((0, 1, 2)) if bias is not None else None
    return p_shift.sum(2), p_scale.sum(2), d_weight, d_bias


def _tile_config(C):
    block_c = min(triton.next_power_of_2(C), 1024)
    rows = 2 if INTERPRET else max(1, 4096 // block_c)
    return block_c, rows


def gated_forward(x, y, gate, out):
    B, T, C = x.shape
    F = gate.shape[1]
    block_c, rows = _tile_config(C)
    n_rows = B * T
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(C, block_c))
    _gated_fwd_kernel[grid](x, y, gate, out, *_strides3(x), *_strides3(y), *_strides3(gate), n_rows, T, T // F, C,
                            BLOCK_R=rows, BLOCK_C=block_c, num_warps=4)


def gated_backward(grad, y, gate, d_y):
    """Writes d_y; returns the fp32 per-frame d_gate [B, F, C]."""
    import torch

    B, T, C = y.shape
    F = gate.shape[1]
    S = T // F
    block_c, rows = _tile_config(C)
    tok, n_chunks = _chunks(B, F, S, rows)
    p_gate = torch.empty((B, F, n_chunks, C), dtype=torch.float32, device=y.device)
    if y.numel():
        grid = (B * F * n_chunks, triton.cdiv(C, block_c))
        _gated_bwd_kernel[grid](grad, y, gate, d_y, p_gate, *_strides3(grad), *_strides3(y), *_strides3(gate),
                                T, S, F, C, n_chunks, tok, ROWS=rows, BLOCK_C=block_c, num_warps=4)
    else:
        p_gate.zero_()
    return p_gate.sum(2)

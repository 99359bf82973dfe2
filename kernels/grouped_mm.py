"""Triton grouped GEMMs over ragged expert groups (forward / dX and a dW that visits only
the experts asked for).

Rows ``offs[e-1] .. offs[e]-1`` of the (optionally gathered) left operand belong to expert
``e``; rows from ``offs[-1]`` on are written as zeros. Both kernels are persistent: the grid
is about one program per SM and each program walks a flattened list of
``(expert, m-tile, n-tile)`` work items computed on the device from ``offs`` (no host sync,
no per-expert launches), so a skewed routing does not leave SMs idle.

Operands are read through their strides (HF's ``[E, N, K]`` weights transposed are fine;
Triton specialises unit strides, so the contiguous axis still gets vector loads). On sm_90+
the weights and every operand not gathered through a row index load through TMA tensor
descriptors made on the device, when their base and strides allow it (``_device.tma_strides``);
otherwise, and for gathered rows, through pointers. The GLU variant on K-major weights
reads gate and up columns as one box and runs one 2 BN-wide MMA per K step (``PAIR``).
Accumulation is fp32 for every input dtype.
"""

import triton
import triton.language as tl

from . import INTERPRET, _device, autotune

# ---------------------------------------------------------------------------- activations
# Codes shared with fastdf/ops/moe.py (ACT_CODES).
ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_RELU = 0, 1, 2, 3


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def act_fwd(x, ACT: tl.constexpr):
    """act(x) in fp32."""
    if ACT == 0:
        return x * _sigmoid(x)
    elif ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 * _sigmoid(2.0 * z) - 1.0))
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def act_grad(x, ACT: tl.constexpr):
    """d act / dx in fp32."""
    if ACT == 0:
        s = _sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        return cdf + x * pdf
    elif ACT == 2:
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 * _sigmoid(2.0 * z) - 1.0
        dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dz
    else:
        return tl.where(x > 0.0, 1.0, 0.0)


# ---------------------------------------------------------------------------- configs
# Problems below LARGE (N * K elements of one expert's weight) take one fixed config: no
# autotuning (tests and tiny layers would otherwise compile every candidate). Larger ones
# autotune over two Hopper-minded configs (each candidate is a compile on first use).
# Under the interpreter everything runs with 16-wide tiles, so tiny test shapes still
# cross several tiles and groups.
LARGE = 1 << 20


def _cfg(bm, bn, bk, warps, stages, group=8, names=("BM", "BN", "BK")):
    meta = dict(zip(names, (bm, bn, bk)))
    if "GROUP_M" not in names and names[0] == "BM":
        meta["GROUP_M"] = group
    return triton.Config(meta, num_warps=warps, num_stages=stages)


if INTERPRET:
    _FWD_SMALL = _FWD_LARGE = _GLU_SMALL = _GLU_LARGE = [_cfg(16, 16, 16, 4, 1, group=2)]
    _DW_SMALL = _DW_LARGE = [_cfg(16, 16, 16, 4, 1, names=("BK", "BN", "BM"))]
else:
    _FWD_SMALL = [_cfg(64, 64, 32, 4, 3)]
    _FWD_LARGE = [_cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3)]
    # BN is the width of each GLU half: gate and up together make a 2 BN-wide tile (one
    # [BM, 2 BN] accumulator with PAIR, two [BM, BN] ones otherwise), so the first config is
    # a 128x128 tile like the plain kernel's default, the third a 128x256 one (204 registers
    # with PAIR, 230 with two accumulators; no spills either way).
    _GLU_SMALL = [_cfg(64, 32, 32, 4, 3)]
    _GLU_LARGE = [_cfg(128, 64, 64, 8, 3), _cfg(64, 64, 64, 4, 4), _cfg(128, 128, 64, 8, 3)]
    _DW_SMALL = [_cfg(64, 64, 32, 4, 3, names=("BK", "BN", "BM"))]
    _DW_LARGE = [_cfg(128, 128, 64, 8, 3, names=("BK", "BN", "BM")), _cfg(128, 64, 64, 4, 4, names=("BK", "BN", "BM"))]


def _even_k(args):
    return args["K"] % args["BK"] == 0


# ---------------------------------------------------------------------------- forward / dX

@triton.jit
def _mainloop(acc, acc2, a_ptrs, a_desc, a_row, m_mask, s_xk, w_base, w_desc, w_idx, s_wk, s_wn, rn, n0, n_mask,
              N, K, k_end, GLU: tl.constexpr, EVEN_K: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
              PRECISION: tl.constexpr, A_TMA: tl.constexpr, W_TMA: tl.constexpr, W_KMAJOR: tl.constexpr,
              PAIR: tl.constexpr):
    """acc += A[rows, :] @ W[:, rn] (and acc2 += A @ W[:, N + rn] for the GLU up half; with
    PAIR, acc [BM, 2 BN] += A @ [W[:, rn] | W[:, N + rn]], both halves from one descriptor
    box, one MMA per K step).

    With A_TMA, A's rows come through ``a_desc`` from row ``a_row`` (rows past the group are
    read but only feed output rows the epilogue masks). With W_TMA, W comes through the 3-D
    ``w_desc`` at expert index ``w_idx``: [E, K, N'] (N contiguous) or, W_KMAJOR, [E, N', K]
    (HF's layout, K contiguous, transposed in shared memory for the MMA). The descriptor's
    bounds zero-fill the K tail (per expert) and columns past N'."""
    rk = tl.arange(0, BK)
    w_ptrs = w_base + rk[:, None].to(tl.int64) * s_wk + rn[None, :].to(tl.int64) * s_wn
    up_shift = N * s_wn
    for k0 in range(0, k_end, BK):
        if A_TMA:
            a = a_desc.load([a_row, k0])
        elif EVEN_K:
            a = tl.load(a_ptrs + (k0 + rk)[None, :] * s_xk, mask=m_mask[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs + (k0 + rk)[None, :] * s_xk, mask=m_mask[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        if PAIR:
            b = _w_pair(w_desc, w_idx, k0, n0, BK, BN, W_KMAJOR)
        elif W_TMA:
            b = _w_tile(w_desc, w_idx, k0, n0, BK, BN, W_KMAJOR)
        elif EVEN_K:
            b = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            b = tl.load(w_ptrs, mask=((k0 + rk) < K)[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GLU and not PAIR:
            if W_TMA:
                b2 = _w_tile(w_desc, w_idx, k0, n0 + N, BK, BN, W_KMAJOR)
            elif EVEN_K:
                b2 = tl.load(w_ptrs + up_shift, mask=n_mask[None, :], other=0.0)
            else:
                b2 = tl.load(w_ptrs + up_shift, mask=((k0 + rk) < K)[:, None] & n_mask[None, :], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
        w_ptrs += BK * s_wk
    return acc, acc2


@triton.jit
def _w_tile(w_desc, idx, k0, n0, BK: tl.constexpr, BN: tl.constexpr, W_KMAJOR: tl.constexpr):
    """The [BK, BN] weight tile at (k0, n0) of expert ``idx`` through the 3-D descriptor."""
    if W_KMAJOR:
        return tl.trans(w_desc.load([idx, n0, k0]).reshape(BN, BK))
    else:
        return w_desc.load([idx, k0, n0]).reshape(BK, BN)


@triton.jit
def _w_pair(w_desc, idx, k0, n0, BK: tl.constexpr, BN: tl.constexpr, W_KMAJOR: tl.constexpr):
    """[gate | up] columns n0..n0+BN of both halves as one [BK, 2 BN] tile (4-D descriptor)."""
    if W_KMAJOR:
        return tl.trans(w_desc.load([idx, 0, n0, k0]).reshape(2 * BN, BK))
    else:
        return w_desc.load([idx, k0, 0, n0]).reshape(BK, 2 * BN)


@triton.jit
def _w_desc(base, E, K, N2, s_e, s_k, s_n, BK: tl.constexpr, BN: tl.constexpr, W_KMAJOR: tl.constexpr,
            PAIR: tl.constexpr):
    if PAIR:  # the GLU halves as a dim of 2: [E, 2, N, K] or [E, K, 2, N]
        if W_KMAJOR:
            return tl.make_tensor_descriptor(base, [E, 2, N2 // 2, K], [s_e, (N2 // 2) * s_n, s_n, 1], [1, 2, BN, BK])
        else:
            return tl.make_tensor_descriptor(base, [E, K, 2, N2 // 2], [s_e, s_k, N2 // 2, 1], [1, BK, 2, BN])
    elif W_KMAJOR:
        return tl.make_tensor_descriptor(base, [E, N2, K], [s_e, s_n, 1], [1, BN, BK])
    else:
        return tl.make_tensor_descriptor(base, [E, K, N2], [s_e, s_k, 1], [1, BK, BN])


@triton.jit
def _gmm_kernel(
    x_ptr, rows_ptr, w_ptr, tw_ptr, slot_ptr, offs_ptr, out_ptr, h_ptr,
    S, N, K, E, S_X,
    s_xm, s_xk, s_we, s_wk, s_wn, s_te, s_tk, s_tn, s_om, s_on, s_hm, s_hn,
    HAS_ROWS: tl.constexpr, HAS_TW: tl.constexpr, GLU: tl.constexpr, STORE_H: tl.constexpr,  # HAS_TW: 0, 1, 2
    ACT: tl.constexpr, EP: tl.constexpr, PRECISION: tl.constexpr,
    A_TMA: tl.constexpr, W_TMA: tl.constexpr, W_KMAJOR: tl.constexpr, PAIR: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    num_n = tl.cdiv(N, BN)
    N2 = 2 * N if GLU else N

    # Work list, on the device: expert e owns rows [starts[e], ends[e]); a pseudo-expert E
    # owns the tail [offs[-1], S), whose rows are written as zeros.
    e_idx = tl.arange(0, EP)
    ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    ends = tl.where(e_idx < E, tl.minimum(tl.maximum(ends, 0), S), S)
    prev = tl.load(offs_ptr + e_idx - 1, mask=(e_idx >= 1) & (e_idx <= E), other=0)
    starts = tl.where(e_idx == 0, 0, tl.where(e_idx <= E, tl.minimum(tl.maximum(prev, 0), S), S))
    m_tiles = tl.cdiv(tl.maximum(ends - starts, 0), BM)
    cum = tl.cumsum(m_tiles * num_n, 0)
    total = tl.sum(m_tiles * num_n)

    # A's TMA descriptor, and W's when every tile reads w, are made once per program (the
    # launcher checked alignment and strides). W's is 3-D, so the expert index is a
    # coordinate and each expert's K tail is zero-filled by the descriptor's bounds instead
    # of read from the next expert.
    if A_TMA:
        a_desc = tl.make_tensor_descriptor(x_ptr, [S_X, K], [s_xm, 1], [BM, BK])
    else:
        a_desc = 0
    if W_TMA and HAS_TW == 0:
        w_desc = _w_desc(w_ptr, E, K, N2, s_we, s_wk, s_wn, BK, BN, W_KMAJOR, PAIR)
    else:
        w_desc = 0

    for tile in range(pid, total, num_progs):
        e = tl.sum((cum <= tile).to(tl.int32))
        here = e_idx == e
        local = tile - tl.sum(tl.where(here, cum - m_tiles * num_n, 0))
        row0 = tl.sum(tl.where(here, starts, 0))
        row1 = tl.sum(tl.where(here, ends, 0))
        mt = tl.sum(tl.where(here, m_tiles, 0))
        # Grouped order inside the expert: GROUP_M m-tiles share each W column block in L2.
        per_group = GROUP_M * num_n
        first_m = (local // per_group) * GROUP_M
        group_m = tl.minimum(mt - first_m, GROUP_M)
        pid_m = first_m + (local % per_group) % group_m
        pid_n = (local % per_group) // group_m

        m0 = row0 + pid_m * BM
        rm = m0 + tl.arange(0, BM)
        m_mask = rm < row1
        n0 = pid_n * BN
        rn = n0 + tl.arange(0, BN)
        n_mask = rn < N
        if HAS_ROWS:
            src = tl.load(rows_ptr + rm, mask=m_mask, other=0).to(tl.int64)
        else:
            src = rm.to(tl.int64)
        a_ptrs = x_ptr + src[:, None] * s_xm
        k_end = tl.where(e < E, K, 0)

        if PAIR:
            acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        if GLU and not PAIR:
            acc2 = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            acc2 = tl.zeros((1, 1), dtype=tl.float32)  # unused: keep registers for acc
        e64 = e.to(tl.int64)
        if HAS_TW != 0 and W_TMA:
            # Either weight tensor, picked per tile: a one-expert descriptor made here (two
            # descriptors made up front would need two mainloops, and the pipeline buffers of
            # two loops add up: 288 KB of shared memory at 128x256).
            slot = tl.load(slot_ptr + e, mask=e < E, other=-1)
            mine = slot >= 0
            base = tl.where(mine, tw_ptr + tl.maximum(slot, 0).to(tl.int64) * s_te, w_ptr + e64 * s_we)
            tile_desc = _w_desc(base, 1, K, N2, tl.where(mine, s_te, s_we), tl.where(mine, s_tk, s_wk),
                                tl.where(mine, s_tn, s_wn), BK, BN, W_KMAJOR, PAIR)
            acc, acc2 = _mainloop(acc, acc2, a_ptrs, a_desc, m0, m_mask, s_xk, base, tile_desc, 0, s_wk, s_wn,
                                  rn, n0, n_mask, N, K, k_end,
                                  GLU, EVEN_K, BK, BN, PRECISION, A_TMA, W_TMA, W_KMAJOR, PAIR)
        elif HAS_TW == 1:
            # trainable_w shares w's inner strides: pick the base pointer, run one mainloop
            # (one set of pipeline buffers; strides keep their unit-stride specialisation).
            slot = tl.load(slot_ptr + e, mask=e < E, other=-1)
            w_base = tl.where(slot >= 0, tw_ptr + tl.maximum(slot, 0).to(tl.int64) * s_te, w_ptr + e64 * s_we)
            acc, acc2 = _mainloop(acc, acc2, a_ptrs, a_desc, m0, m_mask, s_xk, w_base, w_desc, e, s_wk, s_wn,
                                  rn, n0, n_mask, N, K, k_end,
                                  GLU, EVEN_K, BK, BN, PRECISION, A_TMA, W_TMA, W_KMAJOR, PAIR)
        elif HAS_TW == 2:
            slot = tl.load(slot_ptr + e, mask=e < E, other=-1)
            if slot >= 0:
                acc, acc2 = _mainloop(acc, acc2, a_ptrs, a_desc, m0, m_mask, s_xk, tw_ptr + slot.to(tl.int64) * s_te,
                                      w_desc, e, s_tk, s_tn, rn, n0, n_mask, N, K, k_end,
                                      GLU, EVEN_K, BK, BN, PRECISION, A_TMA, W_TMA, W_KMAJOR, PAIR)
            else:
                acc, acc2 = _mainloop(acc, acc2, a_ptrs, a_desc, m0, m_mask, s_xk, w_ptr + e64 * s_we, w_desc, e,
                                      s_wk, s_wn, rn, n0, n_mask, N, K, k_end,
                                      GLU, EVEN_K, BK, BN, PRECISION, A_TMA, W_TMA, W_KMAJOR, PAIR)
        else:
            acc, acc2 = _mainloop(acc, acc2, a_ptrs, a_desc, m0, m_mask, s_xk, w_ptr + e64 * s_we, w_desc, e,
                                  s_wk, s_wn, rn, n0, n_mask, N, K, k_end,
                                  GLU, EVEN_K, BK, BN, PRECISION, A_TMA, W_TMA, W_KMAJOR, PAIR)

        mask = m_mask[:, None] & n_mask[None, :]
        rm64 = rm.to(tl.int64)
        out_ty = out_ptr.dtype.element_ty
        if GLU:
            # Round to the storage dtype first, as an unfused gate/up tensor would be: the
            # backward recomputes act(gate) * up from the stored halves and must agree.
            if PAIR:
                g, u = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN)), (0, 2, 1)))
                g = g.to(out_ty)
                u = u.to(out_ty)
            else:
                g = acc.to(out_ty)
                u = acc2.to(out_ty)
            if STORE_H:
                h_ptrs = h_ptr + rm64[:, None] * s_hm + rn[None, :] * s_hn
                tl.store(h_ptrs, g, mask=mask)
                tl.store(h_ptrs + N * s_hn, u, mask=mask)
            res = act_fwd(g.to(tl.float32), ACT) * u.to(tl.float32)
        else:
            res = acc
        tl.store(out_ptr + rm64[:, None] * s_om + rn[None, :] * s_on, res.to(out_ty), mask=mask)


def _tuned(kernel, configs, key, heuristics=None):
    if heuristics:
        kernel = triton.heuristics(heuristics)(kernel)
    return autotune(configs, key=key)(kernel)


_GMM_KEY = ["N", "K", "HAS_ROWS", "HAS_TW", "A_TMA", "W_TMA", "W_KMAJOR", "PAIR"]
_GMM = {  # (glu, large) -> launcher
    (False, False): _tuned(_gmm_kernel, _FWD_SMALL, _GMM_KEY, {"EVEN_K": _even_k}),
    (False, True): _tuned(_gmm_kernel, _FWD_LARGE, _GMM_KEY, {"EVEN_K": _even_k}),
    (True, False): _tuned(_gmm_kernel, _GLU_SMALL, _GMM_KEY, {"EVEN_K": _even_k}),
    (True, True): _tuned(_gmm_kernel, _GLU_LARGE, _GMM_KEY, {"EVEN_K": _even_k}),
}


def _num_programs(device, upper):
    if INTERPRET:
        return max(1, min(upper, 3))
    return max(1, min(upper, _device.num_sms(device)))


def _precision(t):
    import torch

    return "ieee" if t.dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------- TMA


def _w_layout(w, tw, n_offset):
    """(W_TMA, W_KMAJOR) for weights ``w`` [E, K, N'] and trainable ``tw`` (or None): TMA when
    both take a descriptor with the same dim contiguous. ``n_offset`` (the GLU up half's
    first column) must then sit on a 16-byte boundary when N is the contiguous dim."""
    for kmajor, inner in ((True, 1), (False, 2)):
        if all(_device.tma_strides(t, inner) for t in (w, tw) if t is not None):
            if not kmajor and (n_offset * w.element_size()) % _device.TMA_BYTES:
                return False, False
            return True, kmajor
    return False, False


def _ep(E):
    return triton.next_power_of_2(E + 1)


def gmm(x, w, offs, out, *, rows=None, tw=None, slot=None, glu_act=None, h=None):
    """out[r] = x[rows[r] if rows else r] @ W_e for r in expert e's rows, zeros past offs[-1].

    ``w`` [E, K, N'] and ``tw`` [E_t, K, N'] are strided views; ``slot`` [E] int32 maps an
    expert to its ``tw`` row (-1: use ``w``). With ``glu_act`` (an ACT_* code) the kernel
    computes gate = W[:, :, :N] and up = W[:, :, N:2N] (N = N'/2) for each tile and stores
    ``act(gate) * up`` into ``out`` [S, N], and gate|up into ``h`` [S, 2N] when ``h`` is given.
    """
    S_out, N = out.shape
    E, K = w.shape[0], w.shape[1]
    glu = glu_act is not None
    # The kernel indexes these as flat arrays (no strides): a view must not reach it.
    offs, rows, slot = (t.contiguous() if t is not None else None for t in (offs, rows, slot))
    rows_t = rows if rows is not None else offs
    tw_t = tw if tw is not None else w
    slot_t = slot if slot is not None else offs
    h_t = h if h is not None else out
    kernel = _GMM[(glu, N * K >= LARGE)]

    def grid(meta):
        upper = (triton.cdiv(S_out, meta["BM"]) + E + 1) * triton.cdiv(N, meta["BN"])
        return (_num_programs(out.device, upper),)

    # 0: no trainable weights; 1: they share w's inner strides (one mainloop); 2: they do not.
    tw_mode = 0 if tw is None else (1 if tw.stride()[1:] == w.stride()[1:] else 2)
    tma = K > 0 and N > 0 and _device.tma_capable(out.device)  # (a descriptor has no empty dims)
    w_tma, w_kmajor = _w_layout(w, tw, N if glu else 0) if tma else (False, False)
    # Gathered rows stay pointer loads; dense rows may cross into the next group: those
    # only feed output rows the epilogue masks.
    a_tma = tma and rows is None and _device.tma_strides(x, 1)
    # GLU on K-major weights (HF's gate_up): gate and up columns as one [BK, 2 BN] tile, one
    # MMA per K step (one accumulator, A read from shared memory once). N-major weights keep
    # two tiles: merging the box's two inner dims makes Triton copy the tile through
    # registers (measured: 103 SASS instructions per K step, wgmma waited at depth 0).
    pair = glu and w_tma and w_kmajor
    with _device.scratch_allocator():
        kernel[grid](
            x, rows_t, w, tw_t, slot_t, offs, out, h_t,
            S_out, N, K, E, x.shape[0],
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
            tw_t.stride(0), tw_t.stride(1), tw_t.stride(2), out.stride(0), out.stride(1),
            h_t.stride(0), h_t.stride(1),
            HAS_ROWS=rows is not None, HAS_TW=tw_mode, GLU=glu, STORE_H=h is not None,
            ACT=glu_act if glu else 0, EP=_ep(E), PRECISION=_precision(x),
            A_TMA=a_tma, W_TMA=w_tma, W_KMAJOR=w_kmajor, PAIR=pair,
        )
    return out


# ---------------------------------------------------------------------------- dW

@triton.jit
def _gmm_dw_kernel(
    x_ptr, xrows_ptr, dy_ptr, dyrows_ptr, ids_ptr, offs_ptr, dw_ptr,
    N, K, E_t, S,
    s_xm, s_xk, s_ym, s_yn, s_de, s_dk, s_dn,
    HAS_XROWS: tl.constexpr, HAS_YROWS: tl.constexpr, PRECISION: tl.constexpr,
    X_TMA: tl.constexpr, Y_TMA: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
):
    """dW[j] = X[rows of e]^T @ dY[rows of e] for e = ids[j]: only the listed experts.

    X_TMA / Y_TMA: the (ungathered) operand comes through a TMA descriptor made per work
    item whose row count is the expert's last row, so the tile that crosses the group's end
    reads zeros where the next expert's rows are: they never reach this expert's dW."""
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    num_k = tl.cdiv(K, BK)
    num_n = tl.cdiv(N, BN)
    per_expert = num_k * num_n
    total = E_t * per_expert
    for tile in range(pid, total, num_progs):
        # Consecutive tiles share an expert, so concurrent programs share its rows in L2.
        j = tile // per_expert
        local = tile % per_expert
        pid_k = local // num_n
        pid_n = local % num_n
        e = tl.load(ids_ptr + j)
        row1 = tl.minimum(tl.maximum(tl.load(offs_ptr + e), 0), S)
        row0 = tl.where(e > 0, tl.load(offs_ptr + e - 1, mask=e > 0, other=0), 0)
        row0 = tl.minimum(tl.maximum(row0, 0), row1)

        k0 = pid_k * BK
        n0 = pid_n * BN
        rk = k0 + tl.arange(0, BK)
        rn = n0 + tl.arange(0, BN)
        k_mask = rk < K
        n_mask = rn < N
        if X_TMA:
            x_desc = tl.make_tensor_descriptor(x_ptr, [tl.maximum(row1, 1), K], [s_xm, 1], [BM, BK])
        else:
            x_desc = 0
        if Y_TMA:
            y_desc = tl.make_tensor_descriptor(dy_ptr, [tl.maximum(row1, 1), N], [s_ym, 1], [BM, BN])
        else:
            y_desc = 0
        acc = tl.zeros((BK, BN), dtype=tl.float32)
        for m0 in range(row0, row1, BM):
            rm = m0 + tl.arange(0, BM)
            m_mask = rm < row1
            if X_TMA:
                a = x_desc.load([m0, k0])
            else:
                if HAS_XROWS:
                    xr = tl.load(xrows_ptr + rm, mask=m_mask, other=0).to(tl.int64)
                else:
                    xr = rm.to(tl.int64)
                a = tl.load(x_ptr + xr[:, None] * s_xm + rk[None, :] * s_xk, mask=m_mask[:, None] & k_mask[None, :],
                            other=0.0)
            if Y_TMA:
                b = y_desc.load([m0, n0])
            else:
                if HAS_YROWS:
                    yr = tl.load(dyrows_ptr + rm, mask=m_mask, other=0).to(tl.int64)
                else:
                    yr = rm.to(tl.int64)
                b = tl.load(dy_ptr + yr[:, None] * s_ym + rn[None, :] * s_yn, mask=m_mask[:, None] & n_mask[None, :],
                            other=0.0)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        d_ptrs = dw_ptr + j.to(tl.int64) * s_de + rk[:, None].to(tl.int64) * s_dk + rn[None, :].to(tl.int64) * s_dn
        tl.store(d_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])


_DW_KEY = ["N", "K", "HAS_XROWS", "HAS_YROWS", "X_TMA", "Y_TMA"]
_DW = {False: _tuned(_gmm_dw_kernel, _DW_SMALL, _DW_KEY), True: _tuned(_gmm_dw_kernel, _DW_LARGE, _DW_KEY)}


def gmm_dw(x, dy, offs, ids, dw, *, x_rows=None, dy_rows=None):
    """dw[j] = x[x_rows][rows of ids[j]]^T @ dy[dy_rows][same rows]; ``dw`` [E_t, K, N] strided."""
    E_t, K, N = dw.shape
    if E_t == 0:
        return dw
    # The kernel indexes these as flat arrays (no strides): a view must not reach it.
    offs, ids, x_rows, dy_rows = (t.contiguous() if t is not None else None for t in (offs, ids, x_rows, dy_rows))
    S = x_rows.shape[0] if x_rows is not None else x.shape[0]

    def grid(meta):
        return (_num_programs(dw.device, E_t * triton.cdiv(K, meta["BK"]) * triton.cdiv(N, meta["BN"])),)

    tma = _device.tma_capable(dw.device)  # (descriptors are made per work item: none when K or N is 0)
    with _device.scratch_allocator():
        _DW[N * K >= LARGE][grid](
            x, x_rows if x_rows is not None else offs, dy, dy_rows if dy_rows is not None else offs, ids, offs, dw,
            N, K, E_t, S,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
            HAS_XROWS=x_rows is not None, HAS_YROWS=dy_rows is not None, PRECISION=_precision(x),
            X_TMA=tma and x_rows is None and _device.tma_strides(x, 1),
            Y_TMA=tma and dy_rows is None and _device.tma_strides(dy, 1),
        )
    return dw

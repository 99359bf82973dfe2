"""Triton kernels for frame-causal flash attention (fastdf.df_attention).

Mask in kernel terms (fastdf/ops/attention.py turns the public arguments into these):
query row i sits at position p = Tk - Tq + i, frame(x) = x // FS; key j is visible iff
j < ce(p) = min((frame(p) + 1) * FS, Tk) and, with a window, j >= lo(p) =
(frame(p) - W + 1) * FS or j < SINK_END. causal=False is FS = Tk (one frame).

Tile classification. For a block of query rows with positions [p_first, p_last] the
visible keys are at most two ranges, computed once per program (``_key_ranges``):
  sinks  [0, sink_hi)  visible to every row of the block,
  main   [lo, hi)      of which [full_lo, full_hi) is visible to every row.
Tiles inside a fully visible part run without any mask arithmetic (and without load
masks); the few edge tiles apply the per-element mask; everything else is never touched.
The dK/dV kernel does the same from the key side: the queries that see a key block form
one range [q_lo, q_hi) with a fully visible middle.

Layout: 1-D grids (B * H can exceed the 65535 limit of the other grid axes), query blocks
of one head adjacent in launch order (they share K/V in L2) and issued heaviest first.
Forward rows are "virtual": the G = Hq / Hkv query heads that share a K/V head are stacked
(row r = g * Tq + i), so a decode step or a short chunk with GQA fills the tile and reads
K/V once. Sequences with Tk <= 64 take the ``short`` kernels, where one program handles
several (batch, head) sequences with batched 3-D dots (the factorised U-Net's temporal
attention: 131072 x 4 sequences of 16 tokens).

Key splits (flash-decoding): when the forward's grid would leave the GPU's last wave under
90% full (a decode step's few (batch, head) programs; the KV-chunk case's 3.4 waves), each
query block's key tiles are split over adjacent programs writing fp32 partial (o, lse),
merged by ``_merge_splits_kernel`` (``_key_splits`` picks the count from the SM count).

TMA (sm_90+): the tiles of the unmasked ranges (whole tiles inside the tensor) come through
device-side tensor descriptors made once per program: K/V of the forward and dQ (2-D over
the program's head), q/dO of dK/dV (3-D over the batch row's heads, the head a coordinate).
Edge tiles, devices before sm_90 and operands TMA cannot address (``tma_operands``: base or
a stride not a 16-byte multiple, D not 16 bytes' worth of elements) keep pointer loads.

Backward (FA2): a preprocessing kernel computes delta = rowsum(dO * O) - dlse, a dK/dV
kernel owns one key block (looping over the G query heads of its K/V head and over the
query blocks that see it; at D = 128 in two passes, dV then dK, so that one accumulator is
live: ``SPLIT``) and a dQ kernel owns one query block. No atomics: deterministic.
"""

import triton
import triton.language as tl

from . import INTERPRET, _device, autotune

_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)  # kernels read globals only as constexpr
LN2 = tl.constexpr(0.6931471805599453)

# Block sizes under the interpreter: small and unequal, so tests cross many tile edges.
INTERPRET_BLOCKS = {"fwd": (16, 32), "dkdv": (32, 16), "dq": (16, 32)}
# The dK/dV kernel's two-pass form under the interpreter (tests flip it to run the fused one).
INTERPRET_SPLIT = True
# Tk (and G * Tq) up to this go to the short kernels; tests set 0 to force the tiled path.
SHORT_MAX = 64
# Elements (R x rows x BLOCK_D) one program of the short backward holds per operand.
SHORT_BWD_BUDGET = 4096
# Forward key splits: an SM count for CPU tensors (tests), and the fewest key tiles per split.
KEY_SPLIT_SLOTS = None
MIN_SPLIT_TILES = 8
# Problems with fewer (query, key) pairs than this take the heuristic config untuned.
TUNE_MIN_PAIRS = 1 << 26


# ---------------------------------------------------------------------------- helpers

# Sizes and mask parameters are loop bounds and comparisons, never addresses: they are not
# specialised (a rollout's Tk changes every frame and must not recompile on each 16-multiple).


@triton.jit
def _load_rows(ptrs, row_mask, offs_d, D, EVEN_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None] & (offs_d < D)[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return x


@triton.jit
def _load_kv(desc, base, n0, j, jin, st, sd, offs_d, D, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
             TMA: tl.constexpr):
    """Key (or value) rows j = n0 + [0, BLOCK_N) of one head: through the head's TMA
    descriptor for an unmasked tile, else pointer loads (masked rows j >= end read 0)."""
    if TMA and not MASKED:
        x = desc.load([n0, 0])
    else:
        x = _load_rows(base + j[:, None] * st + offs_d[None, :] * sd, jin, offs_d, D, EVEN_D, MASKED)
    return x


@triton.jit
def _head_desc(base, T, D, st, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """A 2-D TMA descriptor over one head's [T, D] rows (unit stride along D, checked by the
    launcher), made once per program; columns past D read as zeros. 0 without TMA."""
    if TMA:
        return tl.make_tensor_descriptor(base, [T, D], [st, 1], [BLOCK_T, BLOCK_D])
    else:
        return 0


@triton.jit
def _store_rows(base, x, rows, row_mask, offs_d, D, s_row, s_d):
    tl.store(base + rows[:, None] * s_row + offs_d[None, :] * s_d, x.to(base.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d < D)[None, :])


@triton.jit
def _visible(j, ce, lo, SINK_END, HAS_WINDOW: tl.constexpr):
    """Key positions j against per-query causal ends ce and window starts lo (broadcast)."""
    vis = j < ce
    if HAS_WINDOW:
        vis = vis & ((j >= lo) | (j < SINK_END))
    return vis


@triton.jit
def _query_bounds(p, Tk, FS, W, HAS_WINDOW: tl.constexpr):
    """Per-query causal end and window start (the window start is unused without one)."""
    f = p // FS
    ce = tl.minimum((f + 1) * FS, Tk)
    lo = (f - W + 1) * FS
    return ce, lo


@triton.jit
def _key_ranges(p_first, p_last, Tk, FS, W, SINK_END, KB, b, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_KPM: tl.constexpr):
    """Loop bounds for query positions [p_first, p_last] of batch row b (with a key padding
    mask, KB[b] = (first real key, last real key + 1)): (s_lo, s_full, s_hi, lo, full_lo,
    mid, hi). "Unmasked" tiles ([s_lo, s_full) and [full_lo, mid)) need no position mask
    (they may still hold padding keys: see _kpm_tile); masked: [s_full, s_hi),
    [lo, full_lo) and [mid, hi)."""
    ks = 0
    if HAS_KPM:
        ks = tl.load(KB + 2 * b)
    f_first = p_first // FS
    f_last = p_last // FS
    hi = tl.minimum((f_last + 1) * FS, Tk)
    full_hi = tl.minimum((f_first + 1) * FS, Tk)
    if HAS_WINDOW:
        lo = tl.maximum((f_first - W + 1) * FS, 0)
        full_lo = tl.maximum((f_last - W + 1) * FS, 0)
        s_hi = tl.minimum(SINK_END, lo)
    else:
        lo = p_first * 0
        full_lo = lo
        s_hi = lo
    if HAS_KPM:
        # Keys outside [ks, ke) are padding for this batch row: no range reaches them, so
        # left and right padding cost nothing; holes inside are handled tile by tile.
        ke = tl.load(KB + 2 * b + 1)
        hi = tl.minimum(hi, ke)
        s_hi = tl.minimum(s_hi, ke)
    s_lo = tl.minimum(ks, s_hi)
    lo = tl.maximum(lo, ks)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    s_full = s_lo + (s_hi - s_lo) // BLOCK_N * BLOCK_N
    mid = full_lo + (full_hi - full_lo) // BLOCK_N * BLOCK_N
    return s_lo, s_full, s_hi, lo, full_lo, mid, hi


@triton.jit
def _query_block(rows, heads, BLOCK_M: tl.constexpr, pid):
    """(query block, batch, head) of program ``pid``: blocks of one head adjacent, heaviest first."""
    n_m = tl.cdiv(rows, BLOCK_M)
    bh = pid // n_m
    return n_m - 1 - pid % n_m, (bh // heads).to(tl.int64), bh % heads, bh


# ---------------------------------------------------------------------------- forward


@triton.jit
def _finite(x):
    return tl.abs(x.to(tl.float32)) < float("inf")  # False for +-inf and NaN


@triton.jit
def _kpm_tile(kpm_base, smt, j, jin):
    """Key validity of one key tile, loaded once per tile: (valid [BLOCK_N], mixed), mixed a
    scalar, True when some key of the tile is padding. Tiles of real keys only (the common
    case) then take exactly the unmasked path; only mixed tiles pay a per-element select."""
    kv = tl.load(kpm_base + j * smt, mask=jin, other=0) != 0
    mixed = tl.min(kv.to(tl.int32), 0) == 0
    return kv, mixed


@triton.jit
def _fwd_range(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kpm_base, skt, skd, svt, svd, smt, start, end, ce,
               lo, SINK_END, qk_scale, bias, offs_n, offs_d, D, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr,
               STAGES: tl.constexpr, KV_TMA: tl.constexpr):
    """Online softmax over keys [start, end). m_i is the running max of the log2-domain
    scores (-inf before the first visible key); probabilities are exp2(s - m - bias), so
    l_i <= 1 and acc stays within max|v| (bias, an int: ceil(log2(key count)), 0 for fp16).
    With KV_TMA, the tiles of an unmasked range (whole tiles inside [0, Tk)) come through the
    head's descriptors; masked ranges keep pointer loads (their last tile may be partial)."""
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        j = n0 + offs_n
        jin = j < end
        k = _load_kv(k_desc, k_base, n0, j, jin, skt, skd, offs_d, D, EVEN_D, MASKED, KV_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        if HAS_KPM:
            kv, mixed = _kpm_tile(kpm_base, smt, j, jin)
        if MASKED:
            vis = jin[None, :] & _visible(j[None, :], ce[:, None], lo[:, None], SINK_END, HAS_WINDOW)
            if HAS_KPM:
                vis = vis & kv[None, :]
            s = tl.where(vis, s * qk_scale, float("-inf"))
        else:
            s = s * qk_scale
            if HAS_KPM:
                if mixed:
                    s = tl.where(kv[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet keeps m = -inf; subtracting 0 instead gives p = 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - (m_sub + bias)[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv(v_desc, v_base, n0, j, jin, svt, svd, offs_d, D, EVEN_D, MASKED, KV_TMA)
        acc = acc * alpha[:, None]
        if MASKED:
            # Edge tiles only (inside fully visible tiles every key is seen anyway): a
            # non-finite value behind a key a row cannot see would turn 0 * v into NaN, so
            # such values are zeroed for the product and the rows that do see one get NaN.
            fin = _finite(v)
            v = tl.where(fin, v, 0.0)
            bad = tl.max(tl.where(fin, 0, 1), 1)
            hit = tl.max(tl.where(vis, bad[None, :], 0), 1)
            acc = tl.where((hit > 0)[:, None], float("nan"), acc)
        elif HAS_KPM:
            if mixed:
                # the same for padding keys inside a position-unmasked tile (every row sees the rest)
                fin = _finite(v)
                v = tl.where(fin, v, 0.0)
                bad = tl.max(tl.where(fin, 0, 1), 1)
                hit = tl.max(tl.where(kv, bad, 0), 0)
                acc = tl.where(hit > 0, float("nan"), acc)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _split_range(start, end, first, a, b, BLOCK_N: tl.constexpr):
    """Part of key range [start, end) (its tiles numbered from ``first`` in the program's
    tile order) that falls in tiles [a, b): whole tiles from ``start``, so an unmasked range
    stays a whole number of tiles. Returns (start, end, first tile of the next range)."""
    n = tl.cdiv(tl.maximum(end - start, 0), BLOCK_N)
    lo = tl.minimum(tl.maximum(a - first, 0), n)
    hi = tl.minimum(tl.maximum(b - first, 0), n)
    return start + lo * BLOCK_N, tl.minimum(start + hi * BLOCK_N, end), first + n


@triton.jit(do_not_specialize=["Hkv", "G", "Tq", "Tk", "FS", "W", "SINK_END", "bias", "tune_rows", "tune_fs",
                               "n_split"])
def _fwd_kernel(Q, K, V, O, LSE, KPM, KB,
                sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, slb, slh, slt, smb, smt,
                sos, sls, Hkv, G, Tq, Tk, FS, W, SINK_END, qk_scale, bias, tune_rows, tune_fs, n_split,
                D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
                SPLIT_K: tl.constexpr, KV_TMA: tl.constexpr):
    rows = G * Tq
    pid = tl.program_id(0)
    if SPLIT_K:
        # Flash-decoding: n_split adjacent programs share a query block, each takes a
        # contiguous share of its key tiles and writes a partial (o, lse) to O/LSE[split].
        split = pid % n_split
        pid = pid // n_split
        O += split.to(tl.int64) * sos
        LSE += split.to(tl.int64) * sls
    pid_m, b, hk, _ = _query_block(rows, Hkv, BLOCK_M, pid)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < rows
    i = r % Tq
    h = hk * G + r // Tq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_rows(Q + b * sqb + (h * sqh + i * sqt)[:, None] + offs_d[None, :] * sqd, rmask, offs_d, D, EVEN_D, True)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    kpm_base = KPM + b * smb
    # K/V descriptors of this program's head, made once (not per range or tile: each one
    # is written to global scratch and fenced); only unmasked ranges load through them.
    k_desc = _head_desc(k_base, Tk, D, skt, BLOCK_N, BLOCK_D, KV_TMA)
    v_desc = _head_desc(v_base, Tk, D, svt, BLOCK_N, BLOCK_D, KV_TMA)

    p_first = Tk - Tq + tl.min(tl.where(rmask, i, Tq), 0)
    p_last = Tk - Tq + tl.max(tl.where(rmask, i, 0), 0)
    ce, lo = _query_bounds(Tk - Tq + i, Tk, FS, W, HAS_WINDOW)
    s_lo, s_full, s_hi, k_lo, full_lo, mid, k_hi = _key_ranges(p_first, p_last, Tk, FS, W, SINK_END, KB, b, BLOCK_N,
                                                               HAS_WINDOW, HAS_KPM)
    # The five key ranges: [sinks unmasked][sink tail][window head][full tiles][diagonal].
    a1, b1, a2, b2, a3, b3, a4, b4, a5, b5 = s_lo, s_full, s_full, s_hi, k_lo, full_lo, full_lo, mid, mid, k_hi
    if SPLIT_K:
        n_tiles = tl.cdiv(b1 - a1, BLOCK_N) + tl.cdiv(b2 - a2, BLOCK_N) + tl.cdiv(b3 - a3, BLOCK_N) + \
            tl.cdiv(b4 - a4, BLOCK_N) + tl.cdiv(b5 - a5, BLOCK_N)
        t_a = n_tiles * split // n_split
        t_b = n_tiles * (split + 1) // n_split
        a1, b1, t = _split_range(a1, b1, 0, t_a, t_b, BLOCK_N)
        a2, b2, t = _split_range(a2, b2, t, t_a, t_b, BLOCK_N)
        a3, b3, t = _split_range(a3, b3, t, t_a, t_b, BLOCK_N)
        a4, b4, t = _split_range(a4, b4, t, t_a, t_b, BLOCK_N)
        a5, b5, t = _split_range(a5, b5, t, t_a, t_b, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_WINDOW:
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kpm_base, skt, skd, svt, svd,
                                   smt, a1, b1, ce, lo, SINK_END, qk_scale, bias, offs_n, offs_d, D, EVEN_D, BLOCK_N,
                                   False, HAS_WINDOW, HAS_KPM, PREC, STAGES, KV_TMA)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kpm_base, skt, skd, svt, svd,
                                   smt, a2, b2, ce, lo, SINK_END, qk_scale, bias, offs_n, offs_d, D, EVEN_D, BLOCK_N,
                                   True, HAS_WINDOW, HAS_KPM, PREC, STAGES, KV_TMA)
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kpm_base, skt, skd, svt, svd,
                                   smt, a3, b3, ce, lo, SINK_END, qk_scale, bias, offs_n, offs_d, D, EVEN_D, BLOCK_N,
                                   True, HAS_WINDOW, HAS_KPM, PREC, STAGES, KV_TMA)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kpm_base, skt, skd, svt, svd, smt, a4,
                               b4, ce, lo, SINK_END, qk_scale, bias, offs_n, offs_d, D, EVEN_D, BLOCK_N,
                               False, HAS_WINDOW, HAS_KPM, PREC, STAGES, KV_TMA)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, kpm_base, skt, skd, svt, svd, smt, a5,
                               b5, ce, lo, SINK_END, qk_scale, bias, offs_n, offs_d, D, EVEN_D, BLOCK_N,
                               True, HAS_WINDOW, HAS_KPM, PREC, STAGES, KV_TMA)

    # Rows that see no key (left padding; tile padding) give 0 and lse = -inf.
    empty = l_i == 0
    l_i = tl.where(empty, 1.0, l_i)
    out = acc / l_i[:, None]
    omask = rmask[:, None] & (offs_d < D)[None, :]
    tl.store(O + b * sob + (h * soh + i * sot)[:, None] + offs_d[None, :] * sod, out.to(O.dtype.element_ty), mask=omask)
    lse = tl.where(empty, float("-inf"), (m_i + bias + tl.math.log2(l_i)) * LN2)
    tl.store(LSE + b * slb + h * slh + i * slt, lse, mask=rmask)


@triton.jit(do_not_specialize=["rows", "n_split", "Hq", "Tq"])
def _merge_splits_kernel(PO, PLSE, O, LSE, sob, soh, sot, sod, slb, slh, slt, rows, n_split, Hq, Tq, D,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out, lse of each row from the n_split partial (o, lse) of the key-split forward
    (PO [n_split, rows, D], PLSE [n_split, rows] contiguous, rows = B * Hq * Tq). Splits
    that saw no key (lse = -inf) weigh 0; a row no split saw stays 0 with lse = -inf."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    d = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (d < D)[None, :]
    r64 = r.to(tl.int64)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(n_split):
        m = tl.maximum(m, tl.load(PLSE + s * rows + r64, mask=rmask, other=float("-inf")))
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(n_split):
        w = tl.math.exp2((tl.load(PLSE + s * rows + r64, mask=rmask, other=float("-inf")) - m_sub) * LOG2E)
        o = tl.load(PO + (s * rows + r64)[:, None] * D + d[None, :], mask=mask, other=0.0)
        acc += w[:, None] * o
        l_i += w
    empty = l_i == 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l_i)))
    b = r64 // (Hq * Tq)
    h = (r // Tq) % Hq
    i = r % Tq
    tl.store(O + (b * sob + h * soh + i * sot)[:, None] + d[None, :] * sod, out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + b * slb + h * slh + i * slt, lse, mask=rmask)


@triton.jit
def _short_offsets(R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BHkv, Hkv, G, Tq, Tk):
    """Index vectors of one program of the short kernels: R (batch, K/V head) sequences,
    virtual query rows r = g * Tq + i, keys j, lanes d."""
    s = tl.program_id(0) * R + tl.arange(0, R)
    smask = s < BHkv
    s = tl.where(smask, s, 0)
    b = (s // Hkv).to(tl.int64)
    hk = s % Hkv
    r = tl.arange(0, BLOCK_M)
    rmask = r < G * Tq
    i = r % Tq
    h = hk[:, None] * G + (r // Tq)[None, :]
    j = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    return smask, b, hk, rmask, i, h, j, d


@triton.jit
def _short_mask(KPM, smb, smt, b, smask, rmask, i, j, Tq, Tk, FS, W, SINK_END, HAS_WINDOW: tl.constexpr,
                HAS_KPM: tl.constexpr):
    ce, lo = _query_bounds(Tk - Tq + i, Tk, FS, W, HAS_WINDOW)
    vis = _visible(j[None, :], ce[:, None], lo[:, None], SINK_END, HAS_WINDOW) & rmask[:, None]
    vis = vis[None, :, :] & smask[:, None, None]
    if HAS_KPM:
        kv = tl.load(KPM + b[:, None] * smb + j[None, :] * smt, mask=smask[:, None] & (j < Tk)[None, :], other=0)
        vis = vis & (kv != 0)[:, None, :]
    return vis


@triton.jit(do_not_specialize=["BHkv", "Hkv", "G", "Tq", "Tk", "FS", "W", "SINK_END", "bias"])
def _fwd_short_kernel(Q, K, V, O, LSE, KPM,
                      sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, slb, slh, slt,
                      smb, smt,
                      BHkv, Hkv, G, Tq, Tk, FS, W, SINK_END, qk_scale, bias,
                      D, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      R: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr):
    smask, b, hk, rmask, i, h, j, d = _short_offsets(R, BLOCK_M, BLOCK_N, BLOCK_D, BHkv, Hkv, G, Tq, Tk)
    dmask = (d < D)[None, None, :]
    qmask = smask[:, None, None] & rmask[None, :, None] & dmask
    kmask = smask[:, None, None] & (j < Tk)[None, :, None] & dmask
    q = tl.load(Q + (b[:, None] * sqb + h * sqh + i[None, :] * sqt)[:, :, None] + d[None, None, :] * sqd,
                mask=qmask, other=0.0)
    k = tl.load(K + (b * skb + hk * skh)[:, None, None] + j[None, :, None] * skt + d[None, None, :] * skd,
                mask=kmask, other=0.0)
    v = tl.load(V + (b * svb + hk * svh)[:, None, None] + j[None, :, None] * svt + d[None, None, :] * svd,
                mask=kmask, other=0.0)
    s = tl.dot(q, tl.trans(k, (0, 2, 1)), input_precision=PREC)
    vis = _short_mask(KPM, smb, smt, b, smask, rmask, i, j, Tq, Tk, FS, W, SINK_END, HAS_WINDOW, HAS_KPM)
    s = tl.where(vis, s * qk_scale, float("-inf"))
    m = tl.max(s, 2)
    m = tl.where(m == float("-inf"), 0.0, m) + bias  # rows without keys: p = exp2(-inf) = 0, not NaN
    p = tl.math.exp2(s - m[:, :, None])
    l_i = tl.sum(p, 2)
    empty = l_i == 0
    l_i = tl.where(empty, 1.0, l_i)
    # Non-finite values behind invisible keys must not leak in as 0 * inf (see _fwd_range).
    fin = _finite(v)
    bad = tl.max(tl.where(fin, 0, 1), 2)
    hit = tl.max(tl.where(vis, bad[:, None, :], 0), 2) > 0
    out = tl.dot(p.to(v.dtype), tl.where(fin, v, 0.0), input_precision=PREC) / l_i[:, :, None]
    out = tl.where(hit[:, :, None], float("nan"), out)
    tl.store(O + (b[:, None] * sob + h * soh + i[None, :] * sot)[:, :, None] + d[None, None, :] * sod,
             out.to(O.dtype.element_ty), mask=qmask)
    lmask = smask[:, None] & rmask[None, :]
    lse = tl.where(empty, float("-inf"), (m + tl.math.log2(l_i)) * LN2)
    tl.store(LSE + b[:, None] * slb + h * slh + i[None, :] * slt, lse, mask=lmask)


# ---------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["Hq", "Tq"])
def _bwd_preprocess_kernel(O, DO, DLSE, DELTA, sob, soh, sot, sod, sgb, sgh, sgt, sgd, slb, slh, slt,
                           Hq, Tq, D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           HAS_DLSE: tl.constexpr):
    n_m = tl.cdiv(Tq, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_m
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    i = pid % n_m * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < Tq
    d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * sob + h * soh + i[:, None] * sot + d[None, :] * sod, imask, d, D, EVEN_D, True)
    g = _load_rows(DO + b * sgb + h * sgh + i[:, None] * sgt + d[None, :] * sgd, imask, d, D, EVEN_D, True)
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b * slb + h * slh + i * slt, mask=imask, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * Tq + i, delta, mask=imask)


@triton.jit
def _dkdv_range(dk, dv, k, v, q_base, do_base, q_desc, do_desc, h, lse_base, delta_base, sqt, sqd, sgt, sgd,
                slt, start, end, j, Tq, Tk, FS, W, SINK_END, kv, qk_scale, offs_m, offs_d, D, EVEN_D: tl.constexpr,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                PREC: tl.constexpr, STAGES: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
                QD_TMA: tl.constexpr):
    """dK and/or dV (DO_DK, DO_DV) of one key block over the queries [start, end). With
    QD_TMA an unmasked range reads q and dO of head h through the program's 3-D descriptors;
    the masked edge ranges keep pointer loads."""
    for m0 in tl.range(start, end, BLOCK_M, num_stages=1 if MASKED else STAGES):
        i = m0 + offs_m
        iin = i < end
        # A scalar row pointer plus one offset tile shared by every loop: per-element
        # pointers would be precomputed for each of the loops and all kept live (spills).
        if QD_TMA and not MASKED:
            q = q_desc.load([h, m0, 0]).reshape(BLOCK_M, q_desc.block_shape[2])
            do = do_desc.load([h, m0, 0]).reshape(BLOCK_M, do_desc.block_shape[2])
        else:
            q = _load_rows(q_base + m0 * sqt + (offs_m[:, None] * sqt + offs_d[None, :] * sqd), iin, offs_d, D,
                           EVEN_D, MASKED)
            do = _load_rows(do_base + m0 * sgt + (offs_m[:, None] * sgt + offs_d[None, :] * sgd), iin, offs_d, D,
                            EVEN_D, MASKED)
        if MASKED:
            lse2 = tl.load(lse_base + m0 * slt + offs_m * slt, mask=iin, other=0.0) * LOG2E
        else:
            lse2 = tl.load(lse_base + m0 * slt + offs_m * slt) * LOG2E
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            ce, lo = _query_bounds(Tk - Tq + i, Tk, FS, W, HAS_WINDOW)
            vis = iin[None, :] & _visible(j[:, None], ce[None, :], lo[None, :], SINK_END, HAS_WINDOW)
            if HAS_KPM:
                vis = vis & kv[:, None]
            # Edge tiles: queries that cannot see a key (and whatever non-finite q, dO,
            # lse or delta they carry) must not reach its gradient; 0 * NaN would.
            p_t = tl.where(vis, p_t, 0.0)
        if DO_DV:
            if MASKED:
                fin_do = _finite(do)
                hit = tl.max(tl.where(vis, tl.max(tl.where(fin_do, 0, 1), 1)[None, :], 0), 1)
                dv = tl.where((hit > 0)[:, None], float("nan"), dv)
                dv = tl.dot(p_t.to(do.dtype), tl.where(fin_do, do, 0.0), dv, input_precision=PREC)
            else:
                dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
        if DO_DK:
            if MASKED:
                delta = tl.load(delta_base + m0 + offs_m, mask=iin, other=0.0)
            else:
                delta = tl.load(delta_base + m0 + offs_m)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            if MASKED:
                ds_t = tl.where(vis, ds_t, 0.0)
                q = tl.where(_finite(q), q, 0.0)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_pass(dk, dv, k, v, Q, DO, q_desc, do_desc, LSE, DELTA, b, hk, sqb, sqh, sqt, sqd, sgb, sgh, sgt, sgd, slb,
               slh, slt, Hkv, G, q_lo, qf_lo, mid, q_hi, j, Tq, Tk, FS, W, SINK_END, kv, qk_scale, offs_m, offs_d, D,
               EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
               PREC: tl.constexpr, STAGES: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
               QD_TMA: tl.constexpr):
    """The G query heads of this K/V head over [q_lo, q_hi): masked head, unmasked middle, masked tail.
    Edge tiles (a few per key block) run unpipelined on half-height query tiles: their mask and
    non-finite handling would otherwise set the register budget of the whole kernel."""
    EDGE_M: tl.constexpr = max(BLOCK_M // 2, 16)
    offs_e = tl.arange(0, EDGE_M)
    for g in range(G):
        h = hk * G + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sgb + h * sgh
        lse_base = LSE + b * slb + h * slh
        delta_base = DELTA + (b * Hkv * G + h) * Tq
        dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, q_desc, do_desc, h, lse_base, delta_base, sqt, sqd, sgt,
                             sgd, slt, q_lo, qf_lo, j, Tq, Tk, FS, W, SINK_END, kv, qk_scale, offs_e, offs_d, D, EVEN_D,
                             EDGE_M, True, HAS_WINDOW, HAS_KPM, PREC, STAGES, DO_DK, DO_DV, QD_TMA)
        dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, q_desc, do_desc, h, lse_base, delta_base, sqt, sqd, sgt,
                             sgd, slt, qf_lo, mid, j, Tq, Tk, FS, W, SINK_END, kv, qk_scale, offs_m, offs_d, D, EVEN_D,
                             BLOCK_M, False, HAS_WINDOW, HAS_KPM, PREC, STAGES, DO_DK, DO_DV, QD_TMA)
        dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, q_desc, do_desc, h, lse_base, delta_base, sqt, sqd, sgt,
                             sgd, slt, mid, q_hi, j, Tq, Tk, FS, W, SINK_END, kv, qk_scale, offs_e, offs_d, D, EVEN_D,
                             EDGE_M, True, HAS_WINDOW, HAS_KPM, PREC, STAGES, DO_DK, DO_DV, QD_TMA)
    return dk, dv


@triton.jit(do_not_specialize=["Hkv", "G", "Tq", "Tk", "FS", "W", "SINK_END", "SINK_FRAMES", "tune_rows",
                               "tune_fs"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, KPM, DK, DV,
                     sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sgb, sgh, sgt, sgd, slb, slh, slt,
                     smb, smt,
                     sdkb, sdkh, sdkt, sdkd, sdvb, sdvh, sdvt, sdvd,
                     Hkv, G, Tq, Tk, FS, W, SINK_END, SINK_FRAMES, qk_scale, scale, tune_rows, tune_fs,
                     D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
                     SPLIT: tl.constexpr, QD_TMA: tl.constexpr):
    n_n = tl.cdiv(Tk, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % n_n
    bh = pid // n_n
    b = (bh // Hkv).to(tl.int64)
    hk = bh % Hkv
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = j < Tk
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * skb + hk * skh + j[:, None] * skt + offs_d[None, :] * skd, jmask, offs_d, D, EVEN_D, True)
    v = _load_rows(V + b * svb + hk * svh + j[:, None] * svt + offs_d[None, :] * svd, jmask, offs_d, D, EVEN_D, True)

    # The queries that see this key block: one range, fully visible in the middle.
    off = Tk - Tq
    j_first = pid_n * BLOCK_N
    j_last = tl.minimum(j_first + BLOCK_N, Tk) - 1
    fj_first = j_first // FS
    fj_last = j_last // FS
    q_lo = tl.maximum(fj_first * FS - off, 0)
    qf_lo = tl.maximum(fj_last * FS - off, 0)
    q_hi = Tq + q_lo * 0
    qf_hi = q_hi
    if HAS_WINDOW:
        q_hi = tl.where(j_first < SINK_END, q_hi, tl.minimum((fj_last + W) * FS - off, Tq))
        qf_hi = tl.where(j_last < SINK_END, qf_hi, tl.minimum((tl.maximum(fj_first, SINK_FRAMES) + W) * FS - off, Tq))
    kv = jmask
    if HAS_KPM:
        # Padding keys are seen by nobody: validity is read once for this key block; a block
        # of padding only is skipped, one mixing padding and real keys is masked throughout.
        kv = tl.load(KPM + b * smb + j * smt, mask=jmask, other=0) != 0
        n_real = tl.sum(kv.to(tl.int32), 0)
        q_hi = tl.where(n_real == 0, q_lo, q_hi)
        qf_hi = tl.where(n_real < tl.sum(jmask.to(tl.int32), 0), qf_lo * 0, qf_hi)
    q_hi = tl.maximum(q_hi, q_lo)
    qf_lo = tl.minimum(tl.maximum(qf_lo, q_lo), q_hi)
    qf_hi = tl.maximum(tl.minimum(qf_hi, q_hi), qf_lo)
    mid = qf_lo + (qf_hi - qf_lo) // BLOCK_M * BLOCK_M

    # q/dO descriptors over this batch row's [Hq, Tq, D], made once per program: the head
    # loop only changes a coordinate (per-head descriptors inside it spilled at D = 128).
    if QD_TMA:
        q_desc = tl.make_tensor_descriptor(Q + b * sqb, [Hkv * G, Tq, D], [sqh, sqt, 1], [1, BLOCK_M, BLOCK_D])
        do_desc = tl.make_tensor_descriptor(DO + b * sgb, [Hkv * G, Tq, D], [sgh, sgt, 1], [1, BLOCK_M, BLOCK_D])
    else:
        q_desc = 0
        do_desc = 0
    zero = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if SPLIT:
        # Two passes over the queries, dV then dK: one accumulator live at a time (half the
        # registers of the fused pass, which spills at D = 128) for one extra q k^T per tile.
        zero, dv = _dkdv_pass(zero, zero, k, v, Q, DO, q_desc, do_desc, LSE, DELTA, b, hk, sqb, sqh, sqt, sqd, sgb,
                              sgh, sgt, sgd,
                              slb, slh, slt, Hkv, G, q_lo, qf_lo, mid, q_hi, j, Tq, Tk, FS, W, SINK_END, kv,
                              qk_scale, offs_m, offs_d, D, EVEN_D, BLOCK_M, HAS_WINDOW, HAS_KPM, PREC, STAGES,
                              False, True, QD_TMA)
        _store_rows(DV + b * sdvb + hk * sdvh, dv, j, jmask, offs_d, D, sdvt, sdvd)
        dk, zero = _dkdv_pass(zero, zero, k, v, Q, DO, q_desc, do_desc, LSE, DELTA, b, hk, sqb, sqh, sqt, sqd, sgb,
                              sgh, sgt, sgd,
                              slb, slh, slt, Hkv, G, q_lo, qf_lo, mid, q_hi, j, Tq, Tk, FS, W, SINK_END, kv,
                              qk_scale, offs_m, offs_d, D, EVEN_D, BLOCK_M, HAS_WINDOW, HAS_KPM, PREC, STAGES,
                              True, False, QD_TMA)
    else:
        dk, dv = _dkdv_pass(zero, zero, k, v, Q, DO, q_desc, do_desc, LSE, DELTA, b, hk, sqb, sqh, sqt, sqd, sgb, sgh,
                            sgt, sgd, slb, slh, slt, Hkv, G, q_lo, qf_lo, mid, q_hi, j, Tq, Tk, FS, W, SINK_END, kv,
                            qk_scale, offs_m, offs_d, D, EVEN_D, BLOCK_M, HAS_WINDOW, HAS_KPM, PREC, STAGES,
                            True, True, QD_TMA)
        _store_rows(DV + b * sdvb + hk * sdvh, dv, j, jmask, offs_d, D, sdvt, sdvd)
    _store_rows(DK + b * sdkb + hk * sdkh, dk * scale, j, jmask, offs_d, D, sdkt, sdkd)


@triton.jit
def _dq_range(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, kpm_base, skt, skd, svt, svd, smt, start, end,
              ce, lo, SINK_END, qk_scale, offs_n, offs_d, D, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr,
              STAGES: tl.constexpr, KV_TMA: tl.constexpr):
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        j = n0 + offs_n
        jin = j < end
        k = _load_kv(k_desc, k_base, n0, j, jin, skt, skd, offs_d, D, EVEN_D, MASKED, KV_TMA)
        v = _load_kv(v_desc, v_base, n0, j, jin, svt, svd, offs_d, D, EVEN_D, MASKED, KV_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if MASKED:
            # Edge tiles: a non-finite key or value a row cannot see must not reach its dq
            # (a visible one already makes p or dp, hence ds, NaN).
            vis = jin[None, :] & _visible(j[None, :], ce[:, None], lo[:, None], SINK_END, HAS_WINDOW)
            if HAS_KPM:
                kv, mixed = _kpm_tile(kpm_base, smt, j, jin)
                vis = vis & kv[None, :]
            ds = tl.where(vis, ds, 0.0)
            k = tl.where(_finite(k), k, 0.0)
        elif HAS_KPM:
            kv, mixed = _kpm_tile(kpm_base, smt, j, jin)
            if mixed:
                ds = tl.where(kv[None, :], ds, 0.0)
                k = tl.where(_finite(k), k, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit(do_not_specialize=["Hq", "G", "Tq", "Tk", "FS", "W", "SINK_END", "tune_rows", "tune_fs"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, KPM, KB, DQ,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sgb, sgh, sgt, sgd, slb, slh, slt,
                   smb, smt,
                   sdqb, sdqh, sdqt, sdqd,
                   Hq, G, Tq, Tk, FS, W, SINK_END, qk_scale, scale, tune_rows, tune_fs,
                   D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
                   KV_TMA: tl.constexpr):
    pid_m, b, h, bh = _query_block(Tq, Hq, BLOCK_M, tl.program_id(0))
    hk = h // G
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < Tq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh + i[:, None] * sqt + offs_d[None, :] * sqd, imask, offs_d, D, EVEN_D, True)
    do = _load_rows(DO + b * sgb + h * sgh + i[:, None] * sgt + offs_d[None, :] * sgd, imask, offs_d, D, EVEN_D, True)
    lse2 = tl.load(LSE + b * slb + h * slh + i * slt, mask=imask, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + i, mask=imask, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    kpm_base = KPM + b * smb
    k_desc = _head_desc(k_base, Tk, D, skt, BLOCK_N, BLOCK_D, KV_TMA)  # once per program, as in the forward
    v_desc = _head_desc(v_base, Tk, D, svt, BLOCK_N, BLOCK_D, KV_TMA)

    p_first = Tk - Tq + pid_m * BLOCK_M
    p_last = Tk - Tq + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq) - 1
    ce, lo = _query_bounds(Tk - Tq + i, Tk, FS, W, HAS_WINDOW)
    s_lo, s_full, s_hi, k_lo, full_lo, mid, k_hi = _key_ranges(p_first, p_last, Tk, FS, W, SINK_END, KB, b, BLOCK_N,
                                                               HAS_WINDOW, HAS_KPM)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_WINDOW:
        dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, kpm_base, skt, skd, svt, svd, smt, s_lo,
                       s_full, ce, lo, SINK_END, qk_scale, offs_n, offs_d, D, EVEN_D, BLOCK_N, False,
                       HAS_WINDOW, HAS_KPM, PREC, STAGES, KV_TMA)
        dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, kpm_base, skt, skd, svt, svd, smt,
                       s_full, s_hi, ce, lo, SINK_END, qk_scale, offs_n, offs_d, D, EVEN_D, BLOCK_N, True,
                       HAS_WINDOW, HAS_KPM, PREC, STAGES, KV_TMA)
        dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, kpm_base, skt, skd, svt, svd, smt, k_lo,
                       full_lo, ce, lo, SINK_END, qk_scale, offs_n, offs_d, D, EVEN_D, BLOCK_N, True,
                       HAS_WINDOW, HAS_KPM, PREC, STAGES, KV_TMA)
    dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, kpm_base, skt, skd, svt, svd, smt, full_lo,
                       mid, ce, lo, SINK_END, qk_scale, offs_n, offs_d, D, EVEN_D, BLOCK_N, False,
                       HAS_WINDOW, HAS_KPM, PREC, STAGES, KV_TMA)
    dq = _dq_range(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, kpm_base, skt, skd, svt, svd, smt, mid,
                       k_hi, ce, lo, SINK_END, qk_scale, offs_n, offs_d, D, EVEN_D, BLOCK_N, True,
                       HAS_WINDOW, HAS_KPM, PREC, STAGES, KV_TMA)
    tl.store(DQ + b * sdqb + h * sdqh + i[:, None] * sdqt + offs_d[None, :] * sdqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=imask[:, None] & (offs_d < D)[None, :])


@triton.jit(do_not_specialize=["BHkv", "Hkv", "G", "Tq", "Tk", "FS", "W", "SINK_END"])
def _bwd_short_kernel(Q, K, V, O, DO, LSE, DLSE, KPM, DQ, DK, DV,
                      sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
                      sgb, sgh, sgt, sgd, slb, slh, slt, sdb, sdh, sdt, smb, smt,
                      sdqb, sdqh, sdqt, sdqd, sdkb, sdkh, sdkt, sdkd, sdvb, sdvh, sdvt, sdvd,
                      BHkv, Hkv, G, Tq, Tk, FS, W, SINK_END, qk_scale, scale,
                      D, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      R: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DLSE: tl.constexpr,
                      PREC: tl.constexpr):
    smask, b, hk, rmask, i, h, j, d = _short_offsets(R, BLOCK_M, BLOCK_N, BLOCK_D, BHkv, Hkv, G, Tq, Tk)
    dmask = (d < D)[None, None, :]
    qmask = smask[:, None, None] & rmask[None, :, None] & dmask
    kmask = smask[:, None, None] & (j < Tk)[None, :, None] & dmask
    lmask = smask[:, None] & rmask[None, :]
    rb = b[:, None]
    ri = i[None, :]
    q = tl.load(Q + (rb * sqb + h * sqh + ri * sqt)[:, :, None] + d[None, None, :] * sqd, mask=qmask, other=0.0)
    o = tl.load(O + (rb * sob + h * soh + ri * sot)[:, :, None] + d[None, None, :] * sod, mask=qmask, other=0.0)
    do = tl.load(DO + (rb * sgb + h * sgh + ri * sgt)[:, :, None] + d[None, None, :] * sgd, mask=qmask,
                 other=0.0)
    kv = (b * skb + hk * skh)[:, None, None] + j[None, :, None] * skt + d[None, None, :] * skd
    k = tl.load(K + kv, mask=kmask, other=0.0)
    v = tl.load(V + (b * svb + hk * svh)[:, None, None] + j[None, :, None] * svt + d[None, None, :] * svd, mask=kmask,
                other=0.0)
    lse2 = tl.load(LSE + rb * slb + h * slh + ri * slt, mask=lmask, other=0.0) * LOG2E
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 2)
    if HAS_DLSE:
        delta -= tl.load(DLSE + rb * sdb + h * sdh + ri * sdt, mask=lmask, other=0.0)

    s = tl.dot(q, tl.trans(k, (0, 2, 1)), input_precision=PREC) * qk_scale
    vis = _short_mask(KPM, smb, smt, b, smask, rmask, i, j, Tq, Tk, FS, W, SINK_END, HAS_WINDOW, HAS_KPM)
    p = tl.where(vis, tl.math.exp2(s - lse2[:, :, None]), 0.0)
    # As in the tiled kernels: non-finite data on one side of an invisible pair stays there.
    fin_do = _finite(do)
    hit = tl.max(tl.where(vis, tl.max(tl.where(fin_do, 0, 1), 2)[:, :, None], 0), 1) > 0
    dv = tl.dot(tl.trans(p.to(do.dtype), (0, 2, 1)), tl.where(fin_do, do, 0.0), input_precision=PREC)
    dv = tl.where(hit[:, :, None], float("nan"), dv)
    dp = tl.dot(do, tl.trans(v, (0, 2, 1)), input_precision=PREC)
    ds = tl.where(vis, p * (dp - delta[:, :, None]), 0.0)
    dq = tl.dot(ds.to(k.dtype), tl.where(_finite(k), k, 0.0), input_precision=PREC) * scale
    dk = tl.dot(tl.trans(ds.to(q.dtype), (0, 2, 1)), tl.where(_finite(q), q, 0.0), input_precision=PREC) * scale
    tl.store(DQ + (rb * sdqb + h * sdqh + ri * sdqt)[:, :, None] + d[None, None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=qmask)
    tl.store(DK + (b * sdkb + hk * sdkh)[:, None, None] + j[None, :, None] * sdkt + d[None, None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + (b * sdvb + hk * sdvh)[:, None, None] + j[None, :, None] * sdvt + d[None, None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kmask)


# ---------------------------------------------------------------------------- configs


def _cfg(bm, bn, warps, stages, split=None):
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "STAGES": stages}
    if split is not None:  # dK/dV only: two passes (dV, then dK) instead of one fused pass
        kw["SPLIT"] = split
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _bucket(x):
    return min(triton.next_power_of_2(max(int(x), 1)), 1 << 14)


# (BLOCK_M, BLOCK_N, warps, stages) per kernel and tier; the first of each list is the
# untuned heuristic. Hopper: 128-row query tiles with 64/128-key tiles and 2-3 stages for
# D <= 128; D = 256 and fp32 ("wide") halve the tiles, fp32 with D = 256 quarters them, to
# fit 227 KB of shared memory (checked by tests/ops/test_kernels_compile.py for the bf16 ones).
# Every candidate is a shipped config: at D = 128 none spills on sm_90a (the compile report
# gates it). Dropped for spilling there: fwd 128x128 w8 s2 (56-96 B; 64x64 w4 s3 spilled
# 4 B with key splits, now s2), dK/dV 16x128 w8 fused (32-48 B), dQ 128x32 w4 (236-860 B).
_CONFIGS = {
    "fwd": {"fp32-d256": [(32, 32, 4, 1)], "wide": [(64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
            "d128": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)],
            "d64": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)]},
    "dkdv": {"fp32-d256": [(16, 32, 4, 1, False)], "wide": [(32, 64, 4, 2, False), (16, 64, 4, 2, False)],
             "d128": [(32, 128, 8, 3, True), (32, 128, 8, 2, True), (32, 64, 4, 3, True)],
             "d64": [(32, 128, 8, 3, False), (32, 64, 4, 3, False), (64, 128, 8, 2, False)]},
    "dq": {"fp32-d256": [(32, 16, 4, 1)], "wide": [(64, 32, 4, 2), (64, 16, 4, 2)],
           "d128": [(128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)]},
}


def _configs(kernel, block_d, wide):
    tier = "fp32-d256" if wide and block_d > 128 else "wide" if wide or block_d > 128 else "d128"
    table = _CONFIGS[kernel]
    if tier == "d128" and block_d <= 64 and "d64" in table:
        tier = "d64"
    return [_cfg(*c) for c in table[tier]]


_TUNE_KEY = ["BLOCK_D", "HAS_WINDOW", "HAS_KPM", "PREC", "tune_rows", "tune_fs", "KV_TMA", "QD_TMA"]
_TUNED = {}


def _launch(kernel, name, configs, big, grid_rows, args, meta):
    """Launch ``kernel`` with the interpreter's blocks, the heuristic config or, for big
    problems on a GPU, the autotuned one. ``grid_rows(BLOCK)`` gives the 1-D grid. Device-side
    TMA descriptors need global scratch: _device's allocator is installed for the launch."""
    with _device.scratch_allocator():
        _launch_config(kernel, name, configs, big, grid_rows, args, meta)


def _launch_config(kernel, name, configs, big, grid_rows, args, meta):
    if INTERPRET:
        bm, bn = INTERPRET_BLOCKS[name]
        cfg = _cfg(bm, bn, 4, 1, INTERPRET_SPLIT if name == "dkdv" else None)
    elif not big:
        cfg = configs[0]
    else:
        key = (name, len(configs), tuple(sorted(configs[0].kwargs.items())))
        if key not in _TUNED:
            _TUNED[key] = autotune(configs, _TUNE_KEY)(kernel)
        _TUNED[key][lambda m: (grid_rows(m),)](*args, **meta)
        return
    kw = dict(cfg.kwargs)
    kernel[(grid_rows(kw),)](*args, **meta, **kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def tma_operands(D, *tensors):
    """Whether the tiled kernels may load ``tensors`` ([B, H, T, D]) through TMA descriptors:
    an sm_90+ device (``_device.tma_capable``, looked up at call time: the compile report
    patches it), unit stride along D, base and other strides 16-byte multiples (so every
    head's base is aligned too), D a 16-byte multiple (8 elements in 16-bit, 4 in fp32)
    and no empty dims. Otherwise every load stays a pointer load."""
    t0 = tensors[0]
    return (D > 0 and (D * t0.element_size()) % _device.TMA_BYTES == 0
            and all(t.numel() > 0 and _device.tma_strides(t, 3) for t in tensors)
            and _device.tma_capable(t0.device))


def _strides(t, n=4):
    st = t.stride()
    return list(st[:n])


def _common(q, k, mask):
    fs, window, sink_end = mask
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    # fp32 inputs: three tf32 passes on tensor cores (about fp32 accuracy; "ieee" FMA dots
    # compile 3-10x slower and run far slower).
    prec = ("ieee" if INTERPRET else "tf32x3") if q.dtype.itemsize == 4 else "tf32"
    return B, Hq, Hkv, Hq // Hkv, Tq, Tk, D, block_d, fs, window, sink_end, prec


def _short_meta(G, Tq, Tk, block_d, budget=8192):
    """(BLOCK_M, BLOCK_N, R): R sequences per program, R * rows * BLOCK_D elements <= budget."""
    bm = max(16, triton.next_power_of_2(G * Tq))
    bn = max(16, triton.next_power_of_2(Tk))
    r = max(1, min(16, budget // (max(bm, bn) * block_d)))
    return bm, bn, 1 << (r.bit_length() - 1)


def _prob_bias(dtype, tk):
    """log2 of the key count, subtracted from every exponent of the forward so that the
    unnormalised sums stay <= 1 and acc <= max|v| (no overflow for |v| up to the dtype's
    max). fp16: 0, since fp16 probabilities would lose precision as subnormals and fp16
    values (<= 65504) cannot overflow an fp32 sum of 2**100 keys anyway."""
    import torch

    return 0 if dtype == torch.float16 else (max(tk, 1) - 1).bit_length()


def _use_short(G, Tq, Tk, block_d):
    return Tk <= SHORT_MAX and G * Tq <= SHORT_MAX and block_d <= 128


def _key_padding(key_padding_mask, Tk, with_bounds):
    """(has_kpm, mask as uint8 (a view, any strides), its 2 strides, [B, 2] int32 bounds
    (first real key, last real key + 1; (Tk, 0) for a row without any) or None)."""
    import torch

    if key_padding_mask is None:
        return False, None, [0, 0], None
    kpm = key_padding_mask.view(torch.uint8)
    bounds = None
    if with_bounds:
        pos = torch.arange(Tk, device=kpm.device, dtype=torch.int32)
        first = torch.where(key_padding_mask, pos, Tk).amin(-1)
        last = torch.where(key_padding_mask, pos + 1, 0).amax(-1)
        bounds = torch.stack([first, last], -1).to(torch.int32).contiguous()
    return True, kpm, list(kpm.stride()), bounds


def _key_splits(programs, keys, block_n, device):
    """Key splits of the forward (flash-decoding) so that ``programs`` query tiles x splits
    fill >= 90% of their last wave on the SMs of ``device`` (one CTA per SM: what the
    default configs get); the fewest that do, each split keeping >= MIN_SPLIT_TILES key
    tiles. 1 when the unsplit grid already fills its last wave, or no split count does.
    CPU tensors (the interpreter) split only when a test sets KEY_SPLIT_SLOTS."""
    if device.type == "cpu":
        slots = KEY_SPLIT_SLOTS
    else:  # (_device.num_sms is what fastdf.bench.compile sets to the target's)
        slots = KEY_SPLIT_SLOTS or _device.num_sms(device)
    if not slots:
        return 1

    def fill(n):
        w = n / slots
        return w / -(-w // 1)

    if fill(programs) >= 0.9:
        return 1
    for s in range(2, min(64, keys // (MIN_SPLIT_TILES * block_n)) + 1):
        if fill(programs * s) >= 0.9:
            return s
    return 1


def attention_forward(q, k, v, out, lse, mask, scale, key_padding_mask=None):
    """out, lse <- attention of q over k, v; ``mask = (frame_size, window or None, sink_end)``
    in kernel terms (see fastdf.ops.attention._mask_args); ``key_padding_mask`` bool
    [B, Tk] (True = real key, any strides) or None."""
    import torch

    B, Hq, Hkv, G, Tq, Tk, D, block_d, fs, window, sink_end, prec = _common(q, k, mask)
    qk_scale = scale * _LOG2E
    bias = _prob_bias(q.dtype, Tk)
    strides = [*_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(lse, 3)]
    has_window = window is not None
    short = _use_short(G, Tq, Tk, block_d)
    has_kpm, kpm, sm, bounds = _key_padding(key_padding_mask, Tk, not short)
    if short:
        bm, bn, r = _short_meta(G, Tq, Tk, block_d)
        _fwd_short_kernel[(triton.cdiv(B * Hkv, r),)](
            q, k, v, out, lse, kpm if has_kpm else lse, *strides, *sm, B * Hkv, Hkv, G, Tq, Tk, fs, window or 0,
            sink_end, qk_scale, bias,
            D=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, R=r, HAS_WINDOW=has_window, HAS_KPM=has_kpm, PREC=prec,
            num_warps=4)
        return
    wide = q.dtype.itemsize == 4
    configs = _configs("fwd", block_d, wide)
    big = B * Hq * Tq * Tk >= TUNE_MIN_PAIRS
    if G * Tq <= 64:
        # Decode steps and small chunks: a query tile as tall as the (GQA-stacked) rows, long key tiles.
        # mma.sync tiles (fewer than 64 rows) hold K and V in registers: 64-key tiles at
        # D = 128 (128 keys spilled 28 B with 4 warps, 4-8 B with 8 warps, split or not).
        bn, stages = (32, 1) if wide and block_d > 128 else (64, 2) if wide or block_d > 128 else (64, 3)
        warps = 4
        configs, big = [_cfg(max(16, triton.next_power_of_2(G * Tq)), bn, warps, stages)], False
    c0 = configs[0].kwargs
    keys = Tk if window is None else min(Tk, window * fs + sink_end)
    splits = _key_splits(triton.cdiv(G * Tq, c0["BLOCK_M"]) * B * Hkv, keys, c0["BLOCK_N"], q.device)
    o_part, lse_part, sos, sls = out, lse, 0, 0
    if splits > 1:
        o_part = torch.empty((splits, B, Hq, Tq, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, B, Hq, Tq), dtype=torch.float32, device=q.device)
        strides = [*strides[:12], *_strides(o_part[0]), *_strides(lse_part[0], 3)]
        sos, sls = o_part.stride(0), lse_part.stride(0)
    args = (q, k, v, o_part, lse_part, kpm if has_kpm else lse, bounds if has_kpm else lse, *strides, *sm, sos, sls,
            Hkv, G, Tq, Tk, fs, window or 0, sink_end, qk_scale, bias, _bucket(G * Tq), _bucket(fs), splits)
    meta = dict(D=D, BLOCK_D=block_d, EVEN_D=block_d == D, HAS_WINDOW=has_window, HAS_KPM=has_kpm, PREC=prec,
                SPLIT_K=splits > 1, KV_TMA=tma_operands(D, k, v))
    _launch(_fwd_kernel, "fwd", configs, big, lambda m: triton.cdiv(G * Tq, m["BLOCK_M"]) * B * Hkv * splits, args,
            meta)
    if splits > 1:
        rows, block_r = B * Hq * Tq, 16 if INTERPRET else 32
        _merge_splits_kernel[(triton.cdiv(rows, block_r),)](
            o_part, lse_part, out, lse, *_strides(out), *_strides(lse, 3), rows, splits, Hq, Tq, D,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


def attention_backward(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, mask, scale, key_padding_mask=None):
    """dq, dk, dv <- gradients of attention given grad_out (and grad_lse, may be None)."""
    import torch

    B, Hq, Hkv, G, Tq, Tk, D, block_d, fs, window, sink_end, prec = _common(q, k, mask)
    qk_scale = scale * _LOG2E
    has_window = window is not None
    w = window or 0
    sq, sk, sv, sg = _strides(q), _strides(k), _strides(v), _strides(grad_out)
    sl = _strides(lse, 3)
    has_dlse = grad_lse is not None
    dlse = grad_lse if has_dlse else lse
    short = _use_short(G, Tq, Tk, block_d)
    has_kpm, kpm, sm, bounds = _key_padding(key_padding_mask, Tk, not short)
    if short:
        # The fused backward holds q, o, dO, k, v and the three gradients of R sequences at
        # once: half the forward's R (R = 8 at 16 tokens x D = 64 spilled 92 B).
        bm, bn, r = _short_meta(G, Tq, Tk, block_d, SHORT_BWD_BUDGET)
        _bwd_short_kernel[(triton.cdiv(B * Hkv, r),)](
            q, k, v, out, grad_out, lse, dlse, kpm if has_kpm else lse, dq, dk, dv,
            *sq, *sk, *sv, *_strides(out), *sg, *sl, *_strides(dlse, 3), *sm, *_strides(dq), *_strides(dk),
            *_strides(dv), B * Hkv, Hkv, G, Tq, Tk, fs, w, sink_end, qk_scale, scale,
            D=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, R=r, HAS_WINDOW=has_window, HAS_KPM=has_kpm,
            HAS_DLSE=has_dlse,
            PREC=prec,
            num_warps=4)
        return
    delta = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    pre_m = 64 if not INTERPRET else 16
    _bwd_preprocess_kernel[(triton.cdiv(Tq, pre_m) * B * Hq,)](
        out, grad_out, dlse, delta, *_strides(out), *sg, *_strides(dlse, 3), Hq, Tq,
        D=D, BLOCK_D=block_d, EVEN_D=block_d == D, BLOCK_M=pre_m, HAS_DLSE=has_dlse, num_warps=4)
    wide = q.dtype.itemsize == 4
    big = B * Hq * Tq * Tk >= TUNE_MIN_PAIRS
    meta = dict(D=D, BLOCK_D=block_d, EVEN_D=block_d == D, HAS_WINDOW=has_window, HAS_KPM=has_kpm, PREC=prec)
    tune = (_bucket(G * Tq), _bucket(fs))
    args = (q, k, v, grad_out, lse, delta, kpm if has_kpm else lse, dk, dv, *sq, *sk, *sv, *sg, *sl, *sm,
            *_strides(dk), *_strides(dv),
            Hkv, G, Tq, Tk, fs, w, sink_end, sink_end // fs if fs else 0, qk_scale, scale, *tune)
    _launch(_bwd_dkdv_kernel, "dkdv", _configs("dkdv", block_d, wide), big,
            lambda m: triton.cdiv(Tk, m["BLOCK_N"]) * B * Hkv, args, {**meta, "QD_TMA": tma_operands(D, q, grad_out)})
    args = (q, k, v, grad_out, lse, delta, kpm if has_kpm else lse, bounds if has_kpm else lse, dq, *sq, *sk, *sv,
            *sg, *sl, *sm, *_strides(dq),
            Hq, G, Tq, Tk, fs, w, sink_end, qk_scale, scale, *tune)
    _launch(_bwd_dq_kernel, "dq", _configs("dq", block_d, wide), big,
            lambda m: triton.cdiv(Tq, m["BLOCK_M"]) * B * Hq, args, {**meta, "KV_TMA": tma_operands(D, k, v)})

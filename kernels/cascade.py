"""Triton kernels for cascade (shared-prefix) attention: merging partial attention states."""

import triton
import triton.language as tl


@triton.jit
def _merge_states_kernel(
    oa_ptr, ob_ptr, o_ptr, la_ptr, lb_ptr, l_ptr,
    rows, n1, n2, n3, D,
    soa0, soa1, soa2, soa3, soad,
    sob0, sob1, sob2, sob3, sobd,
    so0, so1, so2, so3, sod,
    sla0, sla1, sla2, sla3,
    slb0, slb1, slb2, slb3,
    sl0, sl1, sl2, sl3,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    i3 = r % n3
    rest = r // n3
    i2 = rest % n2
    rest = rest // n2
    i1 = rest % n1
    i0 = rest // n1
    la = tl.load(la_ptr + i0 * sla0 + i1 * sla1 + i2 * sla2 + i3 * sla3, mask=rmask, other=float("-inf"))
    lb = tl.load(lb_ptr + i0 * slb0 + i1 * slb1 + i2 * slb2 + i3 * slb3, mask=rmask, other=float("-inf"))
    m = tl.maximum(la, lb)
    empty = m == float("-inf")
    pinf = m == float("inf")
    # both states empty: weights 0, output 0, lse -inf; a +inf state takes all the weight
    shift = tl.where(empty | pinf, 0.0, m)
    wa = tl.where(pinf, tl.where(la == float("inf"), 1.0, 0.0), tl.exp(la - shift))
    wb = tl.where(pinf, tl.where(lb == float("inf"), 1.0, 0.0), tl.exp(lb - shift))
    nan = (la != la) | (lb != lb)  # tl.maximum may drop a NaN: keep it loud
    wa = tl.where(nan, float("nan"), wa)
    total = tl.where(empty, 1.0, wa + wb)
    lse = tl.where(nan, float("nan"), tl.where(empty | pinf, m, m + tl.log(total)))
    # an empty state's o may hold anything (SDPA: NaN); its weight is exactly 0
    drop_a = (la == float("-inf"))[:, None]
    drop_b = (lb == float("-inf"))[:, None]
    scale = 1.0 / total
    wa = (wa * scale)[:, None]
    wb = (wb * scale)[:, None]
    tl.store(l_ptr + i0 * sl0 + i1 * sl1 + i2 * sl2 + i3 * sl3, lse, mask=rmask)

    d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + d
        mask = rmask[:, None] & (dd < D)[None, :]
        va = tl.load(oa_ptr + (i0 * soa0 + i1 * soa1 + i2 * soa2 + i3 * soa3)[:, None] + dd[None, :] * soad,
                     mask=mask, other=0.0).to(tl.float32)
        vb = tl.load(ob_ptr + (i0 * sob0 + i1 * sob1 + i2 * sob2 + i3 * sob3)[:, None] + dd[None, :] * sobd,
                     mask=mask, other=0.0).to(tl.float32)
        out = wa * tl.where(drop_a, 0.0, va) + wb * tl.where(drop_b, 0.0, vb)
        tl.store(o_ptr + (i0 * so0 + i1 * so1 + i2 * so2 + i3 * so3)[:, None] + dd[None, :] * sod,
                 out.to(o_ptr.dtype.element_ty), mask=mask)


def merge_states(o_a, lse_a, o_b, lse_b, o, lse, sizes, strides):
    """Launch the merge over rows laid out as ``sizes`` (4 leading dims) with per-tensor
    leading ``strides`` in the order (o_a, o_b, o, lse_a, lse_b, lse)."""
    n0, n1, n2, n3 = sizes
    rows = n0 * n1 * n2 * n3
    D = o.shape[-1]
    block_d = min(triton.next_power_of_2(D), 256)
    block_r = max(1, 4096 // block_d)
    s_oa, s_ob, s_o, s_la, s_lb, s_l = strides
    grid = (triton.cdiv(rows, block_r),)
    _merge_states_kernel[grid](
        o_a, o_b, o, lse_a, lse_b, lse,
        rows, n1, n2, n3, D,
        *s_oa, o_a.stride(-1), *s_ob, o_b.stride(-1), *s_o, o.stride(-1),
        *s_la, *s_lb, *s_l,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )


# ---------------------------------------------------------------------------- shared prefix
#
# Decode step of N samples per prompt. Kernel 1 (prefix): for one prompt g and KV head h,
# the N samples x (Hq/Hkv) query heads that read that KV head are the M rows of one tile,
# so each prefix key block is loaded once and multiplied with every row (a matrix
# product, not N matrix-vector products). Long prefixes are split along the keys
# (split-K) so small grids still fill the GPU; every split writes a normalised partial
# state (normalised o, running max, sum of probabilities). Kernel 2 (suffix + merge): one program per (g, sample, KV
# head) attends over the sample's own suffix keys and folds the prefix partials in by
# log-sum-exp, writing the final output in q's dtype.

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(q, k, v, kmask, m_i, l_i, acc, qk_scale, bias, PRECISION: tl.constexpr):
    """One key block of online softmax (log2 domain). m_i is the running max score
    (-inf before any visible key; subtracting 0 then gives p = 0, not NaN);
    probabilities are exp2(s - m - bias), so l_i <= 1 and acc stays within max|v|."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(kmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - (m_sub + bias)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefix_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, po_ptr, pm_ptr, pl_ptr,
    M, GS, HKV, P, D, SPLIT,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
    qk_scale, bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_gh = tl.program_id(1)
    pid_s = tl.program_id(2)
    g = (pid_gh // HKV).to(tl.int64)
    h = pid_gh % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n = rows // GS
    head = h * GS + rows % GS
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + g * sq0 + n[:, None] * sq1 + head[:, None] * sq2 + d[None, :] * sq3,
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    length = tl.minimum(tl.maximum(tl.load(lens_ptr + g), 0), P)
    start = pid_s * SPLIT
    end = tl.minimum(start + SPLIT, length)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_ptr + g * sk0 + h * sk1
    v_base = v_ptr + g * sv0 + h * sv1
    offs_n = tl.arange(0, BLOCK_N)
    for kb in tl.range(start, end, BLOCK_N):
        keys = kb + offs_n
        kmask = keys < end
        k = tl.load(k_base + keys[:, None] * sk2 + d[None, :] * sk3, mask=kmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_base + keys[:, None] * sv2 + d[None, :] * sv3, mask=kmask[:, None] & dmask[None, :], other=0.0)
        m_i, l_i, acc = _attend_block(q, k, v, kmask, m_i, l_i, acc, qk_scale, bias, PRECISION)
    # The partial state is (normalised o, m + bias, l), not an lse: at |scores| ~ 1e30 an
    # fp32 lse loses log2(l) and the merge would weigh the parts wrongly.
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    part = (pid_s * tl.num_programs(1) + pid_gh).to(tl.int64) * M
    tl.store(po_ptr + (part + rows[:, None]) * D + d[None, :], acc / safe_l[:, None], mask=rmask[:, None] & dmask[None, :])
    tl.store(pm_ptr + part + rows, m_i + bias, mask=rmask)
    tl.store(pl_ptr + part + rows, l_i, mask=rmask)


@triton.jit
def _suffix_merge_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, po_ptr, pm_ptr, pl_ptr, o_ptr, lse_ptr,
    N, GS, HKV, S, D, SPLITS, M, GH,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sk4, sv0, sv1, sv2, sv3, sv4, sn0, sn1,
    so0, so1, so2, so3,
    qk_scale, bias,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_gn = tl.program_id(0)
    h = tl.program_id(1)
    g = pid_gn // N
    n = pid_gn % N
    j = tl.arange(0, BLOCK_H)
    jmask = j < GS
    head = h * GS + j
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    qmask = jmask[:, None] & dmask[None, :]
    g64 = g.to(tl.int64)
    n64 = n.to(tl.int64)
    q = tl.load(q_ptr + g64 * sq0 + n64 * sq1 + head[:, None] * sq2 + d[None, :] * sq3, mask=qmask, other=0.0)
    length = tl.minimum(tl.maximum(tl.load(lens_ptr + g64 * sn0 + n64 * sn1), 0), S)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    k_base = k_ptr + g64 * sk0 + n64 * sk1 + h * sk2
    v_base = v_ptr + g64 * sv0 + n64 * sv1 + h * sv2
    offs_n = tl.arange(0, BLOCK_N)
    for kb in tl.range(0, length, BLOCK_N):
        keys = kb + offs_n
        kmask = keys < length
        k = tl.load(k_base + keys[:, None] * sk3 + d[None, :] * sk4, mask=kmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_base + keys[:, None] * sv3 + d[None, :] * sv4, mask=kmask[:, None] & dmask[None, :], other=0.0)
        m_i, l_i, acc = _attend_block(q, k, v, kmask, m_i, l_i, acc, qk_scale, bias, PRECISION)
    # Fold in the prefix partials, normalised state by normalised state (out = weighted mean
    # of the parts' outputs, so |out| <= max|v| throughout): each state is (o, m', l) with
    # probabilities exp2(s - m') summing to l.
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    m_i = tl.where(has, m_i + bias, float("-inf"))
    row = n * GS + j
    for sp in range(0, SPLITS):
        part = (sp * GH + g * HKV + h).to(tl.int64) * M
        m_s = tl.load(pm_ptr + part + row, mask=jmask, other=float("-inf"))
        l_s = tl.load(pl_ptr + part + row, mask=jmask, other=0.0)
        o_s = tl.load(po_ptr + (part + row[:, None]) * D + d[None, :], mask=qmask, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # both empty: weights 0, not NaN
        w_a = l_i * tl.exp2(m_i - safe)
        w_b = l_s * tl.exp2(m_s - safe)
        l_i = w_a + w_b
        inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        out = (w_a * inv)[:, None] * out + (w_b * inv)[:, None] * o_s
        m_i = m_new
    has = l_i > 0
    tl.store(o_ptr + g64 * so0 + n64 * so1 + head[:, None] * so2 + d[None, :] * so3,
             out.to(o_ptr.dtype.element_ty), mask=qmask)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + pid_gn.to(tl.int64) * HKV * GS + head, lse, mask=jmask)


def _pow2(x, low=16):
    return max(low, triton.next_power_of_2(int(x)))


def _sm_resources(device):
    """(SM count, shared memory per SM in bytes) of ``device``. fastdf.bench.compile
    replaces this with the compile target's numbers, so its report shows the grid the
    launcher would pick on that GPU."""
    import torch

    from . import _device

    props = torch.cuda.get_device_properties(device)
    return _device.num_sms(device), getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)


MIN_SPLIT_KEYS = 256  # fewer keys per split: the partial state (fp32 o per row) costs more than it spreads


def _prefix_ctas_per_sm(block_m, block_n, block_d, elem_bytes, warps, stages, smem_per_sm):
    """CTAs of _prefix_kernel resident per SM, from its tile: shared memory is the q tile plus
    ``stages`` K and V tiles (Triton's software pipeline; this matches the compiled kernel's
    allocation on sm_90a exactly), plus the 1 KB the runtime reserves per CTA; registers are
    taken at the 255-per-thread ceiling (the fp32 accumulator and the score tile keep the
    kernel above 128, so the bound is exact for 4 and 8 warps)."""
    smem = elem_bytes * (block_m * block_d + stages * 2 * block_n * block_d) + 1024
    by_regs = 65536 // (256 * 32 * warps)
    return max(1, min(smem_per_sm // smem, by_regs))


def _split_count(keys, splits, block):
    """Splits actually launched for ``splits`` requested: whole key blocks per split."""
    split_len = triton.cdiv(triton.cdiv(max(keys, 1), splits), block) * block
    return split_len, triton.cdiv(max(keys, 1), split_len)


def prefix_splits(programs, keys, slots, block=64, min_keys=MIN_SPLIT_KEYS, max_splits=64):
    """Key splits of the prefix for ``programs`` CTAs per split on ``slots`` resident CTAs (SMs
    x CTAs per SM): the fewest splits whose grid fills >= 90% of its last wave, else the
    fullest last wave reachable, never more splits than ``keys / min_keys`` allows (at least
    one; splits hold whole blocks of ``block`` keys). A grid that already covers the GPU stays
    unsplit: splitting it would only add partial states."""
    if programs >= slots:
        return 1
    limit = max(1, min(triton.cdiv(max(keys, 1), min_keys), max_splits))
    best, best_fill = 1, 0.0
    for want in range(1, limit + 1):
        s = _split_count(keys, want, block)[1]
        waves = programs * s / slots
        fill = waves / -(-waves // 1)
        if fill >= 0.9:
            return s
        if fill > best_fill:
            best, best_fill = s, fill
    return best


def shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix, prefix_lens, suffix_lens, scale, o, lse, splits=None):
    """Launch both kernels. prefix_lens int32 [G], suffix_lens int32 [G, N] (contiguous);
    o [G, N, Hq, D] and lse [G, N, Hq] (contiguous) are written. ``splits`` overrides the
    number of key splits of the prefix (default on a GPU: whole waves, see prefix_splits;
    on the CPU interpreter: one)."""
    import torch

    G, N, Hq, D = q.shape
    Hkv, P = k_prefix.shape[1], k_prefix.shape[2]
    S = k_suffix.shape[3]
    gs = Hq // Hkv
    M = N * gs
    block_d = _pow2(D)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale = scale * LOG2E
    # Tiles: the larger the head dim, the smaller the query tile (registers).
    block_m = min(128 if D <= 128 else 64, _pow2(M))
    block_n = 64 if D <= 128 else 32
    warps = 4 if block_m * block_d <= 64 * 128 else 8
    stages = 3
    m_tiles = triton.cdiv(M, block_m)
    programs = G * Hkv * m_tiles
    if splits is None:
        if q.device.type == "cpu":
            splits = 1
        else:  # a GPU, or meta tensors in fastdf.bench.compile (which supplies _sm_resources)
            sms, smem_per_sm = _sm_resources(q.device)
            per_sm = _prefix_ctas_per_sm(block_m, block_n, block_d, q.element_size(), warps, stages, smem_per_sm)
            splits = prefix_splits(programs, P, sms * per_sm, block_n)
    split_len, splits = _split_count(P, splits, block_n)
    part_o = torch.empty((splits, G * Hkv, M, D), device=q.device, dtype=torch.float32)
    part_m = torch.empty((splits, G * Hkv, M), device=q.device, dtype=torch.float32)
    part_l = torch.empty((splits, G * Hkv, M), device=q.device, dtype=torch.float32)
    # log2 of the key counts (see _attend_block); fp16 probabilities keep bias 0 (subnormals)
    wide = q.dtype != torch.float16
    bias_p = (split_len - 1).bit_length() if wide else 0
    bias_s = (max(S, 1) - 1).bit_length() if wide else 0
    _prefix_kernel[(m_tiles, G * Hkv, splits)](
        q, k_prefix, v_prefix, prefix_lens, part_o, part_m, part_l,
        M, gs, Hkv, P, D, split_len,
        *q.stride(), *k_prefix.stride(), *v_prefix.stride(),
        qk_scale, bias_p,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
        num_warps=warps, num_stages=stages,
    )
    _suffix_merge_kernel[(G * N, Hkv)](
        q, k_suffix, v_suffix, suffix_lens, part_o, part_m, part_l, o, lse,
        N, gs, Hkv, S, D, splits, M, G * Hkv,
        *q.stride(), *k_suffix.stride(), *v_suffix.stride(), *suffix_lens.stride(),
        *o.stride(),
        qk_scale, bias_s,
        BLOCK_H=_pow2(gs), BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
        num_warps=4, num_stages=3,
    )

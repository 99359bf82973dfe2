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
    m = tl.where(empty, 0.0, m)  # both states empty: weights 0, output 0, lse -inf
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    total = tl.where(empty, 1.0, wa + wb)
    lse = tl.where(empty, float("-inf"), m + tl.log(total))
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
        out = wa * va + wb * vb
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

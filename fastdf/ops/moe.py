"""Routed experts in HF layout (DESIGN.md §4): routing, gather, two grouped GEMMs with the
gated activation fused, and a deterministic weighted combine.

Pipeline for ``hidden [T, H]`` and ``topk_ids``/``topk_weights [T, K]``:

1. route: the ``S = T*K`` (token, slot) pairs sorted by expert (stable, so deterministic):
   ``order [S]`` (sorted position -> pair ``t*K + k``), ``inverse [T, K]`` (pair -> sorted
   position), ``offs [E]`` int32 cumulative row ends;
2. ``h1 = hidden[order // K] @ gate_up_e^T`` (the gather is the GEMM's row-index prologue)
   and ``a = act(gate) * up`` in the same kernel's epilogue;
3. ``h2 = a @ down_e^T``;
4. ``out[t] = sum_k topk_weights[t, k] * h2[inverse[t, k]]`` in fp32, slots in order (no atomics).

Backward saves ``h1`` only (``a`` is recomputed; ``h2`` is never needed: the routing-weight
gradient is ``<dout[t] @ down_e, a>``), and computes weight gradients only for the experts
that train (``trainable_ids``), straight into their compact ``[E_t, ...]`` gradients.

Backends: ``cuda`` (routing and combine in fastdf._C, GEMMs in Triton), ``triton``
(routing by torch's stable sort, GEMMs and combine in Triton), ``torch`` (the reference's
products and combine; the CPU path). Routing is integer-exact: every backend gives the same bits.

In eager mode with the torch backend on CPU tensors (``auto`` on the CPU, nothing tracing)
``moe_experts`` skips the custom op: the same computation in plain torch (an
``autograd.Function`` when gradients are needed), one host read for routing and the id
range check, ``torch._grouped_mm`` where its layout rule holds. Its backward also keeps
``h2`` (as HF's does) to cut elementwise passes, which are what a CPU backward pays for.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native
from . import _alloc, _checks
from ._backend import Op, unavailable_reason
from ._eager import PLAIN, plain_tensors, torch_backend_eager
from ._library import custom_op
from .grouped_mm import TRITON_DTYPES, _capturing, _ids_flags, _raise_ids, check_trainable, grouped_mm, \
    grouped_mm_cpu_native, grouped_mm_loop, offs_int32, slot_map

ROUTE = Op("moe_route", prefer=("cuda", "torch"))
GATHER = Op("moe_gather", prefer=("cuda", "triton", "torch"))
COMBINE = Op("moe_combine", prefer=("cuda", "triton", "torch"))
MOE = Op("moe_experts", prefer=("cuda", "triton", "torch"))
MOE_BWD = Op("moe_experts_backward", prefer=("cuda", "triton", "torch"))

# Activations fused into the kernels (codes match fastdf.kernels.grouped_mm.ACT_*).
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
# fastdf._cpu's pieces of the eager CPU backward (csrc/cpu/moe.cpp): the routed gradient
# rows (fp32) and the SwiGLU gradient (fp32 SiLU experts); False runs torch's passes instead
# (tests and benchmarks compare both).
CPU_KERNELS = True
_ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _act_torch(code):
    return {0: F.silu, 1: F.gelu, 2: functools.partial(F.gelu, approximate="tanh"), 3: F.relu}[code]


def _act_grad_torch(x, code):
    if code == 0:
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if code == 1:
        return 0.5 * (1 + torch.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * torch.exp(-0.5 * x * x)
    if code == 2:
        t = torch.tanh(0.7978845608028654 * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * x * x)
    return (x > 0).to(x.dtype)


def resolve_act(act):
    """(kernel code or None, torch callable) for ``act``: a name in ACTIVATIONS (or an HF
    alias), torch's SiLU/GELU/ReLU module or function, or any other callable (not fused)."""
    if isinstance(act, str):
        name = _ALIASES.get(act, act)
        if name not in ACTIVATIONS:
            raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)} (or a callable), got {act!r}")
        return ACTIVATIONS[name], _act_torch(ACTIVATIONS[name])
    if not callable(act):
        raise TypeError(f"act must be a str or a callable, got {type(act).__name__}")
    if act in (F.silu, torch.nn.SiLU) or type(act) is torch.nn.SiLU:
        return 0, F.silu
    if type(act) is torch.nn.GELU:
        code = 2 if act.approximate == "tanh" else 1
        return code, _act_torch(code)
    if act is F.gelu:
        return 1, F.gelu
    if act is F.relu or type(act) is torch.nn.ReLU:
        return 3, F.relu
    return None, act


# ---------------------------------------------------------------------------- references

def moe_route_reference(topk_ids: Tensor, num_experts: int):
    """Stable sort of the (token, slot) pairs by expert: ``(order [S], inverse [T, K], offs [E])``,
    all int32. Pairs with an id outside ``[0, E)`` sort to the tail (past ``offs[-1]``)."""
    flat = topk_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    sorted_key, order = torch.sort(key, stable=True)
    offs = torch.searchsorted(sorted_key, torch.arange(1, num_experts + 1, device=flat.device))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=flat.device)
    return order.int(), inverse.int().view(topk_ids.shape), offs.int()


def moe_gather_reference(x: Tensor, rows: Tensor) -> Tensor:
    return x[rows.long()]


def moe_combine_reference(y: Tensor, inverse: Tensor, weights: Tensor | None) -> Tensor:
    """out[t] = sum_k weights[t, k] * y[inverse[t, k]] in fp32 (fp64 for fp64), slot order."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    T, K = inverse.shape
    rows = y[inverse.reshape(-1).long()].view(T, K, y.shape[1]).to(acc)
    if weights is not None:
        rows = rows * weights.to(acc).unsqueeze(-1)
    out = torch.zeros((T, y.shape[1]), dtype=acc, device=y.device)  # K = 0 slots: zeros, as the kernels give
    for k in range(K):
        out = out + rows[:, k]
    return out.to(y.dtype)


def moe_experts_reference(hidden, topk_ids, topk_weights, gate_up, down, *, act="silu", trainable_ids=None,
                          trainable_gate_up=None, trainable_down=None):
    """Readable reference: HF's eager loop over experts (differentiable through autograd)."""
    fn = resolve_act(act)[1]
    gu = list(gate_up.unbind(0))
    dn = list(down.unbind(0))
    if trainable_ids is not None:
        for i, e in enumerate(trainable_ids.tolist()):
            gu[e], dn[e] = trainable_gate_up[i], trainable_down[i]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(hidden[token], gu[e]).chunk(2, dim=-1)
        y = F.linear(fn(gate) * up, dn[e])
        out = out.index_add(0, token, y.to(acc) * topk_weights[token, slot, None].to(acc))
    return out.to(hidden.dtype)


# ---------------------------------------------------------------------------- routing ops

@ROUTE.register("torch")
def _route_torch(topk_ids, num_experts):
    return moe_route_reference(topk_ids, num_experts)


# Routing is integer-exact, so every backend returns the same bits; the triton backend has
# no sorting kernel of its own and uses torch's stable sort (on the GPU too).
ROUTE.register("triton")(_route_torch)


_ROUTE_CHUNK = 1024  # pairs per block in csrc/moe.cu (kept in sync with kRouteChunk)


def _cuda_route(topk_ids, num_experts):
    n = topk_ids.numel()
    dev = topk_ids.device
    order = _alloc.empty((n,), dtype=torch.int32, device=dev)
    inverse = _alloc.empty(tuple(topk_ids.shape), dtype=torch.int32, device=dev)
    offs = _alloc.empty((num_experts,), dtype=torch.int32, device=dev)
    chunks = max(1, -(-n // _ROUTE_CHUNK))
    workspace = torch.empty(chunks * (num_experts + 1), dtype=torch.int32, device=dev)
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.long()
    _native.module().moe_route(
        ids.data_ptr(), ids.dtype == torch.int32, n, num_experts, order.data_ptr(), inverse.data_ptr(),
        offs.data_ptr(), workspace.data_ptr(), _native.stream(ids), dev.index,
    )
    return order, inverse, offs


@ROUTE.register("cuda")
def _route_cuda(topk_ids, num_experts):
    return _cuda_route(topk_ids, num_experts)


@custom_op(ROUTE)
def _route_op(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    ...


@_route_op.register_fake
def _(topk_ids, num_experts):
    n = topk_ids.numel()
    return (topk_ids.new_empty((n,), dtype=torch.int32), topk_ids.new_empty(tuple(topk_ids.shape), dtype=torch.int32),
            topk_ids.new_empty((num_experts,), dtype=torch.int32))


def moe_route(topk_ids: Tensor, num_experts: int):
    """Sort the (token, slot) pairs of ``topk_ids`` [T, K] by expert, stably.

    Returns int32 ``order`` [T*K] (sorted position -> pair ``t*K + k``), ``inverse`` [T, K]
    (pair -> sorted position) and ``offs`` [E] (cumulative row ends per expert, as
    ``grouped_mm`` takes them). Ids outside ``[0, num_experts)`` sort to the tail."""
    _check_pairs(topk_ids)
    topk_ids = _checks.index_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int64, torch.int32), low=None,
                                    high=None)
    # offs and the sorted positions are int32.
    _checks.number("num_experts", num_experts, low=1, high=_checks.INT32_MAX, integer=True)
    return _route_op(topk_ids, num_experts)


def _check_pairs(topk_ids):
    """The routing numbers the (token, slot) pairs in int32: refuse more before copying."""
    if isinstance(topk_ids, torch.Tensor) and topk_ids.numel() > _checks.INT32_MAX:
        raise ValueError(f"topk_ids has {topk_ids.numel()} (token, slot) pairs; the routing indexes them in int32, "
                         f"so at most {_checks.INT32_MAX}")


def _gather_rows_cuda(x, rows):
    rows = rows.contiguous()  # read as a flat array
    out = _alloc.empty((rows.numel(), x.shape[1]), dtype=x.dtype, device=x.device)
    if out.numel():
        _native.module().moe_gather(
            x.data_ptr(), x.stride(0), x.stride(1), rows.data_ptr(), rows.numel(), x.shape[1],
            out.data_ptr(), out.stride(0), out.stride(1), x.element_size(), _native.stream(x), x.device.index,
        )
    return out


@GATHER.register("torch")
def _gather_torch(x, rows, inverse):
    return moe_gather_reference(x, rows)


@GATHER.register("triton", supports=lambda x, *a: None if x.dtype in TRITON_DTYPES else "fp64 is not compiled")
def _gather_triton(x, rows, inverse):
    from fastdf.kernels.moe import gather

    out = _alloc.empty((rows.numel(), x.shape[1]), dtype=x.dtype, device=x.device)
    if out.numel():
        gather(x, rows, out)
    return out


@GATHER.register("cuda", supports=lambda x, *a: None if x.element_size() in (2, 4) else "8-byte elements are not compiled")
def _gather_cuda(x, rows, inverse):
    return _gather_rows_cuda(x, rows)


@custom_op(GATHER)
def _gather_op(x: Tensor, rows: Tensor, inverse: Tensor) -> Tensor:
    ...


@_gather_op.register_fake
def _(x, rows, inverse):
    return x.new_empty((rows.shape[0], x.shape[1]))


def _gather_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _gather_backward(ctx, grad):
    (inverse,) = ctx.saved_tensors
    # Each token's K copies sum back in slot order: the deterministic combine, unweighted.
    return _combine_op(grad, inverse, None), None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def _combine_cuda_impl(y, inverse, weights):
    T, K = inverse.shape
    out = _alloc.empty((T, y.shape[1]), dtype=y.dtype, device=y.device)
    if out.numel():
        w = weights.float().contiguous() if weights is not None else None
        inv = inverse.contiguous()
        _native.module().moe_combine(
            y.data_ptr(), y.stride(0), y.stride(1), inv.data_ptr(), T, K, y.shape[1],
            w.data_ptr() if w is not None else 0, out.data_ptr(), out.stride(0), out.stride(1),
            _native.dtype_code(y), _native.stream(y), y.device.index,
        )
    return out


def _combine_triton_impl(y, inverse, weights):
    from fastdf.kernels.moe import combine

    T = inverse.shape[0]
    out = _alloc.empty((T, y.shape[1]), dtype=y.dtype, device=y.device)
    if out.numel():
        combine(y, inverse.contiguous(), weights, out)
    return out


@COMBINE.register("torch")
def _combine_torch(y, inverse, weights):
    return _combine_torch_fast(y, inverse, weights)


@COMBINE.register("triton", supports=lambda y, *a: None if y.dtype in TRITON_DTYPES else "fp64 is not compiled")
def _combine_triton(y, inverse, weights):
    return _combine_triton_impl(y, inverse, weights)


@COMBINE.register("cuda", supports=lambda y, *a: None if y.dtype in _native.DTYPE_CODES else "fp64 is not compiled")
def _combine_cuda(y, inverse, weights):
    return _combine_cuda_impl(y, inverse, weights)


@custom_op(COMBINE)
def _combine_op(y: Tensor, inverse: Tensor, weights: Tensor | None) -> Tensor:
    ...


@_combine_op.register_fake
def _(y, inverse, weights):
    return y.new_empty((inverse.shape[0], y.shape[1]))


def _combine_setup(ctx, inputs, output):
    y, inverse, weights = inputs
    ctx.save_for_backward(y, inverse, weights)


def _combine_backward(ctx, grad):
    y, inverse, weights = ctx.saved_tensors
    T, K = inverse.shape
    flat = inverse.reshape(-1).long()
    dy = dweights = None
    if ctx.needs_input_grad[0]:
        rows = grad.unsqueeze(1).expand(T, K, grad.shape[1])
        if weights is not None:
            rows = rows * weights.unsqueeze(-1).to(grad.dtype)
        dy = grad.new_zeros(y.shape).index_copy(0, flat, rows.reshape(T * K, y.shape[1]).to(y.dtype))
    if weights is not None and ctx.needs_input_grad[2]:
        picked = y[flat].view(T, K, y.shape[1]).float()
        dweights = (picked * grad.float().unsqueeze(1)).sum(-1).to(weights.dtype)
    return dy, None, dweights


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def moe_gather(x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
    """The rows each expert reads, in expert-sorted order: ``out[i] = x[order[i] // K]``
    ([T*K, H], x's dtype) for ``x`` [T, H] and :func:`moe_route`'s ``order`` [T*K] and
    ``inverse`` [T, K] (K = ``inverse.shape[1]``). Differentiable in ``x``: its gradient
    sums each token's K copies in slot order (:func:`moe_combine`, unweighted), so it is
    deterministic. ``order`` and ``inverse`` must index the T*K pairs (checked: ValueError,
    one sync each). The inverse of :func:`moe_combine`'s layout; expert parallelism sends
    these rows to the ranks that own the experts."""
    _checks.tensor("x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    _checks.same_device(x=x, order=_checks.tensor("order", order), inverse=_checks.tensor("inverse", inverse))
    _checks.shape("inverse", inverse, (x.shape[0], None), what="([T, K] with x's T)")
    pairs = inverse.numel()
    _check_pairs(inverse)
    _checks.shape("order", order, (pairs,), what="([T*K], T*K = inverse.numel())")
    order = _checks.index_tensor("order", order, ndim=1, dtypes=(torch.int32, torch.int64), low=0, high=pairs)
    inverse = _checks.index_tensor("inverse", inverse, ndim=2, dtypes=(torch.int32,), low=0, high=pairs)
    return _gather_op(x, torch.div(order, max(inverse.shape[1], 1), rounding_mode="floor"), inverse)


def moe_combine(y: Tensor, inverse: Tensor, weights: Tensor | None = None) -> Tensor:
    """``out[t] = sum_k weights[t, k] * y[inverse[t, k]]`` ([T, H], y's dtype), accumulated in
    fp32 with each token's slots summed in order: deterministic, no atomics. ``inverse``
    int32 ``[T, K]`` must index rows of ``y`` (checked: ValueError); ``K = 0`` gives zeros."""
    _checks.tensor("y", y, ndim=2, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    _checks.tensor("weights", weights, ndim=2, dtypes=_checks.FLOAT_DTYPES + (torch.float64,), optional=True)
    _checks.same_device(y=y, inverse=_checks.tensor("inverse", inverse), weights=weights)
    # An index past y would read out of bounds in the kernels: refused here (one sync).
    inverse = _checks.index_tensor("inverse", inverse, ndim=2, dtypes=(torch.int32,), low=0, high=y.shape[0])
    if weights is not None:
        _checks.shape("weights", weights, tuple(inverse.shape), what="(the shape of inverse)")
    return _combine_op(y, inverse, weights)


# ---------------------------------------------------------------------------- primitives per backend

def _combine_torch_fast(y, inverse, weights):
    """moe_combine_reference with the same fp32 operations in the same slot order (so the
    same values), minus its temporaries: one gather, the weights applied in place, and
    each slot added into the running sum."""
    T, K = inverse.shape
    if K == 0 or y.shape[1] == 0:
        return moe_combine_reference(y, inverse, weights)
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    rows = y.index_select(0, inverse.reshape(-1).long()).view(T, K, y.shape[1])
    rows = rows.to(acc)
    if weights is not None:
        rows.mul_(weights.to(acc).unsqueeze(-1))
    if K == 1:
        return rows[:, 0].to(y.dtype)
    out = torch.add(rows[:, 0], rows[:, 1])
    for k in range(2, K):
        out.add_(rows[:, k])
    return out.to(y.dtype)


class _TorchPrims:
    """The pipeline's steps in torch (the CPU path): the references' operations, written
    into preallocated outputs."""

    route = staticmethod(moe_route_reference)
    combine = staticmethod(_combine_torch_fast)

    @staticmethod
    def glu_gemm(hidden, tok, w, offs, tw, tids, slot, act, save):
        h1 = grouped_mm_loop(hidden.index_select(0, tok.long()), w, offs, trainable_w=tw, trainable_ids=tids)
        gate, up = h1.chunk(2, dim=-1)
        a = _act_torch(act)(gate).mul_(up)
        return a, (h1 if save else h1.new_empty(0))

    @staticmethod
    def gemm(x, w, offs, rows, tw, tids, slot):
        if rows is not None:
            x = x.index_select(0, rows.long())
        return grouped_mm_loop(x, w, offs, trainable_w=tw, trainable_ids=tids)

    @staticmethod
    def gemm_dw(x, dy, offs, ids, out, x_rows=None, dy_rows=None):
        bounds = [0] + offs.tolist()
        for j, e in enumerate(ids.tolist()):
            # gather only this expert's rows: with ESFT most experts are frozen
            lo, hi = bounds[e], bounds[e + 1]
            xs = x.index_select(0, x_rows[lo:hi].long()) if x_rows is not None else x[lo:hi]
            dys = dy.index_select(0, dy_rows[lo:hi].long()) if dy_rows is not None else dy[lo:hi]
            dst = out[j]
            if dst.transpose(0, 1).is_contiguous() and dst.dtype == x.dtype:
                # out is the transpose of the gradient's storage: write dy^T x there directly
                torch.mm(dys.transpose(0, 1), xs, out=dst.transpose(0, 1))
            else:
                dst.copy_(xs.transpose(0, 1) @ dys)

    @staticmethod
    def glu_bwd(h1, da, w_sorted, act, need_aw):
        acc = torch.float64 if h1.dtype == torch.float64 else torch.float32
        gate, up = h1.to(acc).chunk(2, dim=-1)
        d = da.to(acc)
        w = w_sorted.to(acc).unsqueeze(-1)
        S, I = d.shape
        ag = _act_torch(act)(gate)
        a = (ag * up).to(h1.dtype).to(acc)
        dw = torch.linalg.vecdot(d, a)
        dd = d * w
        dh1 = _alloc.empty((S, 2 * I), dtype=acc, device=d.device)
        if act == 0:  # torch's fused SiLU derivative, written into the gate half
            torch.ops.aten.silu_backward.grad_input(dd * up, gate, grad_input=dh1[:, :I])
        else:
            torch.mul(dd * up, _act_grad_torch(gate, act), out=dh1[:, :I])
        torch.mul(dd, ag, out=dh1[:, I:])
        aw = a.mul_(w).to(h1.dtype) if need_aw else None
        return dh1.to(h1.dtype), dw, aw


class _TritonPrims:
    """Triton GEMMs; routing and combine from ``route``/``combine`` (cuda or torch/triton)."""

    def __init__(self, route, combine):
        self.route = route
        self.combine = combine

    @staticmethod
    def glu_gemm(hidden, tok, w, offs, tw, tids, slot, act, save):
        from fastdf.kernels.grouped_mm import gmm

        S, I = tok.numel(), w.shape[2] // 2
        a = _alloc.empty((S, I), dtype=hidden.dtype, device=hidden.device)
        h1 = _alloc.empty((S, 2 * I), dtype=hidden.dtype, device=hidden.device) if save else hidden.new_empty(0)
        if a.numel():
            gmm(hidden, w, offs, a, rows=tok, tw=tw, slot=slot, glu_act=act, h=h1 if save else None)
        return a, h1

    @staticmethod
    def gemm(x, w, offs, rows, tw, tids, slot):
        from fastdf.kernels.grouped_mm import gmm

        S = rows.numel() if rows is not None else x.shape[0]
        out = _alloc.empty((S, w.shape[2]), dtype=x.dtype, device=x.device)
        if out.numel():
            gmm(x, w, offs, out, rows=rows, tw=tw, slot=slot)
        return out

    @staticmethod
    def gemm_dw(x, dy, offs, ids, out, x_rows=None, dy_rows=None):
        from fastdf.kernels.grouped_mm import gmm_dw

        if out.numel():
            gmm_dw(x, dy, offs, ids, out, x_rows=x_rows, dy_rows=dy_rows)

    @staticmethod
    def glu_bwd(h1, da, w_sorted, act, need_aw):
        from fastdf.kernels.moe import glu_backward

        S, I = da.shape
        dh1 = _alloc.empty((S, 2 * I), dtype=h1.dtype, device=h1.device)
        dw = _alloc.empty((S,), dtype=torch.float32, device=h1.device)
        aw = _alloc.empty((S, I), dtype=h1.dtype, device=h1.device) if need_aw else None
        if S:
            glu_backward(h1, da, w_sorted, act, dh1, dw, aw)
        return dh1, dw, aw


_TRITON_PRIMS = _TritonPrims(moe_route_reference, _combine_triton_impl)
_CUDA_PRIMS = _TritonPrims(_cuda_route, _combine_cuda_impl)


def _t(w):
    return w.transpose(1, 2) if w is not None else None


def check_moe_values(topk_ids: Tensor, num_experts: int, trainable_ids: Tensor | None):
    """topk_ids in [0, E), trainable_ids unique and in range: one device sync, skipped while
    a CUDA graph is captured (out-of-range pairs then drop out: they sort past offs[-1])."""
    if _capturing():
        return
    flags = [((topk_ids < 0) | (topk_ids >= num_experts)).any()]
    if trainable_ids is not None:
        flags += _ids_flags(trainable_ids, num_experts)
    bad = torch.stack(flags).tolist()
    if bad[0]:
        _raise_topk_ids(topk_ids, num_experts)
    if trainable_ids is not None:
        _raise_ids(bad[1:], trainable_ids, num_experts)


def _raise_topk_ids(topk_ids, num_experts):
    lo, hi = int(topk_ids.min()), int(topk_ids.max())
    raise ValueError(f"topk_ids must lie in [0, {num_experts}) (the experts of gate_up), got values in [{lo}, {hi}]")


def _forward(p, hidden, topk_ids, topk_weights, gate_up, down, tids, tgu, tdown, act, save):
    E = gate_up.shape[0]
    check_moe_values(topk_ids, E, tids)
    order, inverse, offs = p.route(topk_ids, E)
    tok = torch.div(order, topk_ids.shape[1], rounding_mode="floor")
    slot = slot_map(tids, E, hidden.device)
    a, h1 = p.glu_gemm(hidden, tok, gate_up.transpose(1, 2), offs, _t(tgu), tids, slot, act, save)
    h2 = p.gemm(a, down.transpose(1, 2), offs, None, _t(tdown), tids, slot)
    del a
    out = p.combine(h2, inverse, topk_weights)
    return out, h1, order, inverse, offs


def _backward(p, grad, hidden, topk_weights, gate_up, down, tids, tgu, tdown, h1, order, inverse, offs, act,
              need_dx, need_dw, need_dgu, need_ddown):
    T, K = inverse.shape
    E = gate_up.shape[0]
    dev = hidden.device
    tok = torch.div(order, K, rounding_mode="floor")
    slot = slot_map(tids, E, dev)
    ids = tids if tids is not None else torch.arange(E, dtype=torch.int64, device=dev)
    w_sorted = topk_weights.reshape(-1)[order.long()]
    # da = dout[token] @ down_e: the unweighted gradient of act(gate) * up (gather fused).
    da = p.gemm(grad, down, offs, tok, tdown, tids, slot)
    dh1, dw_sorted, aw = p.glu_bwd(h1, da, w_sorted, act, need_ddown)
    del da
    ddown, dgu, dx, dweights = (hidden.new_empty(0) for _ in range(4))  # distinct: outputs may not alias
    if need_ddown:
        ref = tdown if tids is not None else down
        ddown = _alloc.empty((ids.numel(),) + tuple(down.shape[1:]), dtype=ref.dtype, device=dev)
        p.gemm_dw(aw, grad, offs, ids, ddown.transpose(1, 2), dy_rows=tok)
    del aw
    if need_dgu:
        ref = tgu if tids is not None else gate_up
        dgu = _alloc.empty((ids.numel(),) + tuple(gate_up.shape[1:]), dtype=ref.dtype, device=dev)
        p.gemm_dw(hidden, dh1, offs, ids, dgu.transpose(1, 2), x_rows=tok)
    if need_dx:
        dx = p.combine(p.gemm(dh1, gate_up, offs, None, tgu, tids, slot), inverse, None)
    if need_dw:
        dweights = dw_sorted[inverse.reshape(-1).long()].view(T, K).to(topk_weights.dtype)
    return dx, dweights, dgu, ddown


def _moe_supports(hidden, *args):
    if hidden.dtype not in TRITON_DTYPES:
        return f"the Triton kernels take {', '.join(str(d)[6:] for d in TRITON_DTYPES)}, got {str(hidden.dtype)[6:]}"
    return unavailable_reason("triton", hidden.device)


def _moe_cuda_supports(hidden, *args):
    return _moe_supports(hidden)


@MOE.register("torch")
def _moe_torch(*args):
    return _forward(_TorchPrims, *args)


@MOE.register("triton", supports=_moe_supports)
def _moe_triton(*args):
    return _forward(_TRITON_PRIMS, *args)


@MOE.register("cuda", supports=_moe_cuda_supports)
def _moe_cuda(*args):
    return _forward(_CUDA_PRIMS, *args)


@MOE_BWD.register("torch")
def _moe_bwd_torch(*args):
    return _backward(_TorchPrims, *args)


@MOE_BWD.register("triton", supports=lambda grad, hidden, *a: _moe_supports(hidden))
def _moe_bwd_triton(*args):
    return _backward(_TRITON_PRIMS, *args)


@MOE_BWD.register("cuda", supports=lambda grad, hidden, *a: _moe_supports(hidden))
def _moe_bwd_cuda(*args):
    return _backward(_CUDA_PRIMS, *args)


@custom_op(MOE)
def _moe_op(hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Tensor, down: Tensor,
            trainable_ids: Tensor | None, trainable_gate_up: Tensor | None, trainable_down: Tensor | None,
            act: int, save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ...


@_moe_op.register_fake
def _(hidden, topk_ids, topk_weights, gate_up, down, tids, tgu, tdown, act, save):
    S = topk_ids.numel()
    h1 = hidden.new_empty((S, gate_up.shape[1])) if save else hidden.new_empty(0)
    i32 = dict(dtype=torch.int32)
    return (hidden.new_empty(tuple(hidden.shape)), h1, topk_ids.new_empty((S,), **i32),
            topk_ids.new_empty(tuple(topk_ids.shape), **i32), topk_ids.new_empty((gate_up.shape[0],), **i32))


@custom_op(MOE_BWD)
def _moe_bwd_op(grad: Tensor, hidden: Tensor, topk_weights: Tensor, gate_up: Tensor, down: Tensor,
                trainable_ids: Tensor | None, trainable_gate_up: Tensor | None, trainable_down: Tensor | None,
                h1: Tensor, order: Tensor, inverse: Tensor, offs: Tensor, act: int, need_dx: bool, need_dw: bool,
                need_dgu: bool, need_ddown: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ...


@_moe_bwd_op.register_fake
def _(grad, hidden, topk_weights, gate_up, down, tids, tgu, tdown, h1, order, inverse, offs, act, need_dx, need_dw,
      need_dgu, need_ddown):
    n = tids.shape[0] if tids is not None else gate_up.shape[0]
    ref_gu = tgu if tids is not None else gate_up
    ref_dn = tdown if tids is not None else down
    return (hidden.new_empty(tuple(hidden.shape)) if need_dx else hidden.new_empty(0),
            topk_weights.new_empty(tuple(inverse.shape)) if need_dw else hidden.new_empty(0),
            ref_gu.new_empty((n,) + tuple(gate_up.shape[1:])) if need_dgu else hidden.new_empty(0),
            ref_dn.new_empty((n,) + tuple(down.shape[1:])) if need_ddown else hidden.new_empty(0))


def _save(ctx, hidden, topk_weights, gate_up, down, tids, tgu, tdown, act, *kept):
    """``kept``: what the forward kept for the backward (h1, [h2,] order, inverse, offs)."""
    ctx.save_for_backward(hidden, topk_weights, gate_up, down, tids, tgu, tdown, *kept)
    ctx.act = act
    ctx.has_trainable = tids is not None
    ctx.set_materialize_grads(False)  # h1 and the routing outputs never get gradients


def _grads(ctx, grad, backward):
    """Gradients for (hidden, topk_ids, topk_weights, gate_up, down, trainable ids, trainable
    gate_up, trainable down, act) from what :func:`_save` kept; ``backward`` is the
    custom op (through the op) or ``_backward`` on torch primitives (the eager path)."""
    nig = ctx.needs_input_grad
    need_dx, need_dw = nig[0], nig[2]
    need_dgu, need_ddown = (nig[6], nig[7]) if ctx.has_trainable else (nig[3], nig[4])
    if grad is None or not (need_dx or need_dw or need_dgu or need_ddown):
        return (None,) * 9
    dx, dweights, dgu, ddown = backward(grad, *ctx.saved_tensors, ctx.act, need_dx, need_dw, need_dgu, need_ddown)
    dx, dweights = (dx if need_dx else None), (dweights if need_dw else None)
    dgu, ddown = (dgu if need_dgu else None), (ddown if need_ddown else None)
    if ctx.has_trainable:
        return dx, None, dweights, None, None, None, dgu, ddown, None
    return dx, None, dweights, dgu, ddown, None, None, None, None


def _moe_setup(ctx, inputs, output):
    hidden, topk_ids, topk_weights, gate_up, down, tids, tgu, tdown, act, save = inputs
    _save(ctx, hidden, topk_weights, gate_up, down, tids, tgu, tdown, act, *output[1:])


def _moe_backward(ctx, grad, *unused):
    return _grads(ctx, grad, _moe_bwd_op) + (None,)  # (no gradient for ``save``)


_moe_op.register_autograd(_moe_backward, setup_context=_moe_setup)


# ---------------------------------------------------------------------------- eager CPU path

# torch.arange(E + 1) per (E, index dtype): the expert boundaries searched in the sorted ids.
_EXPERT_STARTS: dict = {}


def _route_eager(topk_ids, num_experts):
    """Routing for the eager CPU path: ``(order [S] int64, inverse [T, K] int64, offs [E]
    int32, bounds)`` with ``bounds = [0] + offs.tolist()``: the reference's stable sort,
    then one ``searchsorted`` of the E + 1 expert boundaries in the sorted ids. Its first
    and last entries count the ids below 0 and below E, so the one host read of the
    boundaries is also the range check (ValueError as ``check_moe_values`` raises it)."""
    flat = topk_ids.reshape(-1)
    key = (num_experts, flat.dtype)
    starts = _EXPERT_STARTS.get(key)
    if starts is None:
        starts = _EXPERT_STARTS[key] = torch.arange(num_experts + 1, dtype=flat.dtype)
    sorted_ids, order = torch.sort(flat, stable=True)
    starts = torch.searchsorted(sorted_ids, starts, out_int32=True)
    bounds = starts.tolist()
    if bounds[0] != 0 or bounds[-1] != flat.numel():
        _raise_topk_ids(topk_ids, num_experts)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return order, inverse.view(topk_ids.shape), starts[1:], bounds


def _forward_eager(hidden, topk_ids, topk_weights, gate_up, down, tids, tgu, tdown, act, save):
    """``_forward(_TorchPrims, ...)`` for CPU tensors of nonzero sizes with the host work
    cut: one host read for routing and range check, ``torch._grouped_mm`` where it takes
    the operands. The same products and elementwise operations on operands of the same
    layouts, so the same bits. (The activation written over h1's gate half, a strided
    ``a``, saved no allocation, since the product needs its own, and changed the down
    GEMM's bits on an AMD EPYC: its BLAS sums a row stride of 2I in another order than I.)"""
    E, K = gate_up.shape[0], topk_ids.shape[1]
    order, inverse, offs, bounds = _route_eager(topk_ids, E)
    if tids is not None:
        _raise_ids(torch.stack(_ids_flags(tids, E)).tolist(), tids, E)
    x = hidden.index_select(0, torch.div(order, K, rounding_mode="floor"))
    h1 = grouped_mm_loop(x, gate_up.transpose(1, 2), offs, trainable_w=_t(tgu), trainable_ids=tids, bounds=bounds)
    del x
    gate, up = h1.chunk(2, dim=-1)
    acts = None
    if save and tids is None and h1.dtype in (torch.float32, torch.float64):
        # full fine-tuning: keep act(gate) and a for the backward, as HF's graph does (16-bit
        # h1 recomputes them in fp32 there instead)
        ag = _act_torch(act)(gate)
        a = ag * up
        acts = (ag, a)
    else:
        a = _act_torch(act)(gate).mul_(up)
    h2 = grouped_mm_loop(a, down.transpose(1, 2), offs, trainable_w=_t(tdown), trainable_ids=tids, bounds=bounds)
    del a, gate, up
    out = _combine_torch_fast(h2, inverse, topk_weights)
    if not save:
        return out, None
    return out, (h1, h2, order, inverse, offs, bounds, acts)


def _backward_eager(grad, hidden, topk_weights, gate_up, down, tids, tgu, tdown, h1, h2, order, inverse, offs,
                    act, need_dx, need_dw, need_dgu, need_ddown, *, bounds, acts=None):
    """``_backward(_TorchPrims, ...)`` for the eager CPU path, which also keeps ``h2`` (S x H,
    what HF's backward keeps too). Elementwise passes over S x I arrays are what this
    backward costs on the CPU (memory-bound, ~0.2 ms per 1 MiB pass here), so:

    - the routing-weight gradient is ``dout[t] . h2`` at width H (the reference's own
      formulation) instead of ``da . act(gate) * up`` at width I (two passes);
    - the routing weight scales the gathered ``dout`` rows (width H) before the GEMM, so
      ``da`` arrives weighted (no ``da * w`` pass);
    - ``act(gate) * up`` (the down projection's input) only for the rows of experts that
      train: with ESFT most experts are frozen. With full fine-tuning the forward kept
      ``acts = (act(gate), act(gate) * up)`` (S x I each, what HF's graph keeps): two passes
      fewer (measured 0.93x HF's full backward without them);
    - fp32 on fastdf._cpu (csrc/cpu/moe.cpp, ``CPU_KERNELS``): the gathered rows, their
      weighting and the dot with ``h2`` in one pass, and the SiLU gradient of both halves of
      ``h1`` in one (torch: five passes and two temporaries; 0.93-1.00x -> 0.99-1.04x HF's
      full backward on an EPYC VM).

    Same products as the op's backward, grouped differently, so not its bits: the tests
    hold both to the reference."""
    T, K = inverse.shape
    dev = hidden.device
    acc = torch.float64 if h1.dtype == torch.float64 else torch.float32
    tok = torch.div(order, K, rounding_mode="floor")
    ids = tids.tolist() if tids is not None else range(gate_up.shape[0])
    w_sorted = topk_weights.reshape(-1).index_select(0, order)
    ddown, dgu, dx, dweights = (hidden.new_empty(0) for _ in range(4))  # distinct: outputs may not alias
    mod = _native.cpu_module() if CPU_KERNELS and acc == torch.float32 else None
    if (mod is not None and grad.dtype == h2.dtype == w_sorted.dtype == torch.float32 and tok.dtype == torch.int64
            and grad.is_contiguous() and h2.is_contiguous()):
        # gather, weight and the routing weights' dot products in one pass (fastdf._cpu)
        gw = _alloc.empty(h2.shape, dtype=torch.float32, device=dev)
        dw_sorted = _alloc.empty(w_sorted.shape, dtype=torch.float32, device=dev) if need_dw else None
        mod.routed_grad(grad.data_ptr(), tok.data_ptr(), w_sorted.data_ptr(), h2.data_ptr(), gw.data_ptr(),
                        dw_sorted.data_ptr() if need_dw else 0, gw.shape[0], gw.shape[1], torch.get_num_threads())
    else:
        g = grad.index_select(0, tok)
        dw_sorted = torch.linalg.vecdot(g.to(acc), h2.to(acc)) if need_dw else None
        gw = (g.to(acc) * w_sorted.to(acc).unsqueeze(-1)).to(grad.dtype)
        del g
    if need_dw:
        dweights = dw_sorted.index_select(0, inverse.reshape(-1)).view(T, K).to(topk_weights.dtype)
    dd = grouped_mm_loop(gw, down, offs, trainable_w=tdown, trainable_ids=tids, bounds=bounds).to(acc)
    gate, up = h1.to(acc).chunk(2, dim=-1)
    I = gate.shape[1]
    dh1 = _alloc.empty((h1.shape[0], 2 * I), dtype=acc, device=dev)
    if mod is not None and act == 0 and h1.dtype == torch.float32 and dd.is_contiguous() and h1.is_contiguous():
        # the SiLU gradient in one pass over dd, gate and up (three passes and a temporary
        # in torch): fastdf._cpu, see csrc/cpu/moe.cpp
        mod.swiglu_backward(dd.data_ptr(), h1.data_ptr(), dh1.data_ptr(), h1.shape[0], I, torch.get_num_threads())
        ag = acts[0] if acts is not None else None  # act(gate) for ddown: per expert below
    else:
        ag = acts[0].to(acc) if acts is not None else _act_torch(act)(gate)
        if act == 0:  # torch's fused SiLU derivative, written into the gate half
            torch.ops.aten.silu_backward.grad_input(dd * up, gate, grad_input=dh1[:, :I])
        else:
            torch.mul(dd * up, _act_grad_torch(gate, act), out=dh1[:, :I])
        torch.mul(dd, ag, out=dh1[:, I:])
    del dd
    dh1 = dh1.to(h1.dtype)
    # Full fine-tuning (every expert trains): each weight gradient is one torch._grouped_mm
    # over all rows (the same per-expert products, the loop in C++) where it takes the
    # operands; the Python loops over experts had cost ~0.7 ms of a ~6 ms CPU backward
    # (E = 8), which left it 0.89x HF's grouped_mm backward.
    grouped = tids is None and len(bounds) > 1 and bounds[-1] == h1.shape[0]
    if need_ddown:
        ref = tdown if tids is not None else down
        a_all = None
        if ag is None:  # only the rows ddown reads (with ESFT, the trained experts')
            ag_rows = lambda lo, hi: _act_torch(act)(gate[lo:hi])  # noqa: E731
        else:
            ag_rows = lambda lo, hi: ag[lo:hi]  # noqa: E731
        if grouped:  # the forward's a, rounded as it was
            a_all = acts[1] if acts is not None else (ag_rows(0, h1.shape[0]) * up).to(h1.dtype)
        if grouped and ref.dtype == a_all.dtype == gw.dtype and grouped_mm_cpu_native(gw.t(), a_all):
            ddown = torch._grouped_mm(gw.t(), a_all, offs=offs_int32(offs))
        else:
            ddown = _alloc.empty((len(ids),) + tuple(down.shape[1:]), dtype=ref.dtype, device=dev)
            for j, e in enumerate(ids):
                lo, hi = bounds[e], bounds[e + 1]
                a = a_all[lo:hi] if a_all is not None else (ag_rows(lo, hi) * up[lo:hi]).to(h1.dtype)
                torch.mm(gw[lo:hi].transpose(0, 1), a, out=ddown[j]) if ddown.dtype == a.dtype \
                    else ddown[j].copy_(gw[lo:hi].transpose(0, 1) @ a)
        del a_all
    del gw, ag, gate, up
    if need_dgu:
        ref = tgu if tids is not None else gate_up
        xs = hidden.index_select(0, tok) if grouped else None
        if grouped and ref.dtype == dh1.dtype == xs.dtype and grouped_mm_cpu_native(dh1.t(), xs):
            dgu = torch._grouped_mm(dh1.t(), xs, offs=offs_int32(offs))
        else:
            dgu = _alloc.empty((len(ids),) + tuple(gate_up.shape[1:]), dtype=ref.dtype, device=dev)
            _TorchPrims.gemm_dw(hidden, dh1, offs, torch.tensor(list(ids), dtype=torch.int64), dgu.transpose(1, 2),
                                x_rows=tok)
        del xs
    if need_dx:
        dx = _combine_torch_fast(grouped_mm_loop(dh1, gate_up, offs, trainable_w=tgu, trainable_ids=tids,
                                                 bounds=bounds), inverse, None)
    return dx, dweights, dgu, ddown


class _MoeFunction(torch.autograd.Function):
    """The eager CPU path with autograd: the custom op's forward and backward in torch,
    without its dispatch. The backward is ``_backward``: weight gradients for the
    trainable experts only (frozen experts: none)."""

    @staticmethod
    def forward(ctx, hidden, topk_ids, topk_weights, gate_up, down, tids, tgu, tdown, act):
        out, (h1, h2, order, inverse, offs, bounds, acts) = _forward_eager(
            hidden, topk_ids, topk_weights, gate_up, down, tids, tgu, tdown, act, True)
        _save(ctx, hidden, topk_weights, gate_up, down, tids, tgu, tdown, act, h1, h2, order, inverse, offs)
        ctx.bounds = bounds
        ctx.acts = acts  # intermediates nobody else holds: no version check needed
        return out

    @staticmethod
    def backward(ctx, grad):
        return _grads(ctx, grad, functools.partial(_backward_eager, bounds=ctx.bounds, acts=ctx.acts))


def _moe_eager(hidden, topk_ids, topk_weights, gate_up, down, tids, tgu, tdown, act):
    params = (hidden, topk_weights, gate_up, down, tgu, tdown)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params):
        return _MoeFunction.apply(hidden, topk_ids, topk_weights, gate_up, down, tids, tgu, tdown, act)
    return _forward_eager(hidden, topk_ids, topk_weights, gate_up, down, tids, tgu, tdown, act, False)[0]


_MOE_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)
_PLAIN = PLAIN  # (tensor types the eager path takes: see _eager.PLAIN)
_ID_DTYPES = (torch.int64, torch.int32)


def _moe_args_ok(hidden, topk_ids, topk_weights, gate_up, down) -> bool:
    """Whether moe_experts' named checks all pass for these arguments without trainable
    experts, in one expression (the named checks then run only to say what is wrong).
    Everything on the CPU, with nonzero sizes: the arguments of the eager CPU path."""
    if not (type(hidden) in _PLAIN and type(topk_ids) in _PLAIN and type(topk_weights) in _PLAIN
            and type(gate_up) in _PLAIN and type(down) in _PLAIN):
        return False
    if not (hidden.is_cpu and topk_ids.is_cpu and topk_weights.is_cpu and gate_up.is_cpu and down.is_cpu):
        return False
    dtype = hidden.dtype
    if not (dtype in _MOE_DTYPES and gate_up.dtype == dtype and down.dtype == dtype
            and topk_ids.dtype in _ID_DTYPES and topk_weights.dtype in _MOE_DTYPES):
        return False
    hs, ids, gs, ds = hidden.shape, topk_ids.shape, gate_up.shape, down.shape
    if not (len(hs) == 2 and len(ids) == 2 and len(gs) == 3 and len(ds) == 3 and topk_weights.shape == ids):
        return False
    T, H = hs
    E, two_i = gs[0], gs[1]
    return (ids[0] == T and T * ids[1] > 0 and H > 0 and E > 0 and two_i > 0 and two_i % 2 == 0 and gs[2] == H
            and ds[0] == E and ds[1] == H and ds[2] == two_i // 2 and T * ids[1] <= _checks.INT32_MAX)


# ---------------------------------------------------------------------------- public

def _moe_composite(hidden, topk_ids, topk_weights, gate_up, down, fn, tids, tgu, tdown):
    """Any activation: the same pipeline from differentiable pieces (gather, grouped_mm,
    torch's act, combine); only the activation is left unfused."""
    E, K = gate_up.shape[0], topk_ids.shape[1]
    check_moe_values(topk_ids, E, tids)
    order, inverse, offs = _route_op(topk_ids, E)
    xs = _gather_op(hidden, torch.div(order, K, rounding_mode="floor"), inverse)
    h1 = grouped_mm(xs, gate_up.transpose(1, 2), offs, trainable_w=_t(tgu), trainable_ids=tids)
    gate, up = h1.chunk(2, dim=-1)
    h2 = grouped_mm(fn(gate) * up, down.transpose(1, 2), offs, trainable_w=_t(tdown), trainable_ids=tids)
    return _combine_op(h2, inverse, topk_weights)


def moe_experts(hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Tensor, down: Tensor, *,
                act="silu", trainable_ids: Tensor | None = None, trainable_gate_up: Tensor | None = None,
                trainable_down: Tensor | None = None) -> Tensor:
    """Routed gated experts in HF layout: ``sum_k w[t,k] * down_e(act(gate_e(x)) * up_e(x))``.

    Args:
        hidden: ``[T, H]`` tokens (fp32, fp16 or bf16; fp64 on the torch backend).
        topk_ids: int64/int32 ``[T, K]`` expert of each (token, slot), in ``[0, E)``
            (checked: ValueError; float/bool ids are refused). ``K = 0`` (no slots) gives
            zeros, ``T = 0`` an empty result, on every backend.
        topk_weights: ``[T, K]`` routing weights (any float dtype; differentiable).
        gate_up: ``[E, 2I, H]`` (gate rows first, then up, as HF stores them); down: ``[E, H, I]``.
        act: "silu" (default), "gelu", "gelu_tanh" or "relu" (fused into the GEMM), or any
            callable (e.g. an HF ``act_fn``; applied by torch between the two GEMMs).
        trainable_ids: int64 ``[E_t]`` unique expert ids that train, with
            ``trainable_gate_up [E_t, 2I, H]`` and ``trainable_down [E_t, H, I]``: those experts
            use these weights, and weight gradients are computed for them only. ``gate_up``
            and ``down`` then get no gradient.

    Returns:
        ``[T, H]`` in ``hidden``'s dtype; each token's slots are combined in fp32 in slot order
        (deterministic). Differentiable in ``hidden``, ``topk_weights`` and the weights.
    """
    code, fn = resolve_act(act)
    if (trainable_ids is None and trainable_gate_up is None and trainable_down is None and code is not None
            and _moe_args_ok(hidden, topk_ids, topk_weights, gate_up, down)):
        # Valid, no trainable experts, on the CPU: the eager path where the torch backend runs.
        if torch_backend_eager(hidden.device) and plain_tensors():
            return _moe_eager(hidden, topk_ids, topk_weights, gate_up, down, None, None, None, code)
        return _moe_op(hidden, topk_ids.contiguous(), topk_weights, gate_up, down, None, None, None, code,
                       _needs_h1(hidden, topk_weights, gate_up, down))[0]
    _checks.tensor("hidden", hidden, ndim=2, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    _check_pairs(topk_ids)
    # Values (in [0, E)) are checked inside the op, together with trainable_ids (one sync).
    topk_ids = _checks.index_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int64, torch.int32), low=None,
                                    high=None)
    _checks.tensor("topk_weights", topk_weights, ndim=2, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    _checks.tensor("gate_up", gate_up, ndim=3)
    _checks.tensor("down", down, ndim=3)
    _checks.same_device(hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights, gate_up=gate_up, down=down)
    _checks.same_dtype(hidden=hidden, gate_up=gate_up, down=down)
    T, H = hidden.shape
    _checks.shape("topk_ids", topk_ids, (T, None), what="([T, K] with T = hidden.shape[0])")
    _checks.shape("topk_weights", topk_weights, tuple(topk_ids.shape), what="(the shape of topk_ids)")
    E, two_i = gate_up.shape[0], gate_up.shape[1]
    if E == 0 or two_i % 2:
        raise ValueError(f"gate_up must have shape [E, 2I, H] with E >= 1, got {tuple(gate_up.shape)}")
    _checks.shape("gate_up", gate_up, (E, two_i, H), what="([E, 2I, H] with H = hidden.shape[1])")
    _checks.shape("down", down, (E, H, two_i // 2), what="([E, H, I] matching gate_up [E, 2I, H])")
    check_trainable(E, ids_name="trainable_ids", ids=trainable_ids, ref=("hidden", hidden), pairs=[
        ("trainable_gate_up", trainable_gate_up, tuple(gate_up.shape[1:]), gate_up.dtype),
        ("trainable_down", trainable_down, tuple(down.shape[1:]), down.dtype),
    ])
    if trainable_ids is not None:
        trainable_ids = trainable_ids.contiguous()  # indexed as a flat array by the kernels
    if code is None:
        return _moe_composite(hidden, topk_ids, topk_weights, gate_up, down, fn, trainable_ids, trainable_gate_up,
                              trainable_down)
    if (hidden.is_cpu and hidden.numel() and topk_ids.numel() and gate_up.shape[1] and torch_backend_eager(hidden.device)
            and all(t is None or type(t) in _PLAIN for t in (hidden, topk_ids, topk_weights, gate_up, down,
                                                              trainable_ids, trainable_gate_up, trainable_down))
            and plain_tensors()):
        return _moe_eager(hidden, topk_ids, topk_weights, gate_up, down, trainable_ids, trainable_gate_up,
                          trainable_down, code)
    save = _needs_h1(hidden, topk_weights, gate_up, down, trainable_gate_up, trainable_down)
    out = _moe_op(hidden, topk_ids, topk_weights, gate_up, down, trainable_ids, trainable_gate_up, trainable_down,
                  code, save)
    return out[0]


def _needs_h1(*params):
    """Whether a backward will run (and needs h1): grad mode on and a parameter that wants a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)

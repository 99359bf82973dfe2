"""Grouped GEMM over ragged expert groups whose backward skips frozen experts (DESIGN.md §4).

``out[r] = x[r] @ W_e`` for the rows ``offs[e-1] <= r < offs[e]`` of expert ``e`` (``offs``
holds cumulative row ends, as in ``torch._grouped_mm``); rows from ``offs[-1]`` on are zero.
With ``trainable_ids``/``trainable_w`` expert ``trainable_ids[i]`` uses ``trainable_w[i]``
instead of ``w[trainable_ids[i]]``, and the weight gradient is computed for those experts
only, straight into the compact ``[E_t, K, N]`` gradient: frozen experts cost no dW FLOPs,
no gradient memory and no optimizer state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _alloc, _checks
from ._backend import Op
from ._library import custom_op

GMM = Op("grouped_mm", prefer=("triton", "torch"))
GMM_BWD = Op("grouped_mm_backward", prefer=("triton", "torch"))

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------- reference

def _expert_weights(w, trainable_w, trainable_ids):
    weights = list(w.unbind(0))
    if trainable_ids is not None:
        for i, e in enumerate(trainable_ids.tolist()):
            weights[e] = trainable_w[i]
    return weights


def grouped_mm_reference(x: Tensor, w: Tensor, offs: Tensor, *, trainable_w: Tensor | None = None,
                         trainable_ids: Tensor | None = None) -> Tensor:
    """Readable torch reference: a loop over experts (differentiable through autograd)."""
    weights = _expert_weights(w, trainable_w, trainable_ids)
    pieces, start = [], 0
    for e, end in enumerate(offs.tolist()):
        pieces.append(x[start:end] @ weights[e].to(x.dtype))
        start = end
    pieces.append(x.new_zeros(x.shape[0] - start, w.shape[2]))
    return torch.cat(pieces, 0)


def _aligned_operand(t: Tensor) -> bool:
    """``torch._grouped_mm``'s layout rule for one operand (it raises otherwise): 16-byte
    aligned data, one of the last two dims unit-strided and the other's stride a multiple
    of 16 bytes, every size >= 1 (a zero size has no valid stride for it)."""
    if t.data_ptr() % 16 or 0 in t.shape:
        return False
    align = 16 // t.element_size()
    rows, cols = t.shape[-2], t.shape[-1]
    s_rows, s_cols = t.stride(-2), t.stride(-1)
    if s_cols == 1 and s_rows >= cols:
        return s_rows % align == 0
    if s_rows == 1 and s_cols >= rows:
        return s_cols % align == 0
    return False


# [bool] once probed: whether this torch has a CPU kernel for torch._grouped_mm (fastdf
# takes torch >= 2.5; transformers notes it has none up to 2.8).
_NATIVE_CPU: list = []


def _native_cpu_available() -> bool:
    if not _NATIVE_CPU:
        try:
            torch._grouped_mm(torch.zeros(2, 4), torch.zeros(1, 4, 4), offs=torch.tensor([2], dtype=torch.int32))
            ok = True
        except (AttributeError, NotImplementedError, RuntimeError, TypeError):
            ok = False
        _NATIVE_CPU.append(ok)
    return _NATIVE_CPU[0]


def grouped_mm_cpu_native(x: Tensor, w: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` may run ``x @ w`` per group on the CPU: its dtypes,
    one dtype for both, and its layout rule. It then loops over the groups in C++ calling
    the same matrix product as :func:`grouped_mm_loop` (bitwise equal; the tests compare
    them), without a Python call per expert."""
    return (x.is_cpu and w.is_cpu and x.dtype == w.dtype and x.dtype in TRITON_DTYPES and _aligned_operand(x)
            and _aligned_operand(w) and _native_cpu_available())


def offs_int32(offs: Tensor) -> Tensor:
    """``offs`` as ``torch._grouped_mm`` takes it: contiguous int32 (a no-op when it is)."""
    return offs if offs.dtype == torch.int32 and offs.is_contiguous() else offs.to(torch.int32).contiguous()


def grouped_mm_loop(x: Tensor, w: Tensor, offs: Tensor, *, trainable_w: Tensor | None = None,
                    trainable_ids: Tensor | None = None, bounds: list | None = None) -> Tensor:
    """The torch backend's forward (not differentiable): the reference's per-expert
    products written straight into one output (``mm(out=)``, no per-expert temporaries and
    no concatenation), empty groups skipped; ``torch._grouped_mm`` (the same products, the
    loop in C++) where it takes the operands and no expert has its own trainable weights.
    Same products, so the same bits as the reference; it also takes ``trainable_w`` and
    float64. ``bounds``: ``[0] + offs.tolist()`` when the caller already read it."""
    if bounds is None:
        bounds = [0] + offs.tolist()
    if trainable_ids is None and grouped_mm_cpu_native(x, w):
        out = torch._grouped_mm(x, w, offs=offs_int32(offs))
        if bounds[-1] < x.shape[0]:
            out[bounds[-1]:].zero_()  # rows past the last group: zeros, as the loop writes
        return out
    weights = _expert_weights(w, trainable_w, trainable_ids)
    out = _alloc.empty((x.shape[0], w.shape[2]), dtype=x.dtype, device=x.device)
    for e in range(len(bounds) - 1):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            torch.mm(x[start:end], weights[e].to(x.dtype), out=out[start:end])
    out[bounds[-1]:].zero_()
    return out


# ---------------------------------------------------------------------------- value checks

_capturing = _checks.capturing


def check_offs_values(offs: Tensor, rows: int, trainable_ids: Tensor | None, num_experts: int):
    """Value checks that need the data (one device sync): ``offs`` non-decreasing, within
    ``[0, rows]``; ``trainable_ids`` unique and in range. Skipped while a CUDA graph is being
    captured (the kernels then clamp ``offs``, so bad values give wrong rows, never bad memory
    accesses)."""
    if _capturing():
        return
    flags = [(offs < 0).any(), offs[-1] > rows, (offs[1:] < offs[:-1]).any()]
    if trainable_ids is not None:
        flags += _ids_flags(trainable_ids, num_experts)
    bad = torch.stack(flags).tolist()
    if bad[0]:
        raise ValueError("offs must be non-negative (cumulative row ends)")
    if bad[1]:
        raise ValueError(f"offs[-1] must be <= the number of rows of x ({rows}), got {int(offs[-1])}")
    if bad[2]:
        raise ValueError(f"offs must be non-decreasing (cumulative row ends), got {offs.tolist()}")
    if trainable_ids is not None:
        _raise_ids(bad[3:], trainable_ids, num_experts)


def _ids_flags(ids: Tensor, num_experts: int):
    out_of_range = ((ids < 0) | (ids >= num_experts)).any()
    if ids.numel() > 1:
        s = ids.sort().values
        dup = (s[1:] == s[:-1]).any()
    else:
        dup = torch.zeros((), dtype=torch.bool, device=ids.device)
    return [out_of_range, dup]


def _raise_ids(bad, ids, num_experts):
    if bad[0]:
        raise ValueError(f"trainable_ids must lie in [0, {num_experts}) (the experts of w), got {ids.tolist()}")
    if bad[1]:
        raise ValueError(f"trainable_ids must be unique, got {ids.tolist()}")


def slot_map(trainable_ids: Tensor | None, num_experts: int, device) -> Tensor | None:
    """int32 [E]: the trainable_w row of each expert, -1 for experts that use w."""
    if trainable_ids is None:
        return None
    slot = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    slot[trainable_ids] = torch.arange(trainable_ids.numel(), dtype=torch.int32, device=device)
    return slot


# ---------------------------------------------------------------------------- forward

@GMM.register("torch")
def _gmm_torch(x, w, offs, trainable_w, trainable_ids):
    check_offs_values(offs, x.shape[0], trainable_ids, w.shape[0])
    return grouped_mm_loop(x, w, offs, trainable_w=trainable_w, trainable_ids=trainable_ids)


def _triton_supports(x, *args):
    if x.dtype not in TRITON_DTYPES:
        return f"the Triton kernels take {', '.join(str(d)[6:] for d in TRITON_DTYPES)}, got {str(x.dtype)[6:]}"
    return None


@GMM.register("triton", supports=_triton_supports)
def _gmm_triton(x, w, offs, trainable_w, trainable_ids):
    from fastdf.kernels.grouped_mm import gmm

    check_offs_values(offs, x.shape[0], trainable_ids, w.shape[0])
    out = _alloc.empty((x.shape[0], w.shape[2]), dtype=x.dtype, device=x.device)
    if out.numel():
        gmm(x, w, offs, out, tw=trainable_w, slot=slot_map(trainable_ids, w.shape[0], x.device))
    return out


@custom_op(GMM)
def _gmm_op(x: Tensor, w: Tensor, offs: Tensor, trainable_w: Tensor | None, trainable_ids: Tensor | None) -> Tensor:
    ...


@_gmm_op.register_fake
def _(x, w, offs, trainable_w, trainable_ids):
    return x.new_empty((x.shape[0], w.shape[2]))


# ---------------------------------------------------------------------------- backward

def _dw_ids(trainable_ids, num_experts, device):
    if trainable_ids is not None:
        return trainable_ids
    return torch.arange(num_experts, dtype=torch.int64, device=device)


@GMM_BWD.register("torch")
def _gmm_bwd_torch(grad, x, w, offs, trainable_w, trainable_ids, need_dx, need_dw):
    bounds = [0] + offs.tolist()
    dx = x.new_empty(0)
    if need_dx:
        weights = _expert_weights(w, trainable_w, trainable_ids)
        dx = _alloc.empty(tuple(x.shape), dtype=x.dtype, device=x.device)
        for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])):
            if t > s:
                torch.mm(grad[s:t], weights[e].transpose(0, 1).to(x.dtype), out=dx[s:t])
        dx[bounds[-1]:].zero_()
    dw = x.new_empty(0)
    if need_dw:
        ids = _dw_ids(trainable_ids, w.shape[0], x.device).tolist()
        ref = trainable_w if trainable_ids is not None else w
        dw = torch.empty((len(ids),) + tuple(w.shape[1:]), dtype=ref.dtype, device=x.device)
        for j, e in enumerate(ids):
            s, t = bounds[e], bounds[e + 1]
            dw[j] = (x[s:t].transpose(0, 1) @ grad[s:t]).to(ref.dtype)
    return dx, dw


@GMM_BWD.register("triton", supports=lambda grad, x, *a: _triton_supports(x))
def _gmm_bwd_triton(grad, x, w, offs, trainable_w, trainable_ids, need_dx, need_dw):
    from fastdf.kernels.grouped_mm import gmm, gmm_dw

    dx = x.new_empty(0)
    if need_dx:
        dx = _alloc.empty(x.shape, dtype=x.dtype, device=x.device)
        if dx.numel():
            slot = slot_map(trainable_ids, w.shape[0], x.device)
            tw_t = trainable_w.transpose(1, 2) if trainable_w is not None else None
            gmm(grad, w.transpose(1, 2), offs, dx, tw=tw_t, slot=slot)
    dw = x.new_empty(0)
    if need_dw:
        ids = _dw_ids(trainable_ids, w.shape[0], x.device)
        ref = trainable_w if trainable_ids is not None else w
        dw = _alloc.empty((ids.numel(),) + tuple(w.shape[1:]), dtype=ref.dtype, device=x.device)
        if dw.numel():
            gmm_dw(x, grad, offs, ids, dw)
    return dx, dw


@custom_op(GMM_BWD)
def _gmm_bwd_op(grad: Tensor, x: Tensor, w: Tensor, offs: Tensor, trainable_w: Tensor | None,
                trainable_ids: Tensor | None, need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor]:
    ...


@_gmm_bwd_op.register_fake
def _(grad, x, w, offs, trainable_w, trainable_ids, need_dx, need_dw):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    if not need_dw:
        return dx, x.new_empty(0)
    if trainable_ids is not None:
        return dx, trainable_w.new_empty(tuple(trainable_w.shape))
    return dx, w.new_empty(tuple(w.shape))


def _gmm_setup(ctx, inputs, output):
    x, w, offs, trainable_w, trainable_ids = inputs
    ctx.save_for_backward(x, w, offs, trainable_w, trainable_ids)
    ctx.has_trainable = trainable_ids is not None


def _gmm_backward(ctx, grad):
    x, w, offs, trainable_w, trainable_ids = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[3] if ctx.has_trainable else ctx.needs_input_grad[1]
    if not (need_dx or need_dw):
        return None, None, None, None, None
    dx, dw = _gmm_bwd_op(grad, x, w, offs, trainable_w, trainable_ids, need_dx, need_dw)
    dx = dx if need_dx else None
    dw = dw if need_dw else None
    if ctx.has_trainable:
        return dx, None, None, dw, None
    return dx, dw, None, None, None


_gmm_op.register_autograd(_gmm_backward, setup_context=_gmm_setup)


# ---------------------------------------------------------------------------- public

def check_trainable(num_experts, *, ids_name, ids, pairs, ref):
    """Shared argument checks for trainable_ids and the compact weights that go with it.
    ``pairs``: [(name, tensor, expected shape without the leading E_t, dtype)]; ``ref``:
    (name, tensor) whose device they must share."""
    given = [name for name, t, *_ in pairs if t is not None]
    if ids is None:
        if given:
            raise ValueError(f"{given[0]} needs {ids_name} (which experts its rows belong to)")
        return
    _checks.index_tensor(ids_name, ids, ndim=1, dtypes=(torch.int64,), low=None, high=None)
    missing = [name for name, t, *_ in pairs if t is None]
    if missing:
        raise ValueError(f"{ids_name} needs {missing[0]} (the compact weights of those experts)")
    if ids.numel() > num_experts:
        raise ValueError(f"{ids_name} lists {ids.numel()} experts but there are only {num_experts}")
    for name, t, shape, dtype in pairs:
        _checks.tensor(name, t, ndim=len(shape) + 1)
    _checks.same_device(**{ref[0]: ref[1], ids_name: ids}, **{name: t for name, t, *_ in pairs})
    for name, t, shape, dtype in pairs:
        _checks.shape(name, t, (ids.numel(), *shape), what=f"([len({ids_name}), ...] like the full weights)")
        if t.dtype != dtype:
            raise ValueError(f"{name} has dtype {str(t.dtype)[6:]} but the full weights have {str(dtype)[6:]}; they must match")


def grouped_mm(x: Tensor, w: Tensor, offs: Tensor, *, trainable_w: Tensor | None = None,
               trainable_ids: Tensor | None = None) -> Tensor:
    """Grouped matrix product over ragged expert groups; backward skips frozen experts.

    Args:
        x: ``[S, K]`` rows sorted by expert (fp32, fp16 or bf16; fp64 on the torch backend).
        w: ``[E, K, N]`` expert weights, any strides (e.g. HF's ``[E, N, K]`` weight
            ``.transpose(1, 2)``, read without a copy), same dtype as ``x``.
        offs: int32 ``[E]`` cumulative row ends (as ``torch._grouped_mm``): rows
            ``offs[e-1] .. offs[e]-1`` use expert ``e``; rows from ``offs[-1]`` on are zero in
            the output. Must be non-decreasing and at most ``S`` (checked; ValueError).
            Any strides (a view is copied before a kernel reads it).
        trainable_w: ``[E_t, K, N]``, with ``trainable_ids`` int64 ``[E_t]`` (unique expert
            ids): expert ``trainable_ids[i]`` uses ``trainable_w[i]`` instead of its ``w``.

    Returns:
        ``[S, N]`` in ``x``'s dtype (fp32 accumulation). Gradients: ``x`` (if it requires
        grad); ``trainable_w`` (the weight gradient is computed for those experts only);
        ``w`` only when ``trainable_w`` is None and ``w`` requires grad.
    """
    _checks.tensor("x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    _checks.tensor("w", w, ndim=3)
    # Kernels index offs and trainable_ids as flat arrays: views (offs[::2]) are copied here.
    offs = _checks.index_tensor("offs", offs, ndim=1, dtypes=(torch.int32,), low=None, high=None)
    _checks.same_device(x=x, w=w, offs=offs)
    _checks.same_dtype(x=x, w=w)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w must have shape [E, K, N] with K = x.shape[1] = {x.shape[1]}, got {tuple(w.shape)}")
    if w.shape[0] == 0:
        raise ValueError("w must hold at least one expert, got shape " + str(tuple(w.shape)))
    _checks.shape("offs", offs, (w.shape[0],), what="([E], one cumulative row end per expert of w)")
    check_trainable(w.shape[0], ids_name="trainable_ids", ids=trainable_ids, ref=("x", x),
                    pairs=[("trainable_w", trainable_w, tuple(w.shape[1:]), w.dtype)])
    if trainable_ids is not None:
        trainable_ids = trainable_ids.contiguous()
    return _gmm_op(x, w, offs, trainable_w, trainable_ids)

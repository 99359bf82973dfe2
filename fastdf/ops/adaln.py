"""Per-frame AdaLN modulation and gated residuals (DESIGN.md §4, issue #3).

For x ``[B, T, C]`` and per-frame tables ``[B, F, C]`` (``T % F == 0``, ``S = T // F``
tokens per frame, token t in frame ``t // S``):

    adaln_modulate(x, shift, scale) = N(x) * (1 + scale[:, t // S]) + shift[:, t // S]
    gated_residual(x, y, gate)      = x + gate[:, t // S] * y

N is LayerNorm or RMSNorm over C (statistics in fp32; affine only if weight/bias are
given). The kernels read the tables by frame index and reduce their gradients per frame
inside the kernel: no [B, T, C] modulation tensor exists forward or backward (DFoT repeats
the embedding per token; SkyReels-V2 materialises an fp32 [B, 6, T, C] one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from . import _alloc, _checks
from ._eager import PLAIN, cpu_kernel_route, direct_apply, plain_tensors, torch_backend_eager
from ._backend import Op
from ._library import custom_op

MODULATE = Op("adaln_modulate", prefer=("triton", "torch"))
MODULATE_BACKWARD = Op("adaln_modulate_backward", prefer=("triton", "torch"))
GATED = Op("gated_residual", prefer=("triton", "torch"))
GATED_BACKWARD = Op("gated_residual_backward", prefer=("triton", "torch"))

NORMS = ("layer", "rms")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_frame(x: Tensor, frames: int) -> Tensor:
    """[B, T, C] -> [B, F, S, C] (a view when strides allow)."""
    B, T, C = x.shape
    return x.reshape(B, frames, T // frames, C)


# ---------------------------------------------------------------------------- references


def normalize_reference(x: Tensor, *, norm: str = "layer", weight: Tensor | None = None, bias: Tensor | None = None,
                        eps: float = 1e-6) -> Tensor:
    """N(x) in fp32 (fp64 for fp64 x), affine applied, result in fp32/fp64."""
    xf = x.to(_acc(x.dtype))
    if norm == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    n = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        n = n * weight.to(n.dtype)
    if bias is not None:
        n = n + bias.to(n.dtype)
    return n


def adaln_modulate_reference(x: Tensor, shift: Tensor, scale: Tensor, *, norm: str = "layer",
                             weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Readable reference, as a model would write it: the norm in fp32 cast back to x's
    dtype, then the modulation broadcast per frame (a view, never a per-token table)."""
    n = normalize_reference(x, norm=norm, weight=weight, bias=bias, eps=eps).to(x.dtype)
    frames = shift.shape[1]
    y = _per_frame(n, frames) * (1 + scale[:, :, None, :]) + shift[:, :, None, :]
    return y.reshape(x.shape).to(x.dtype)


def gated_residual_reference(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """x + gate[:, t // S] * y, broadcast per frame."""
    out = _per_frame(x, gate.shape[1]) + gate[:, :, None, :] * _per_frame(y, gate.shape[1])
    return out.reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------- torch backend


def _stats_torch(x, rms, eps):
    xf = x.to(_acc(x.dtype))
    mean = xf.new_zeros(xf.shape[:-1]) if rms else xf.mean(-1)
    rstd = torch.rsqrt((xf - mean[..., None]).square().mean(-1) + eps)
    return mean, rstd


def _fused_norm_ok(x, weight, bias, rms):
    """Whether torch's fused norms compute N(x) exactly as the reference does: statistics
    and affine in fp32 (fp64 for fp64 x), one rounding to x's dtype. They take an affine in
    x's dtype (or fp32 beside a 16-bit x); RMSNorm has no bias, so a bias is added after
    the rounding, which only fp32/fp64 x can afford (a second rounding otherwise)."""
    if weight is None and bias is None:
        return x.numel() != 0
    if x.numel() == 0:
        return False  # C = 0: the reference's NaN statistics, not the kernels' choices
    ok = (x.dtype,) if x.dtype in (torch.float32, torch.float64) else (x.dtype, torch.float32)
    if any(t is not None and t.dtype not in ok for t in (weight, bias)):
        return False
    return not (rms and bias is not None and x.dtype not in (torch.float32, torch.float64))


def _norm_fused(x, rms, weight, bias, eps):
    """``(N(x) in x's dtype (a fresh contiguous tensor), mean, rstd)`` with fp32 [B, T]
    statistics, from torch's fused LayerNorm / RMSNorm (one pass for the statistics, one
    for the output)."""
    C = x.shape[-1]
    if rms:
        n, rstd = torch.ops.aten._fused_rms_norm(x, [C], weight, eps)
        if bias is not None:
            n.add_(bias)
        mean = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
    else:
        n, mean, rstd = torch.native_layer_norm(x, [C], weight, bias, eps)
        mean = mean.view(x.shape[:2]).float()
    return n, mean, rstd.view(x.shape[:2]).float()


def _modulate_into(n, shift, scale):
    """``n <- n * (1 + scale) + shift`` per frame, in place on the fresh ``n`` (one pass:
    addcmul computes in the promoted dtype and rounds once into n's, as the reference)."""
    n4 = _per_frame(n, shift.shape[1])
    torch.addcmul(shift[:, :, None], n4, 1 + scale[:, :, None], out=n4)
    return n


@MODULATE.register("torch")
def _modulate_torch(x, shift, scale, weight, bias, rms, eps):
    if _fused_norm_ok(x, weight, bias, rms):
        n, mean, rstd = _norm_fused(x, rms, weight, bias, eps)
        return _modulate_into(n, shift, scale), mean, rstd
    y = _alloc.empty(x.shape, dtype=x.dtype, device=x.device)
    y.copy_(adaln_modulate_reference(x, shift, scale, norm="rms" if rms else "layer", weight=weight, bias=bias, eps=eps))
    mean, rstd = _stats_torch(x, rms, eps)
    return y, mean.float(), rstd.float()


def _modulate_eager(x, shift, scale, weight, bias, rms, eps):
    """The torch backend as plain torch (no custom op): fused norm, then the modulation.
    Without autograd it is one in-place addcmul on the fresh norm output; with autograd it
    is eager's own graph (measured: an autograd.Function with a leaner backward loses its
    saved pass to Python overhead below ~1 MB and only ties above it)."""
    # Every Python line here costs ~1-2 us next to the op's memory traffic (measured 50 us
    # of wrapper on a 240 us 256 KiB modulate): torch.* directly, no helper calls.
    B, T, C = x.shape
    n = torch.rms_norm(x, (C,), weight, eps) if rms else torch.layer_norm(x, (C,), weight, bias, eps)
    if rms and bias is not None:
        n = n + bias
    if not (torch.is_grad_enabled() and (x.requires_grad or shift.requires_grad or scale.requires_grad
                                         or (weight is not None and weight.requires_grad)
                                         or (bias is not None and bias.requires_grad))) \
            and plain_tensors(x, shift, scale):  # out= has no vmap rule
        return _modulate_into(n, shift, scale)
    y = (n.view(B, shift.shape[1], -1, C) * (1 + scale[:, :, None]) + shift[:, :, None]).view(B, T, C)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _empty_grad(t, like):
    return like.new_empty((0,)) if t is None else t


@MODULATE_BACKWARD.register("torch")
def _modulate_backward_torch(grad, x, scale, weight, bias, mean, rstd, rms):
    """Explicit formulas in fp32: with xhat = (x - mean) * rstd and n = xhat * w + b,
    d shift = sum_frame(dy), d scale = sum_frame(dy * n), dn = dy * (1 + scale),
    d w = sum(dn * xhat), d b = sum(dn), and with dxh = dn * w:
    dx = rstd * (dxh - mean(dxh) - xhat * mean(dxh * xhat)) (no mean(dxh) term for RMS)."""
    acc = _acc(x.dtype)
    frames = scale.shape[1]
    xhat = (x.to(acc) - mean.to(acc)[..., None]) * rstd.to(acc)[..., None]
    n = xhat if weight is None else xhat * weight.to(acc)
    if bias is not None:
        n = n + bias.to(acc)
    g = grad.to(acc)
    g4 = _per_frame(g, frames)
    d_shift = g4.sum(2)
    d_scale = (g4 * _per_frame(n, frames)).sum(2)
    dn = (g4 * (1 + scale.to(acc)[:, :, None, :])).reshape(x.shape)
    d_weight = (dn * xhat).sum((0, 1)) if weight is not None else None
    d_bias = dn.sum((0, 1)) if bias is not None else None
    dxh = dn if weight is None else dn * weight.to(acc)
    inner = dxh - xhat * (dxh * xhat).mean(-1, keepdim=True)
    if not rms:
        inner = inner - dxh.mean(-1, keepdim=True)
    dx = inner * rstd.to(acc)[..., None]
    return (dx.to(x.dtype), d_shift.to(scale.dtype), d_scale.to(scale.dtype),
            _empty_grad(None if d_weight is None else d_weight.to(weight.dtype), x),
            _empty_grad(None if d_bias is None else d_bias.to(bias.dtype), x))


def _gated_into(out, x, y, gate):
    """``out <- x + gate * y`` per frame in one pass (addcmul in the promoted dtype, one
    rounding into out's dtype, as the reference)."""
    frames = gate.shape[1]
    if frames in (1, x.shape[1]):  # the table broadcasts as it is: skip three views
        return torch.addcmul(x, gate, y, out=out)
    torch.addcmul(_per_frame(x, frames), gate[:, :, None], _per_frame(y, frames), out=_per_frame(out, frames))
    return out


@GATED.register("torch")
def _gated_torch(x, y, gate):
    return _gated_into(_alloc.empty(x.shape, dtype=x.dtype, device=x.device), x, y, gate)


class _GatedFunction(torch.autograd.Function):
    """``x + gate * y`` with one addcmul forward (eager's ``gate * y`` temporary, a whole
    [B, T, C] pass and allocation, is not made) and eager's backward: dx = the incoming
    gradient itself, dy = grad * gate, d gate = the per-frame sum of grad * y.
    Measured (OMP_NUM_THREADS=1, interleaved): 1.2x eager's graph at 256 KiB."""

    @staticmethod
    def forward(ctx, x, y, gate):
        ctx.save_for_backward(y, gate)
        ctx.x_dtype = x.dtype
        ctx.acc = torch.promote_types(torch.promote_types(y.dtype, gate.dtype), torch.float32)
        return _gated_into(_alloc.empty(x.shape, dtype=x.dtype, device=x.device), x, y, gate)

    @staticmethod
    def backward(ctx, grad):
        y, gate = ctx.saved_tensors
        frames = gate.shape[1]
        d_y = d_gate = None
        # Products and the frame sums in fp32 at least (the forward computed in it: a
        # 16-bit x's gradient arrives in 16 bits); a no-op for fp32/fp64 tensors.
        if grad.dtype != ctx.acc:
            grad = grad.to(ctx.acc)
        if frames in (1, y.shape[1]):  # the table broadcasts as it is
            if ctx.needs_input_grad[1]:
                d_y = (grad * gate).to(y.dtype)
            if ctx.needs_input_grad[2]:
                d_gate = grad * y
                d_gate = (d_gate.sum(1, keepdim=True) if frames == 1 and y.shape[1] != 1 else d_gate).to(gate.dtype)
        else:
            g4 = _per_frame(grad, frames)
            if ctx.needs_input_grad[1]:
                d_y = (g4 * gate[:, :, None]).reshape(y.shape).to(y.dtype)
            if ctx.needs_input_grad[2]:
                d_gate = (g4 * _per_frame(y, frames)).sum(2).to(gate.dtype)
        return grad.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None, d_y, d_gate


def _gated_eager(x, y, gate):
    """The torch backend as plain torch (no custom op): one addcmul without autograd, a
    lean autograd.Function with it (eager's graph under functorch transforms and
    dispatch modes, which a Function without vmap rules cannot enter)."""
    if plain_tensors(x, y, gate):  # else eager's graph: out= has no vmap rule, the Function none either
        if not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or gate.requires_grad)):
            return _gated_into(_alloc.empty(x.shape, dtype=x.dtype, device=x.device), x, y, gate)
        return _GatedFunction.apply(x, y, gate)
    frames = gate.shape[1]
    out = _per_frame(x, frames) + gate[:, :, None] * _per_frame(y, frames)
    return out.reshape(x.shape).to(x.dtype)


@GATED_BACKWARD.register("torch")
def _gated_backward_torch(grad, y, gate):
    acc = _acc(y.dtype)
    frames = gate.shape[1]
    g4 = _per_frame(grad.to(acc), frames)
    d_y = (g4 * gate.to(acc)[:, :, None, :]).reshape(y.shape).to(y.dtype)
    d_gate = (g4 * _per_frame(y.to(acc), frames)).sum(2).to(gate.dtype)
    return d_y, d_gate


# ---------------------------------------------------------------------------- fastdf._cpu kernels

# The torch backend's CPU route for fp32 (issue 11): fastdf._cpu's one-visit-per-row kernels
# (csrc/cpu/adaln.cpp) instead of eager's LayerNorm + broadcast passes; tests switch it off
# to hold the eager route to the same references.
CPU_KERNEL = True


def _table(t):
    return (t.data_ptr(), t.stride(0), t.stride(1))


def _ptr(t):
    """A tensor's data pointer, 0 for an absent one (the bindings' "not given / not wanted")."""
    return 0 if t is None else t.data_ptr()


_F32 = torch.float32


def _cpu_route() -> bool:
    """fastdf._cpu's kernels may run now: built for this CPU, the torch backend chosen for
    CPU tensors, nothing tracing, no dispatch mode or functorch transform (the kernels read
    data pointers, which fake or batched tensors do not have)."""
    return CPU_KERNEL and cpu_kernel_route() and _native.cpu_module() is not None


# The route tests below are also the public functions' argument checks for the cases they
# accept (each line one condition of _check_tables / the shape rules), in one expression:
# on a 256 KiB tensor the whole op takes ~30-200 us here, and the separate checks, routing
# and wrappers had cost ~20 us of Python a call, which eager PyTorch does not pay (issue 11).


def _table_ok(t, B, T, C) -> bool:
    """A plain CPU fp32 [B, F, C] table with T % F == 0 and a contiguous last dim."""
    if type(t) not in PLAIN or t.dtype != _F32 or not t.is_cpu:
        return False
    shape = t.shape
    return len(shape) == 3 and shape[0] == B and shape[2] == C and shape[1] > 0 and T % shape[1] == 0 \
        and t.stride(2) == 1


def _vector_ok(t, C) -> bool:
    return t is None or (type(t) in PLAIN and t.dtype == _F32 and t.is_cpu and t.shape == (C,) and t.is_contiguous())


def _rows_ok(x) -> bool:
    """A plain, contiguous, non-empty CPU fp32 [B, T, C] tensor."""
    return (type(x) in PLAIN and x.dtype == _F32 and x.is_cpu and x.dim() == 3 and x.is_contiguous()
            and x.numel() > 0)


def _modulate_on_cpu_kernel(x, shift, scale, weight, bias) -> bool:
    if not _rows_ok(x):
        return False
    B, T, C = x.shape
    return (_table_ok(shift, B, T, C) and _table_ok(scale, B, T, C) and shift.shape == scale.shape
            and _vector_ok(weight, C) and _vector_ok(bias, C) and _cpu_route())


def _gated_on_cpu_kernel(x, y, gate) -> bool:
    # _rows_ok / _table_ok written out: this op is small enough that each function call
    # shows (see cpu_kernel_route)
    if not (type(x) in PLAIN and type(y) in PLAIN and type(gate) in PLAIN and x.dtype == _F32 and y.dtype == _F32
            and gate.dtype == _F32 and x.is_cpu and y.is_cpu and gate.is_cpu and x.is_contiguous()
            and y.is_contiguous()):
        return False
    shape, table = x.shape, gate.shape
    return (len(shape) == 3 and y.shape == shape and len(table) == 3 and table[0] == shape[0]
            and table[2] == shape[2] and table[1] > 0 and shape[1] % table[1] == 0
            and shape[0] * shape[1] * shape[2] > 0 and gate.stride(2) == 1 and _cpu_route())


def _modulate_forward_cpu(x, shift, scale, weight, bias, rms, eps, stats):
    """``(y, mean, rstd)`` (statistics None unless ``stats``) from fastdf._cpu."""
    B, T, C = x.shape
    y = _alloc.empty_like(x)
    mean = rstd = None
    if stats:
        mean = _alloc.empty((B, T), dtype=torch.float32, device=x.device)
        rstd = _alloc.empty((B, T), dtype=torch.float32, device=x.device)
    _native.cpu_module().modulate_forward(
        x.data_ptr(), _table(shift), _table(scale), _ptr(weight), _ptr(bias), y.data_ptr(), _ptr(mean), _ptr(rstd),
        B, T, shift.shape[1], C, rms, eps, torch.get_num_threads())
    return y, mean, rstd


class _ModulateCpu(torch.autograd.Function):
    """adaln_modulate on fastdf._cpu: one visit per row forward (statistics and y), one
    backward (the frame sums, the affine sums and dx), against eager's ~3 + ~5 passes."""

    @staticmethod
    def forward(ctx, x, shift, scale, weight, bias, rms, eps):
        y, mean, rstd = _modulate_forward_cpu(x, shift, scale, weight, bias, rms, eps, True)
        ctx.save_for_backward(x, scale, weight, bias, mean, rstd)
        ctx.rms = rms
        return y

    @staticmethod
    def backward(ctx, grad):
        x, scale, weight, bias, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not grad.is_contiguous():  # a sum's gradient arrives expanded
            grad = grad.contiguous()
        B, T, C = x.shape
        dx, d_shift, d_scale, d_weight, d_bias = (
            _alloc.empty(like.shape, dtype=torch.float32, device=like.device) if wanted else None
            for wanted, like in zip(need, (x, scale, scale, weight, bias)))
        _native.cpu_module().modulate_backward(
            grad.data_ptr(), x.data_ptr(), _table(scale), _ptr(weight), _ptr(bias), mean.data_ptr(), rstd.data_ptr(),
            _ptr(dx), _ptr(d_shift), _ptr(d_scale), _ptr(d_weight), _ptr(d_bias), B, T, scale.shape[1], C, ctx.rms,
            torch.get_num_threads())
        return dx, d_shift, d_scale, d_weight, d_bias, None, None


def _gated_forward_cpu(x, y, gate):
    B, T, C = x.shape
    out = _alloc.empty_like(x)
    _native.cpu_module().gated_forward(x.data_ptr(), y.data_ptr(), _table(gate), out.data_ptr(), B, T,
                                       gate.shape[1], C, torch.get_num_threads())
    return out


class _GatedCpu(torch.autograd.Function):
    """gated_residual on fastdf._cpu: dx is the incoming gradient itself; d y and the frame
    sums of d gate in one visit per row."""

    @staticmethod
    def forward(ctx, x, y, gate):
        ctx.save_for_backward(y, gate)
        return _gated_forward_cpu(x, y, gate)

    @staticmethod
    def backward(ctx, grad):
        y, gate = ctx.saved_tensors
        need_x, need_y, need_gate = ctx.needs_input_grad
        if not grad.is_contiguous():  # a sum's gradient arrives expanded
            grad = grad.contiguous()
        B, T, C = y.shape
        d_y = _alloc.empty_like(y) if need_y else None
        d_gate = _alloc.empty_like(gate) if need_gate else None
        if need_y or need_gate:
            _native.cpu_module().gated_backward(
                grad.data_ptr(), y.data_ptr(), _table(gate), _ptr(d_y), _ptr(d_gate), B, T, gate.shape[1], C,
                torch.get_num_threads())
        return grad if need_x else None, d_y, d_gate


_gated_apply = direct_apply(_GatedCpu)  # the route has checked that no functorch transform is active


# ---------------------------------------------------------------------------- triton backend


def _triton_supports(x, *tables):
    for t in (x, *tables):
        if t is not None and t.dtype not in _checks.FLOAT_DTYPES:
            return f"the triton kernels take float32/float16/bfloat16, got {str(t.dtype).removeprefix('torch.')}"
    if x.shape[-1] > 65536:
        return f"the triton kernels take up to 65536 channels, got {x.shape[-1]}"
    return None


@MODULATE.register("triton", supports=lambda x, shift, scale, weight, bias, *_: _triton_supports(x, shift, scale, weight, bias))
def _modulate_triton(x, shift, scale, weight, bias, rms, eps):
    from fastdf.kernels.adaln import modulate_forward

    B, T, C = x.shape
    y = _alloc.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = _alloc.empty((B, T), dtype=torch.float32, device=x.device)
    rstd = _alloc.empty((B, T), dtype=torch.float32, device=x.device)
    if x.numel():
        modulate_forward(x, shift, scale, weight, bias, y, mean, rstd, rms, eps)
    return y, mean, rstd


@MODULATE_BACKWARD.register("triton",
                            supports=lambda grad, x, scale, weight, bias, *_: _triton_supports(x, grad, scale, weight, bias))
def _modulate_backward_triton(grad, x, scale, weight, bias, mean, rstd, rms):
    from fastdf.kernels.adaln import modulate_backward

    dx = _alloc.empty(x.shape, dtype=x.dtype, device=x.device)
    d_shift, d_scale, d_weight, d_bias = modulate_backward(grad, x, scale, weight, bias, mean, rstd, dx, rms)
    return (dx, d_shift.to(scale.dtype), d_scale.to(scale.dtype),
            _empty_grad(None if d_weight is None else d_weight.to(weight.dtype), x),
            _empty_grad(None if d_bias is None else d_bias.to(bias.dtype), x))


@GATED.register("triton", supports=lambda x, y, gate: _triton_supports(x, y, gate))
def _gated_triton(x, y, gate):
    from fastdf.kernels.adaln import gated_forward

    out = _alloc.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        gated_forward(x, y, gate, out)
    return out


@GATED_BACKWARD.register("triton", supports=lambda grad, y, gate: _triton_supports(y, grad, gate))
def _gated_backward_triton(grad, y, gate):
    from fastdf.kernels.adaln import gated_backward

    d_y = _alloc.empty(y.shape, dtype=y.dtype, device=y.device)
    d_gate = gated_backward(grad, y, gate, d_y)
    return d_y, d_gate.to(gate.dtype)


# ---------------------------------------------------------------------------- custom ops


@custom_op(MODULATE)
def _modulate_op(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None, rms: bool,
                 eps: float) -> tuple[Tensor, Tensor, Tensor]:
    ...


@_modulate_op.register_fake
def _(x, shift, scale, weight, bias, rms, eps):
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


@custom_op(MODULATE_BACKWARD)
def _modulate_backward_op(grad: Tensor, x: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
                          mean: Tensor, rstd: Tensor, rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ...


@_modulate_backward_op.register_fake
def _(grad, x, scale, weight, bias, mean, rstd, rms):
    table = lambda: scale.new_empty(scale.shape)  # noqa: E731
    affine = lambda t: x.new_empty((0,)) if t is None else t.new_empty(t.shape)  # noqa: E731
    return torch.empty_like(x, memory_format=torch.contiguous_format), table(), table(), affine(weight), affine(bias)


def _modulate_setup(ctx, inputs, output):
    x, shift, scale, weight, bias, rms, eps = inputs
    ctx.rms = rms
    ctx.has = (weight is not None, bias is not None)
    ctx.save_for_backward(x, scale, weight, bias, output[1], output[2])


def _modulate_backward(ctx, grad, _grad_mean, _grad_rstd):
    x, scale, weight, bias, mean, rstd = ctx.saved_tensors
    dx, d_shift, d_scale, d_weight, d_bias = _modulate_backward_op(grad, x, scale, weight, bias, mean, rstd, ctx.rms)
    return (dx, d_shift, d_scale, d_weight if ctx.has[0] else None, d_bias if ctx.has[1] else None, None, None)


_modulate_op.register_autograd(_modulate_backward, setup_context=_modulate_setup)


@custom_op(GATED)
def _gated_op(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    ...


@_gated_op.register_fake
def _(x, y, gate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op(GATED_BACKWARD)
def _gated_backward_op(grad: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    ...


@_gated_backward_op.register_fake
def _(grad, y, gate):
    return torch.empty_like(y, memory_format=torch.contiguous_format), gate.new_empty(gate.shape)


def _gated_setup(ctx, inputs, output):
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)


def _gated_backward(ctx, grad):
    y, gate = ctx.saved_tensors
    d_y, d_gate = _gated_backward_op(grad, y, gate)
    return grad, d_y, d_gate


_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup)


# ---------------------------------------------------------------------------- public


_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def _check_tables(x, frames_name, **tables):
    B, T, C = x.shape
    first = None
    for name, t in tables.items():
        _checks.tensor(name, t, ndim=3, dtypes=_DTYPES)
        if first is None:
            first = (name, t)
            F = t.shape[1]
            _checks.shape(name, t, (B, None, C), what="([B, F, C] with x's B and C)")
            if F == 0 or T % F:
                raise ValueError(f"{name} has {F} frames but x has {T} tokens: T must be a multiple of F "
                                 f"(tokens per frame S = T // F)")
        else:
            _checks.shape(name, t, tuple(first[1].shape), what=f"(the shape of {first[0]})")


# The public functions first test, in one expression, whether the arguments pass every
# named check (~1 us); only when they do not do the checks run one by one, to raise the
# error that names the argument. On the CPU a whole 256 KiB op takes ~20-30 us, so the
# ~10 us the named checks cost was a visible share of it (issue 11).
_F32_MAX = torch.finfo(torch.float32).max


def _tables_ok(x, tables) -> bool:
    """x is a float [B, T, C] tensor and ``tables`` valid [B, F, C] tables for it, all of
    one dtype (modulate's shift and scale must match; a single gate trivially does), on
    x's device. Attribute reads only: each costs ~0.5 us beside a running op."""
    T_ = torch.Tensor
    if not isinstance(x, T_) or x.dtype not in _DTYPES:
        return False
    shape = x.shape
    if len(shape) != 3:
        return False
    first = tables[0]
    if not isinstance(first, T_):
        return False
    table = first.shape
    if len(table) != 3 or table[0] != shape[0] or table[2] != shape[2] or not table[1] or shape[1] % table[1]:
        return False
    dtype, device = first.dtype, x.device
    if dtype not in _DTYPES or first.device != device:
        return False
    for t in tables[1:]:
        if not isinstance(t, T_) or t.shape != table or t.dtype != dtype or t.device != device:
            return False
    return True


def _affine_ok(t, x):
    return t is None or (isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype in _DTYPES
                         and t.shape[0] == x.shape[2] and t.device == x.device)


def _modulate_args_ok(x, shift, scale, norm, weight, bias) -> bool:
    return (type(norm) is str and norm in NORMS and _tables_ok(x, (shift, scale))
            and (weight is None or _affine_ok(weight, x)) and (bias is None or _affine_ok(bias, x)))


def _gated_args_ok(x, y, gate) -> bool:
    return (_tables_ok(x, (gate,)) and isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype in _DTYPES
            and y.device == x.device)


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, *, norm: str = "layer", weight: Tensor | None = None,
                   bias: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Per-frame AdaLN: ``N(x) * (1 + scale[:, t // S]) + shift[:, t // S]``.

    Args:
        x: ``[B, T, C]`` float tensor (any strides).
        shift, scale: ``[B, F, C]`` per-frame tables with ``T % F == 0``; token t uses
            frame ``t // (T // F)`` (``F = T`` is per-token, ``F = 1`` one vector per
            sample). Any float dtype (e.g. fp32 tables with bf16 x).
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm) over C; statistics in fp32.
        weight, bias: optional ``[C]`` affine of the norm.
        eps: added to the variance (mean square for RMS): finite, ``>= 0`` and
            representable in float32 (ValueError otherwise).

    Returns:
        ``[B, T, C]`` in x's dtype. Differentiable in x, shift, scale, weight and bias; the
        table gradients are reduced per frame inside the kernel.
    """
    if (type(norm) is str and norm in NORMS and type(eps) is float and 0.0 <= eps <= _F32_MAX
            and _modulate_on_cpu_kernel(x, shift, scale, weight, bias)):
        if torch.is_grad_enabled() and (x.requires_grad or shift.requires_grad or scale.requires_grad
                                        or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)):
            return _ModulateCpu.apply(x, shift, scale, weight, bias, norm == "rms", eps)
        return _modulate_forward_cpu(x, shift, scale, weight, bias, norm == "rms", eps, False)[0]
    if not _modulate_args_ok(x, shift, scale, norm, weight, bias):  # the checks below name what is wrong
        _checks.tensor("x", x, ndim=3, dtypes=_DTYPES)
        if not isinstance(norm, str):
            raise TypeError(f"norm must be a str ('layer' or 'rms'), got {type(norm).__name__}")
        if norm not in NORMS:
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
        _check_tables(x, "shift", shift=shift, scale=scale)
        _checks.same_dtype(shift=shift, scale=scale)
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None:
                _checks.tensor(name, t, ndim=1, dtypes=_DTYPES)
                _checks.shape(name, t, (x.shape[-1],), what="([C] with x's C)")
        _checks.same_device(x=x, shift=shift, scale=scale, weight=weight, bias=bias)
    # The kernels add eps in fp32: NaN, inf or 1e300 would silently turn into NaN/zeros.
    if not (type(eps) is float and 0.0 <= eps <= _F32_MAX):  # NaN fails the comparison
        eps = _checks.finite_float("eps", eps, low=0)
    rms = norm == "rms"
    # 16-bit x stays on the custom op: CPU LayerNorm's own half backward rounds more than
    # the reference's fp32 chain (bias gradient 1.6x past the 2x rule in the tests).
    if x.dtype in (torch.float32, torch.float64) and _fused_norm_ok(x, weight, bias, rms) and torch_backend_eager(x.device):
        return _modulate_eager(x, shift, scale, weight, bias, rms, eps)
    y, _, _ = _modulate_op(x, shift, scale, weight, bias, norm == "rms", eps)
    return y


def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """Per-frame gated residual: ``x + gate[:, t // S] * y``.

    Args:
        x, y: ``[B, T, C]`` float tensors (any strides; y may have another dtype, e.g. a
            bf16 branch output on an fp32 residual stream under autocast).
        gate: ``[B, F, C]`` with ``T % F == 0`` (any float dtype).

    Returns:
        ``[B, T, C]`` in x's dtype (computed in fp32). Differentiable in x, y and gate (gate's gradient is
        reduced per frame inside the kernel).
    """
    # One token per frame (gate [B, T, C] like x) on plain fp32 CPU tensors, the torch
    # backend chosen, nothing tracing: plain elementwise work, and PyTorch's own ops are the
    # fastest there (issue 11; 1 thread, 256 KiB): fastdf._cpu's forward ran 0.55x one
    # addcmul's speed, and with autograd its Python node cost more than its one-pass
    # backward saved (0.83-0.89x `x + gate * y`). With autograd: eager's two native nodes,
    # the sum made in place in the product (one [B, T, C] allocation fewer than
    # `x + gate * y`, the same bits). The test is written out here, shapes first (a
    # per-frame gate fails there): each Python call in front of these ~120 us was ~2%.
    if type(x) in PLAIN and type(y) in PLAIN and type(gate) in PLAIN:
        shape = x.shape
        if (gate.shape == shape and y.shape == shape and len(shape) == 3 and x.dtype is _F32 and y.dtype is _F32
                and gate.dtype is _F32 and x.is_cpu and y.is_cpu and gate.is_cpu and cpu_kernel_route()):
            if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or gate.requires_grad):
                return torch.mul(gate, y).add_(x)
            return torch.addcmul(x, gate, y)
    if _gated_on_cpu_kernel(x, y, gate):
        grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or gate.requires_grad)
        return _gated_apply(x, y, gate) if grad else _gated_forward_cpu(x, y, gate)
    if not _gated_args_ok(x, y, gate):  # the checks below name what is wrong
        _checks.tensor("x", x, ndim=3, dtypes=_DTYPES)
        _checks.tensor("y", y, ndim=3, dtypes=_DTYPES)
        _checks.shape("y", y, tuple(x.shape), what="(the shape of x)")
        _check_tables(x, "gate", gate=gate)
        _checks.same_device(x=x, y=y, gate=gate)
    if torch_backend_eager(x.device) and x.numel():
        return _gated_eager(x, y, gate)
    return _gated_op(x, y, gate)

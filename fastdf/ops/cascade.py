"""Cascade attention: attention over a shared prefix and per-sample suffixes, combined by
log-sum-exp.

``merge_attention_states`` combines two partial softmax-attention results over disjoint
key sets. With ``o_x = softmax(s_x) v_x`` and ``lse_x = logsumexp(s_x)`` (natural log),
attention over the union of both key sets is

    lse = log(e^lse_a + e^lse_b),   o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b.

A state with no visible keys has lse = -inf and contributes nothing; two such states merge
to o = 0, lse = -inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from . import _alloc, _checks
from ._backend import Op
from ._layout import row_layout
from ._library import custom_op

MERGE = Op("merge_attention_states", prefer=("cuda", "triton", "torch"))


def merge_attention_states_reference(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor):
    """Readable torch reference (computes in fp32, or fp64 for fp64 inputs)."""
    acc = torch.float64 if o_a.dtype == torch.float64 else torch.float32
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - finite).unsqueeze(-1).to(acc)
    w_b = torch.exp(lse_b - finite).unsqueeze(-1).to(acc)
    out = w_a * o_a.to(acc) + w_b * o_b.to(acc)
    return out.to(o_a.dtype), lse


@MERGE.register("torch")
def _merge_torch(o_a, lse_a, o_b, lse_b):
    return merge_attention_states_reference(o_a, lse_a, o_b, lse_b)


def _launch_layout(o_a, lse_a, o_b, lse_b):
    """Outputs plus a strided row layout of all six tensors (inputs copied only if their
    leading dims cannot be walked with four strides)."""
    o = _alloc.empty_like(o_a)
    lse = _alloc.empty(lse_a.shape, dtype=lse_a.dtype, device=lse_a.device)
    layout = row_layout([lse_a, lse_b, lse], [o_a, o_b, o])
    if layout is None:
        o_a, lse_a, o_b, lse_b = (t.contiguous() for t in (o_a, lse_a, o_b, lse_b))
        layout = row_layout([lse_a, lse_b, lse], [o_a, o_b, o])
    return (o_a, lse_a, o_b, lse_b), (o, lse), layout


@MERGE.register("triton")
def _merge_triton(o_a, lse_a, o_b, lse_b):
    from fastdf.kernels.cascade import merge_states

    (o_a, lse_a, o_b, lse_b), (o, lse), (sizes, strides) = _launch_layout(o_a, lse_a, o_b, lse_b)
    if o.numel():
        merge_states(o_a, lse_a, o_b, lse_b, o, lse, sizes, strides)
    return o, lse


@MERGE.register("cuda", supports=lambda o_a, *_: None if o_a.dtype in _native.DTYPE_CODES else "fp64 is not compiled")
def _merge_cuda(o_a, lse_a, o_b, lse_b):
    (o_a, lse_a, o_b, lse_b), (o, lse), (sizes, strides) = _launch_layout(o_a, lse_a, o_b, lse_b)
    if o.numel():
        views = [
            (t.data_ptr(), [*st, t.stride(-1)] if t.dim() == o.dim() else st)
            for t, st in zip((o_a, o_b, o, lse_a, lse_b, lse), strides)
        ]
        _native.module().merge_attention_states(
            views[0], views[3], views[1], views[4], views[2], views[5],
            [*sizes, o.shape[-1]], _native.dtype_code(o), _native.stream(o), o.device.index,
        )
    return o, lse


@custom_op(MERGE)
def _merge_op(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    ...


@_merge_op.register_fake
def _(o_a, lse_a, o_b, lse_b):
    return (torch.empty_like(o_a, memory_format=torch.contiguous_format),
            torch.empty_like(lse_a, memory_format=torch.contiguous_format))


def _merge_setup(ctx, inputs, output):
    o_a, lse_a, o_b, lse_b = inputs
    ctx.save_for_backward(o_a, lse_a, o_b, lse_b, *output)


def _merge_backward(ctx, grad_o, grad_lse):
    # o = p_a o_a + p_b o_b with p_x = e^(lse_x - lse):
    #   d/d o_x = p_x g_o,   d/d lse_x = p_x (<g_o, o_x - o> + g_lse).
    o_a, lse_a, o_b, lse_b, o, lse = ctx.saved_tensors
    acc = torch.float64 if o.dtype == torch.float64 else torch.float32
    finite = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p_a = torch.exp(lse_a - finite)
    p_b = torch.exp(lse_b - finite)
    g = grad_o.to(acc)
    g_dot_o = (g * o.to(acc)).sum(-1)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    grad_lse_a = p_a * ((g * o_a.to(acc)).sum(-1) - g_dot_o + grad_lse).to(lse_a.dtype)
    grad_lse_b = p_b * ((g * o_b.to(acc)).sum(-1) - g_dot_o + grad_lse).to(lse_b.dtype)
    grad_o_a = (p_a.unsqueeze(-1).to(acc) * g).to(o_a.dtype)
    grad_o_b = (p_b.unsqueeze(-1).to(acc) * g).to(o_b.dtype)
    return grad_o_a, grad_lse_a, grad_o_b, grad_lse_b


_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)


def merge_attention_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attention results over disjoint key sets.

    Args:
        o_a, o_b: ``[*, D]`` attention outputs of one float dtype (any strides).
        lse_a, lse_b: ``[*]`` float32 natural-log log-sum-exp of the scores behind them;
            ``-inf`` marks a state with no visible keys. (float64 states take float64 lse;
            the torch and triton backends run them, for gradient checks.)

    Returns:
        ``(o, lse)``: ``o`` ``[*, D]`` in ``o_a``'s dtype, ``lse`` ``[*]`` float32, as if
        one attention had seen both key sets. Differentiable in all four inputs.
    """
    _checks.tensor("o_a", o_a, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    _checks.tensor("o_b", o_b)
    _checks.tensor("lse_a", lse_a, dtypes=(torch.float32,) if o_a.dtype != torch.float64 else (torch.float64,))
    _checks.tensor("lse_b", lse_b, dtypes=(lse_a.dtype,))
    if o_a.dim() < 1:
        raise ValueError(f"o_a must have at least 1 dim ([*, D]), got shape {tuple(o_a.shape)}")
    _checks.same_dtype(o_a=o_a, o_b=o_b)
    _checks.same_device(o_a=o_a, lse_a=lse_a, o_b=o_b, lse_b=lse_b)
    _checks.shape("o_b", o_b, tuple(o_a.shape), what="(the shape of o_a)")
    _checks.shape("lse_a", lse_a, tuple(o_a.shape[:-1]), what="(o_a's shape without its last dim)")
    _checks.shape("lse_b", lse_b, tuple(o_a.shape[:-1]), what="(o_a's shape without its last dim)")
    return _merge_op(o_a, lse_a, o_b, lse_b)


def shared_prefix_attention(q, k_prefix, v_prefix, k_suffix, v_suffix, *, prefix_lens=None, suffix_lens=None,
                            scale=None):
    """Decode attention of N samples per prompt over the prompt's shared prefix K/V and
    each sample's own suffix K/V (DESIGN.md §4). Not built yet."""
    raise NotImplementedError(
        "fastdf.shared_prefix_attention is not built yet: it arrives with the batched proof "
        "sampling capability (issue #6, shared-prefix decode attention)"
    )

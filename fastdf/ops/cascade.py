"""Cascade attention: attention over a shared prefix and per-sample suffixes, combined by
log-sum-exp.

``merge_attention_states`` combines two partial softmax-attention results over disjoint
key sets. With ``o_x = softmax(s_x) v_x`` and ``lse_x = logsumexp(s_x)`` (natural log),
attention over the union of both key sets is

    lse = log(e^lse_a + e^lse_b),   o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b.

A state with no visible keys has lse = -inf and contributes nothing, whatever its o holds
(SDPA returns NaN for an empty row); two such states merge to o = 0, lse = -inf. A state
with lse = +inf takes all the weight (shared equally if both are +inf) and the merged lse
is +inf. A NaN lse, or a NaN o of a non-empty state, gives NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _native
from . import _alloc, _checks
from ._backend import Op
from ._eager import torch_backend_eager
from ._layout import row_layout
from .attention import check_scale
from ._library import custom_op

MERGE = Op("merge_attention_states", prefer=("cuda", "triton", "torch"))


def _merge_weights(lse_a: Tensor, lse_b: Tensor, lse: Tensor):
    """``(w_a, w_b)``, the share of each state in the merge: ``e^(lse_x - lse)``, except
    0 for both when both are empty and, when lse is +inf, 1 for the +inf states (halved
    if both are)."""
    pos_a, pos_b = torch.isposinf(lse_a), torch.isposinf(lse_b)
    inf = torch.isposinf(lse)
    shift = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # -inf: both empty, weights e^-inf = 0
    count = (pos_a.to(lse.dtype) + pos_b.to(lse.dtype)).clamp(min=1)
    w_a = torch.where(inf, pos_a.to(lse.dtype) / count, torch.exp(lse_a - shift))
    w_b = torch.where(inf, pos_b.to(lse.dtype) / count, torch.exp(lse_b - shift))
    return w_a, w_b


def _drop_empty(o: Tensor, lse: Tensor, dtype) -> Tensor:
    """o in ``dtype`` with the rows of empty states (lse = -inf) zeroed: their weight is
    exactly 0, and 0 * NaN must not poison the merge."""
    return o.to(dtype).masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0)


def merge_attention_states_reference(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor):
    """Readable torch reference (computes in fp32, or fp64 for fp64 inputs)."""
    acc = torch.float64 if o_a.dtype == torch.float64 else torch.float32
    lse = torch.logaddexp(lse_a, lse_b)
    w_a, w_b = _merge_weights(lse_a, lse_b, lse)
    out = w_a.unsqueeze(-1).to(acc) * _drop_empty(o_a, lse_a, acc) + w_b.unsqueeze(-1).to(acc) * _drop_empty(o_b, lse_b, acc)
    return out.to(o_a.dtype), lse


def _merge_finite(o_a, lse_a, o_b, lse_b):
    """The merge when both lse are finite (the common case), else None. Then
    ``e^(lse_a - lse) = sigmoid(lse_a - lse_b)``: one difference serves as the finiteness
    test (finite iff both are; an overflow to inf just takes the general path) and as the
    weights. For fp32/fp64 o the combine is one ``lerp`` (o_b + w (o_a - o_b), which torch
    evaluates as o_a - (o_a - o_b)(1 - w) for w >= 0.5: 3 passes over o, 5 dispatches in
    all); 16-bit o is promoted to fp32 by one multiply and one fused multiply-add."""
    d = lse_a - lse_b
    # One reduction and one host read: the sum is finite iff every d is (a finite sum that
    # overflows only sends the call down the general path).
    if not math.isfinite(d.sum().item()):
        return None
    lse = torch.logaddexp(lse_a, lse_b)
    if o_a.dtype == lse_a.dtype:  # fp32 o with fp32 lse, fp64 with fp64: lerp takes them as they are
        return torch.lerp(o_b, o_a, torch.sigmoid(d).unsqueeze(-1)), lse
    d = d.unsqueeze(-1)  # [*, 1]: the weights broadcast over D as they come
    w_a = torch.sigmoid(d)
    w_b = torch.sigmoid(d.neg())  # not 1 - w_a: a tiny w_b keeps its relative precision
    # o_a * w_a promotes 16-bit o to fp32 (the weights' dtype): the sum is formed in fp32
    # and rounded once. The in-place addcmul_ is fine under autograd: the product's
    # backward keeps o_a and w_a, not the product.
    out = torch.mul(o_a, w_a).addcmul_(o_b, w_b)
    return out.to(o_a.dtype), lse


@MERGE.register("torch")
def _merge_torch(o_a, lse_a, o_b, lse_b):
    fast = _merge_finite(o_a, lse_a, o_b, lse_b) if o_a.numel() else None
    return fast if fast is not None else merge_attention_states_reference(o_a, lse_a, o_b, lse_b)


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
    p_a, p_b = _merge_weights(lse_a, lse_b, lse)
    o_a_acc, o_b_acc = _drop_empty(o_a, lse_a, acc), _drop_empty(o_b, lse_b, acc)
    g = grad_o.to(acc)
    g_dot_o = (g * _drop_empty(o, lse, acc)).sum(-1)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    grad_lse_a = p_a * ((g * o_a_acc).sum(-1) - g_dot_o + grad_lse).to(lse_a.dtype)
    grad_lse_b = p_b * ((g * o_b_acc).sum(-1) - g_dot_o + grad_lse).to(lse_b.dtype)
    grad_o_a = (p_a.unsqueeze(-1).to(acc) * g).to(o_a.dtype)
    grad_o_b = (p_b.unsqueeze(-1).to(acc) * g).to(o_b.dtype)
    return grad_o_a, grad_lse_a, grad_o_b, grad_lse_b


_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)


_MERGE_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)
# The device the eager test asks about for CPU tensors: Tensor.device builds a new object
# per call (~1 us beside a 256-row merge of ~25 us).
_CPU = torch.device("cpu")


def _merge_args_ok(o_a, lse_a, o_b, lse_b) -> bool:
    """Whether the arguments pass every check of merge_attention_states, in one expression
    (~1 us instead of ~15 us for the sequence of named checks, which then runs only to
    say what is wrong; a 256-row merge on the CPU takes ~20 us in all)."""
    T = torch.Tensor
    if not (isinstance(o_a, T) and isinstance(o_b, T) and isinstance(lse_a, T) and isinstance(lse_b, T)):
        return False
    dtype, shape = o_a.dtype, o_a.shape
    if not shape or o_b.shape != shape:
        return False
    lead = shape[:-1]
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if not (dtype in _MERGE_DTYPES and o_b.dtype == dtype and lse_a.dtype == lse_dtype and lse_b.dtype == lse_dtype
            and lse_a.shape == lead and lse_b.shape == lead):
        return False
    # All on the CPU (one bool each, no device objects), else compare devices.
    if o_a.is_cpu and o_b.is_cpu and lse_a.is_cpu and lse_b.is_cpu:
        return True
    device = o_a.device
    return o_b.device == device and lse_a.device == device and lse_b.device == device


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
    if not _merge_args_ok(o_a, lse_a, o_b, lse_b):  # the checks below, one by one, name what is wrong
        _checks.tensor("o_a", o_a, dtypes=_MERGE_DTYPES)
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
    if torch_backend_eager(_CPU if o_a.is_cpu else o_a.device) and o_a.numel():
        # Finite states: fastdf._cpu's one-call merge where nothing needs a gradient, else
        # plain torch with native autograd (the same math as the custom op's backward
        # there); any -inf/+inf/NaN lse takes the custom op and its semantics.
        fast = None
        if MERGE_CPU_KERNEL and o_a.is_cpu and o_a.dtype == torch.float32 and not (
                torch.is_grad_enabled() and (o_a.requires_grad or o_b.requires_grad or lse_a.requires_grad
                                             or lse_b.requires_grad)):
            fast = _merge_cpu(o_a, lse_a, o_b, lse_b)
        if fast is None:
            fast = _merge_finite(o_a, lse_a, o_b, lse_b)
        if fast is not None:
            return fast
    return _merge_op(o_a, lse_a, o_b, lse_b)


# A merge of a few hundred rows costs more in dispatches than in work (7 torch ops on the
# lerp path, ~30 us for 256 rows against ~5 us of memory traffic): fastdf._cpu merges
# contiguous fp32 states in one call. False turns it off.
MERGE_CPU_KERNEL = True


def _merge_cpu(o_a, lse_a, o_b, lse_b):
    """``(o, lse)`` from fastdf._cpu.merge_states, or None (not built, not contiguous, or an
    lse difference that is not finite: the general path's cases)."""
    mod = _native.cpu_module()
    if mod is None or not (o_a.is_contiguous() and o_b.is_contiguous() and lse_a.is_contiguous()
                           and lse_b.is_contiguous()):
        return None
    o, lse = _alloc.empty_like(o_a), _alloc.empty_like(lse_a)
    D = o_a.shape[-1]
    if not mod.merge_states(o_a.data_ptr(), o_b.data_ptr(), lse_a.data_ptr(), lse_b.data_ptr(), o.data_ptr(),
                            lse.data_ptr(), lse_a.numel(), D, torch.get_num_threads()):
        return None
    return o, lse


# ---------------------------------------------------------------------------- shared prefix

SHARED_PREFIX = Op("shared_prefix_attention", prefer=("triton", "torch"))


def shared_prefix_attention_reference(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_suffix: Tensor,
                                      v_suffix: Tensor, prefix_lens: Tensor, suffix_lens: Tensor, scale: float):
    """Readable torch reference: one softmax over each sample's visible prefix and suffix
    keys (fp32 math, fp64 for fp64 inputs). Returns ``(o, lse)``; ``lse`` is natural-log
    float32 (float64 for fp64), ``-inf`` with ``o = 0`` where no key is visible. The
    prefix part is one batched matrix product per (prompt, KV head), as in the kernel."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    G, N, Hq, D = q.shape
    Hkv, P, S = k_prefix.shape[1], k_prefix.shape[2], k_suffix.shape[3]
    gs = Hq // Hkv
    prefix_lens = prefix_lens.to(q.device).clamp(0, P)
    suffix_lens = suffix_lens.to(q.device).clamp(0, S)
    # Keys past every length are never visible: skip them (a decode cache is mostly empty).
    P = int(prefix_lens.max()) if G else 0
    S = int(suffix_lens.max()) if G * N else 0
    k_prefix, v_prefix = k_prefix[:, :, :P], v_prefix[:, :, :P]
    k_suffix, v_suffix = k_suffix[:, :, :, :S], v_suffix[:, :, :, :S]
    qf = q.to(acc).reshape(G, N, Hkv, gs, D)
    q_rows = qf.permute(0, 2, 1, 3, 4).reshape(G, Hkv, N * gs, D)  # all samples of a prompt: one M dim
    s_p = (q_rows @ k_prefix.to(acc).transpose(-1, -2)) * scale  # [G, Hkv, N*gs, P]
    visible_p = torch.arange(P, device=q.device)[None, :] < prefix_lens[:, None]  # [G, P]
    s_p = s_p.masked_fill(~visible_p[:, None, None, :], float("-inf"))
    s_p = s_p.reshape(G, Hkv, N, gs, P).permute(0, 2, 1, 3, 4)  # [G, N, Hkv, gs, P]
    s_s = torch.einsum("gnhjd,gnhsd->gnhjs", qf, k_suffix.to(acc)) * scale
    visible_s = torch.arange(S, device=q.device) < suffix_lens[..., None]  # [G, N, S]
    s_s = s_s.masked_fill(~visible_s[:, :, None, None, :], float("-inf"))
    scores = torch.cat([s_p, s_s], -1)
    lse = torch.logsumexp(scores, -1)
    # Normalise by the max and the sum, not by exp(-lse): at |scores| ~ 1e30 lse has lost
    # log(sum) to rounding. Rows without a visible key: max -inf -> 0, so p = 0, not NaN.
    m = scores.amax(-1, keepdim=True) if scores.shape[-1] else scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    e = torch.exp(scores - torch.where(torch.isneginf(m), torch.zeros_like(m), m))
    total = e.sum(-1, keepdim=True)
    p = e / torch.where(total > 0, total, torch.ones_like(total))
    # Values behind invisible keys may be anything (an uninitialised cache): 0 * NaN is NaN.
    v_p, v_s = v_prefix.to(acc), v_suffix.to(acc)
    if not bool(visible_p.all()):
        v_p = v_p.masked_fill(~visible_p[:, None, :, None], 0)
    if not bool(visible_s.all()):
        v_s = v_s.masked_fill(~visible_s[:, :, None, :, None], 0)
    p_p = p[..., :P].permute(0, 2, 1, 3, 4).reshape(G, Hkv, N * gs, P)
    o_p = (p_p @ v_p).reshape(G, Hkv, N, gs, D).permute(0, 2, 1, 3, 4)
    o_s = torch.einsum("gnhjs,gnhsd->gnhjd", p[..., P:], v_s)
    o = (o_p + o_s).reshape(G, N, Hq, D).to(q.dtype)
    return o, lse.reshape(G, N, Hq)


@SHARED_PREFIX.register("torch")
def _shared_prefix_torch(q, k_prefix, v_prefix, k_suffix, v_suffix, prefix_lens, suffix_lens, scale):
    o, lse = shared_prefix_attention_reference(q, k_prefix, v_prefix, k_suffix, v_suffix, prefix_lens, suffix_lens,
                                               scale)
    return o, lse.to(torch.float32) if q.dtype != torch.float64 else lse


# Overrides the kernel's choice of prefix key splits (tests use it to cover split-K).
TRITON_PREFIX_SPLITS: list = [None]


def _triton_supports(q, *_):
    if q.dtype not in _checks.FLOAT_DTYPES:
        return "float64 is not compiled (use the torch backend)"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    return None


@SHARED_PREFIX.register("triton", supports=_triton_supports)
def _shared_prefix_triton(q, k_prefix, v_prefix, k_suffix, v_suffix, prefix_lens, suffix_lens, scale):
    from fastdf.kernels.cascade import shared_prefix

    G, N, Hq, D = q.shape
    o = _alloc.empty((G, N, Hq, D), dtype=q.dtype, device=q.device)
    lse = _alloc.empty((G, N, Hq), dtype=torch.float32, device=q.device)
    if o.numel():
        # the kernels read int32 lengths with unit strides; clamp before narrowing (no wrap)
        shared_prefix(q, k_prefix, v_prefix, k_suffix, v_suffix,
                      prefix_lens.clamp(0, k_prefix.shape[2]).to(torch.int32).contiguous(),
                      suffix_lens.clamp(0, k_suffix.shape[3]).to(torch.int32).contiguous(), scale, o, lse,
                      splits=TRITON_PREFIX_SPLITS[0])
    return o, lse


@custom_op(SHARED_PREFIX)
def _shared_prefix_op(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_suffix: Tensor, v_suffix: Tensor,
                      prefix_lens: Tensor, suffix_lens: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    ...


@_shared_prefix_op.register_fake
def _(q, k_prefix, v_prefix, k_suffix, v_suffix, prefix_lens, suffix_lens, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:-1], dtype=lse_dtype))


def _lengths(name, lens, shape, limit, device):
    """Lengths as a contiguous int32 tensor, clamped to ``[0, limit]`` in their own dtype
    first (an int64 2**32 + 1 must mean "all keys", not wrap to 1)."""
    if lens is None:
        return torch.full(shape, limit, dtype=torch.int32, device=device)
    _checks.tensor(name, lens, dtypes=(torch.int32, torch.int64))
    _checks.shape(name, lens, shape)
    if lens.device != device:
        raise ValueError(f"{name} is on {lens.device} but q is on {device}; put them on one device")
    return lens.clamp(0, limit).to(torch.int32).contiguous()


def shared_prefix_attention(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_suffix: Tensor, v_suffix: Tensor, *,
                            prefix_lens: Tensor | None = None, suffix_lens: Tensor | None = None,
                            scale: float | None = None, return_lse: bool = False):
    """Decode attention of N samples per prompt over the prompt's shared prefix K/V and
    each sample's own suffix K/V (one query per sample; DESIGN.md §4).

    Args:
        q: ``[G, N, Hq, D]`` (G prompts, N samples each), float32/float16/bfloat16.
        k_prefix, v_prefix: ``[G, Hkv, P, D]``, the prompts' K/V, stored once per prompt.
        k_suffix, v_suffix: ``[G, N, Hkv, S, D]``, each sample's generated tokens' K/V.
        prefix_lens: int ``[G]`` visible prefix keys per prompt (default P).
        suffix_lens: int ``[G, N]`` visible suffix keys per sample (default S).
            Lengths outside ``[0, P]`` / ``[0, S]`` (any int32/int64 value, e.g. 2**40 or
            -1) are clamped, never wrapped or read out of bounds; views of any stride work.
        scale: softmax scale, default ``D ** -0.5``; finite, > 0 and representable in
            float32 (ValueError otherwise).
        return_lse: also return the natural-log log-sum-exp ``[G, N, Hq]`` (float32).

    Returns ``[G, N, Hq, D]`` in q's dtype: each sample attends to its prompt's prefix and
    its own suffix as one softmax. ``Hq % Hkv == 0`` (GQA/MQA). A sample with no visible
    key gets zeros (lse ``-inf``). Any strides. The Triton kernel reads each prompt's
    prefix K/V once per query tile of up to 128 (N x Hq/Hkv) rows (once per group when
    N x Hq/Hkv <= 128) and runs the prefix part as a matrix product.

    Range: exact (to the 2x-torch-error rule) for any finite scaled scores, however
    large in magnitude (the prefix partials carry their running max and sum, not an
    lse), and any finite v up to the dtype's maximum (probabilities are scaled so no
    partial sum exceeds max|v|). Keys past a length are never read, so whatever an unused
    cache slot holds (NaN included) cannot reach a query.

    Decode-only: there is no backward. Inputs that require grad raise unless grad mode is
    off (use ``torch.no_grad()`` / ``torch.inference_mode()``).
    """
    _checks.tensor("q", q, ndim=4, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    G, N, Hq, D = q.shape
    _checks.tensor("k_prefix", k_prefix, ndim=4)
    _checks.tensor("v_prefix", v_prefix, ndim=4)
    _checks.tensor("k_suffix", k_suffix, ndim=5)
    _checks.tensor("v_suffix", v_suffix, ndim=5)
    _checks.same_dtype(q=q, k_prefix=k_prefix, v_prefix=v_prefix, k_suffix=k_suffix, v_suffix=v_suffix)
    device = _checks.same_device(q=q, k_prefix=k_prefix, v_prefix=v_prefix, k_suffix=k_suffix, v_suffix=v_suffix)
    Hkv, P = k_prefix.shape[1], k_prefix.shape[2]
    S = k_suffix.shape[3]
    _checks.shape("k_prefix", k_prefix, (G, None, None, D), what="([G, Hkv, P, D] with q's G and D)")
    _checks.shape("v_prefix", v_prefix, (G, Hkv, P, D), what="(the shape of k_prefix)")
    _checks.shape("k_suffix", k_suffix, (G, N, Hkv, None, D), what="([G, N, Hkv, S, D] with q's G, N, D)")
    _checks.shape("v_suffix", v_suffix, (G, N, Hkv, S, D), what="(the shape of k_suffix)")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k_prefix's KV heads ({Hkv}, dim 1), and both >= 1")
    if D == 0:
        raise ValueError(f"q must have a head dim (last dim) >= 1, got shape {tuple(q.shape)}")
    if Hq == 0:
        raise ValueError(f"q must have at least one head (dim 2), got shape {tuple(q.shape)}")
    scale = check_scale("scale", scale, D)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    prefix_lens = _lengths("prefix_lens", prefix_lens, (G,), P, device)
    suffix_lens = _lengths("suffix_lens", suffix_lens, (G, N), S, device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_prefix, v_prefix, k_suffix, v_suffix)):
        raise NotImplementedError(
            "fastdf.shared_prefix_attention is decode-only and has no backward; call it under torch.no_grad() "
            "or torch.inference_mode() (or detach the inputs)"
        )
    o, lse = _shared_prefix_op(q, k_prefix, v_prefix, k_suffix, v_suffix, prefix_lens, suffix_lens, float(scale))
    return (o, lse) if return_lse else o

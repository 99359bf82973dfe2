"""Sorting-free sampling from logits: temperature, top-k, top-p, min-p (DESIGN.md §4).

Semantics, per row of logits ``x`` (the reference below is the specification; the CUDA
kernel in ``csrc/sampling.cu`` computes the same without sorting):

1. ``temperature == 0``: the row's argmax (the first one on ties). Otherwise
   ``p_i = softmax(x / temperature)_i``.
2. top-k keeps the tokens whose logit is at least the k-th largest logit (``0`` or
   ``k >= V`` keeps all).
3. top-p keeps, of those, the smallest set of the form ``{x_i >= t}`` whose mass is at
   least ``top_p`` times the mass top-k kept (renormalised mass reaches ``top_p``).
4. min-p drops tokens with ``p_i < min_p * max_j p_j`` (computed as the logit test
   ``x_i >= max(x) + temperature * log(min_p)``).
5. The token is drawn from the kept tokens' renormalised probabilities by inverse CDF in
   vocabulary order with one uniform draw per output row.

Tie rule: every cut is a threshold on the logit, so tokens with equal logits are always
kept or dropped together; top-k or top-p may therefore keep more tokens than the
smallest set would (HF's ``TopKLogitsWarper`` keeps ties the same way).

``-inf`` logits are allowed (a banned token: probability 0). NaN and ``+inf`` are errors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _native
from . import _alloc, _checks
from ._backend import Op
from ._library import custom_op

SAMPLE = Op("sample", prefer=("cuda", "torch"))

STATUS_OK, STATUS_NON_FINITE, STATUS_NO_FINITE = 0, 1, 2

# Candidate-list capacity handed to the CUDA kernel (None: the kernel's own). Tests set
# it to 0 to force the exact whole-row path.
CUDA_CANDIDATE_CAP: list = [None]


def _distinct_rows(logits, temperature, top_k, top_p, min_p, indices):
    """(accumulation dtype, logits in it, knobs in it, inverse): the rows ``indices`` names,
    each once (``inverse`` maps the samples back; None without indices)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    knobs = [temperature.to(acc), top_k.long(), top_p.to(acc), min_p.to(acc)]
    inverse = None
    if indices is not None:
        rows, inverse = torch.unique(indices, return_inverse=True)
        x = x.index_select(0, rows)
        knobs = [t.index_select(0, rows) for t in knobs]
    return acc, x, knobs, inverse


def sample_reference(logits: Tensor, uniforms: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                     min_p: Tensor, indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Readable torch reference (sorts; fp32 math, fp64 for fp64 logits).

    All knobs are tensors with one entry per logits row; output ``i`` samples row
    ``indices[i]`` (``i`` without indices) with draw ``uniforms[i]``. Returns
    ``(ids int64, status int32)``; status 1 marks a row with NaN/+inf logits, 2 a row
    whose logits are all ``-inf``; such rows get id -1. The kept set is computed once
    per distinct row, so many samples of one row cost one sort.
    """
    acc, x, (temperature, top_k, top_p, min_p), inverse = _distinct_rows(logits, temperature, top_k, top_p, min_p,
                                                                       indices)
    vocab = x.shape[-1]
    inf = torch.tensor(float("inf"), dtype=acc, device=x.device)

    non_finite = torch.isnan(x).any(-1) | (x == inf).any(-1)
    m = x.max(-1).values
    no_finite = ~non_finite & (m == -inf)
    bad = non_finite | no_finite
    if bool(bad.any()):  # give bad rows harmless values; their ids become -1 below
        x = torch.where(bad[:, None], torch.zeros_like(x), x)
        m = torch.where(bad, torch.zeros_like(m), m)
    greedy = temperature == 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    e = torch.exp((x - m[:, None]) / t[:, None])

    # top-k: logits at least the k-th largest.
    k = torch.where((top_k <= 0) | (top_k >= vocab), torch.full_like(top_k, vocab), top_k)
    xs, order = torch.sort(x, dim=-1, descending=True)  # tie order is irrelevant: ties move together
    kth = xs.gather(-1, (k - 1)[:, None]).squeeze(-1)
    in_k = xs >= kth[:, None]
    cum = torch.cumsum(e.gather(-1, order) * in_k, -1)
    mass_k = cum[:, -1]
    # top-p: the mass of {x >= xs[j]} is the running mass at the end of xs[j]'s tie group
    # (the nearest group end at or after j: a reversed running minimum, cum being sorted).
    group_last = torch.ones_like(in_k)
    group_last[:, :-1] = xs[:, :-1] != xs[:, 1:]
    ends = torch.where(group_last, cum, torch.full_like(cum, float("inf")))
    upper = ends.flip(-1).cummin(-1).values.flip(-1)
    ok = in_k & (upper >= top_p[:, None] * mass_k[:, None])
    first = ok.to(torch.int8).argmax(-1)
    tau_p = torch.where(ok.any(-1) & (top_p < 1), xs.gather(-1, first[:, None]).squeeze(-1), -inf)
    # min-p: p_i >= min_p * p_max  <=>  x_i >= max + T log(min_p).
    tau_min = torch.where(min_p > 0, m + t * torch.log(min_p), -inf)
    tau = torch.maximum(torch.maximum(kth, tau_p), tau_min)

    status = torch.where(non_finite, STATUS_NON_FINITE, torch.where(no_finite, STATUS_NO_FINITE, STATUS_OK))
    return _draw(x, e, tau, greedy, uniforms, inverse, status)


def _draw(x: Tensor, e: Tensor, tau: Tensor, greedy: Tensor, uniforms: Tensor, inverse: Tensor | None,
          status: Tensor) -> tuple[Tensor, Tensor]:
    """Step 5 for rows with kept set ``{x >= tau}`` and weights ``e``: inverse CDF in
    vocabulary order, one uniform per output (output i reads row ``inverse[i]``), argmax
    for greedy rows, -1 where ``status`` is not OK. Returns ``(ids, status int32)``."""
    acc, vocab = x.dtype, x.shape[-1]
    w = torch.where(x >= tau[:, None], e, 0.0)
    cw = torch.cumsum(w, -1)
    if cw.device.type != "cpu":
        # A parallel cumsum need not be monotone. The CPU's runs along each row in order
        # (accumulating in float64 for float32), so its sums of w >= 0 never decrease and
        # the cummax (7x the cost of the cumsum there) would change nothing.
        cw = cw.cummax(-1).values

    if inverse is None:
        targets = uniforms.to(acc)[:, None] * cw[:, -1:]
        pick = torch.searchsorted(cw, targets, right=True).squeeze(-1)  # first j with cw[j] > target
        row_of = slice(None)
    else:
        # Group the outputs by row, padded to the largest group, for one batched search.
        by_row = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=cw.shape[0])
        slot = torch.arange(inverse.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[inverse[by_row]]
        widest = int(counts.max()) if counts.numel() else 0  # no indices: no samples
        targets = torch.zeros(cw.shape[0], widest, dtype=acc, device=x.device)
        targets[inverse[by_row], slot] = uniforms.to(acc)[by_row] * cw[inverse[by_row], -1]
        found = torch.searchsorted(cw, targets, right=True)
        pick = torch.empty_like(inverse)
        pick[by_row] = found[inverse[by_row], slot]
        row_of = inverse
    over = pick >= vocab  # a target at the row's total (rounding): the last token with weight
    if bool(over.any()):
        last = torch.where(w > 0, torch.arange(vocab, device=x.device), -1).amax(-1)
        pick = torch.where(over, last[row_of], pick)
    ids = torch.where(greedy[row_of], x.argmax(-1)[row_of], pick) if bool(greedy.any()) else pick
    status = status[row_of]
    ids = torch.where(status != STATUS_OK, torch.full_like(ids, -1), ids)
    return ids, status.to(torch.int32)


# Candidates the sorting-free path selects first (the largest logits of each row); grown
# 8x while a row's threshold is not decided inside them.
TORCH_CANDIDATES = 64


def _thresholds_from_candidates(x, e, k, top_p, count):
    """``(kth, tau_p, decided)`` from the ``count`` largest logits of each row, or None for
    a row (``decided`` False) whose cut is not inside them.

    ``torch.topk`` returns the first ``count`` values of the reference's descending sort
    (ties may come in another order, but tied logits have equal weights, so every running
    sum below is the reference's, bit for bit: the same values added in the same order).
    Only positions whose tie group ends inside the candidates are trusted."""
    vocab = x.shape[-1]
    vals, idx = torch.topk(x, count, -1)
    everything = count == vocab
    cuts_k = k < vocab
    kth = vals.gather(-1, (k.clamp(max=count) - 1)[:, None]).squeeze(-1)
    kth = torch.where(cuts_k, kth, torch.full_like(kth, float("-inf")))
    # A position is known when its tie group ends inside the candidates.
    known = torch.ones_like(vals, dtype=torch.bool) if everything else vals > vals[:, -1:]
    in_k = vals >= kth[:, None]
    cum = torch.cumsum(e.gather(-1, idx) * in_k, -1)
    # The mass top-k keeps: the running sum at its last position when that is known (the
    # reference's cum[-1], exactly); without a top-k cut, the whole row's sum (in float64,
    # so it rounds to the reference's sequential sum but at a rounding tie).
    k_known = everything | ~cuts_k | ~in_k[:, -1]
    mass_k = torch.where(cuts_k | everything, cum[:, -1], e.sum(-1, dtype=torch.float64).to(e.dtype))
    group_last = torch.ones_like(known)
    group_last[:, :-1] = vals[:, :-1] != vals[:, 1:]
    group_last[:, -1] = everything
    ends = torch.where(group_last, cum, torch.full_like(cum, float("inf")))
    upper = ends.flip(-1).cummin(-1).values.flip(-1)
    ok = known & in_k & (upper >= top_p[:, None] * mass_k[:, None])
    found = ok.any(-1)
    tau_p = vals.gather(-1, ok.to(torch.int8).argmax(-1)[:, None]).squeeze(-1)
    tau_p = torch.where(found & (top_p < 1), tau_p, torch.full_like(tau_p, float("-inf")))
    # With every logit a candidate this is the reference's computation: always decided
    # (also for knob tensors that check_nan=False let through, e.g. a NaN top_p).
    decided = torch.ones_like(found) if everything else k_known & (found | (top_p >= 1))
    return kth, tau_p, decided


def _sample_sort_free(logits, uniforms, temperature, top_k, top_p, min_p, indices):
    """The reference's draws without sorting the vocabulary (the CPU's torch backend), or
    None for inputs it leaves to the reference (a row with NaN/+inf logits or none finite).

    Steps as in :func:`sample_reference` (same operations, so the same weights and the same
    inverse-CDF draw), but the top-k and top-p thresholds come from the largest
    ``TORCH_CANDIDATES`` logits of each row (``torch.topk``, O(V)), 8x more while a row's
    cut is not inside them: an LLM's top-p head is a few dozen tokens of 32k-150k."""
    acc, x, (temperature, top_k, top_p, min_p), inverse = _distinct_rows(logits, temperature, top_k, top_p, min_p,
                                                                       indices)
    vocab = x.shape[-1]
    m = x.amax(-1)  # NaN wins amax, so one pass finds NaN, +inf and all -inf rows
    if not bool(torch.isfinite(m).all()):
        return None
    greedy = temperature == 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    e = torch.sub(x, m[:, None]).div_(t[:, None]).exp_()  # the reference's e, in one buffer
    k = torch.where((top_k <= 0) | (top_k >= vocab), torch.full_like(top_k, vocab), top_k)
    inf = torch.tensor(float("-inf"), dtype=acc, device=x.device)
    kth = torch.full_like(m, float("-inf"))
    tau_p = torch.full_like(m, float("-inf"))
    todo = (k < vocab) | (top_p < 1)
    count = min(max(TORCH_CANDIDATES, int(torch.where(k < vocab, k, 0).max()) if x.shape[0] else 0), vocab)
    while x.shape[0] and bool(todo.any()):
        if bool(todo.all()):  # the first round, usually: no row copies
            rows, sub = torch.arange(x.shape[0], device=x.device), (x, e, k, top_p)
        else:
            rows = todo.nonzero()[:, 0]
            sub = (x[rows], e[rows], k[rows], top_p[rows])
        got_k, got_p, decided = _thresholds_from_candidates(*sub, count)
        done = rows[decided]
        kth[done], tau_p[done] = got_k[decided], got_p[decided]
        todo[done] = False
        count = min(count * 8, vocab)
    tau_min = torch.where(min_p > 0, m + t * torch.log(min_p), inf)
    tau = torch.maximum(torch.maximum(kth, tau_p), tau_min)
    status = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    return _draw(x, e, tau, greedy, uniforms, inverse, status)


@SAMPLE.register("torch")
def _sample_torch(logits, uniforms, indices, temperature, top_k, top_p, min_p, temperature_value, top_k_value,
                  top_p_value, min_p_value):
    rows, device = logits.shape[0], logits.device

    def full(given, value, dtype):
        return given if given is not None else torch.full((rows,), value, dtype=dtype, device=device)

    knobs = (full(temperature, temperature_value, torch.float32), full(top_k, top_k_value, torch.int64),
             full(top_p, top_p_value, torch.float32), full(min_p, min_p_value, torch.float32))
    if uniforms.numel():
        fast = _sample_sort_free(logits, uniforms, *knobs, indices)
        if fast is not None:
            return fast
    return sample_reference(logits, uniforms, *knobs, indices)


def _cuda_supports(logits, *_):
    return None if logits.dtype in _native.DTYPE_CODES else "float64 logits are not compiled (use the torch backend)"


@SAMPLE.register("cuda", supports=_cuda_supports)
def _sample_cuda(logits, uniforms, indices, temperature, top_k, top_p, min_p, temperature_value, top_k_value,
                 top_p_value, min_p_value):
    n = uniforms.numel()
    out = _alloc.empty((n,), dtype=torch.int64, device=logits.device)
    status = _alloc.empty((n,), dtype=torch.int32, device=logits.device)
    if n:
        cap = CUDA_CANDIDATE_CAP[0]
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        _native.module().sample_from_logits(
            logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), logits.stride(1),
            _native.dtype_code(logits), uniforms.data_ptr(), ptr(indices), n, ptr(temperature), ptr(top_k),
            ptr(top_p), ptr(min_p), temperature_value, top_k_value, top_p_value, min_p_value, out.data_ptr(),
            status.data_ptr(), -1 if cap is None else cap, _native.stream(logits), logits.device.index,
        )
    return out, status


@custom_op(SAMPLE)
def _sample_op(logits: Tensor, uniforms: Tensor, indices: Optional[Tensor], temperature: Optional[Tensor],
               top_k: Optional[Tensor], top_p: Optional[Tensor], min_p: Optional[Tensor], temperature_value: float,
               top_k_value: int, top_p_value: float, min_p_value: float) -> tuple[Tensor, Tensor]:
    ...


@_sample_op.register_fake
def _(logits, uniforms, indices, temperature, top_k, top_p, min_p, *scalars):
    n = uniforms.shape[0]
    return logits.new_empty((n,), dtype=torch.int64), logits.new_empty((n,), dtype=torch.int32)


def _knob(name, value, rows, device, *, integer, low, high, low_open=False, check):
    """(tensor or None, scalar) for one knob; tensors are cast to the kernel's dtype.

    Scalars are always checked (float knobs: finite and representable in float32, the
    dtype the kernels compute in). Tensor values are checked when ``check`` (one sync)."""
    if isinstance(value, torch.Tensor):
        if integer:
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got {str(value.dtype).removeprefix('torch.')}")
        elif not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {str(value.dtype).removeprefix('torch.')}")
        _checks.shape(name, value, (rows,), what="(one entry per logits row)")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but logits is on {device}; put them on one device")
        if integer:
            # top_k is read as int64; larger values than V just mean "no cut".
            value = _checks.index_tensor(name, value, dtypes=_checks.INT_DTYPES, low=low if check else None,
                                         high=None, cast=torch.int64)
            return value, 0
        if check:
            _checks.finite_values(name, value, low=low, high=high, low_open=low_open)
        return value.to(torch.float32).contiguous(), 0.0
    if integer:
        return None, _checks.number(name, value, low=low, high=high, low_open=low_open, integer=True)
    return None, _checks.finite_float(name, value, low=low, high=high, low_open=low_open)


_BELOW_ONE = float(torch.tensor(1.0).nextafter(torch.tensor(0.0)))  # the largest float32 below 1


def _check_uniforms(uniforms, n, generator, logits, check):
    """sample's ``uniforms`` checked (float32 [n] on logits' device, not with a generator)
    and ready for the kernels: contiguous; values in [0, 1) checked (one sync) or clamped."""
    if generator is not None:
        raise ValueError("pass generator or uniforms, not both")
    _checks.tensor("uniforms", uniforms, ndim=1, dtypes=(torch.float32,))
    _checks.shape("uniforms", uniforms, (n,), what="(one draw per output: logits' rows, or len(indices))")
    _checks.same_device(logits=logits, uniforms=uniforms)
    if not check:
        return torch.nan_to_num(uniforms, nan=0.0).clamp_(0.0, _BELOW_ONE)
    if n and not bool(((uniforms >= 0) & (uniforms < 1)).all()):  # NaN fails both comparisons
        bad = uniforms[~((uniforms >= 0) & (uniforms < 1))]
        raise ValueError(f"uniforms must lie in [0, 1), got {bad[:4].tolist()}{'...' if bad.numel() > 4 else ''}")
    return uniforms.contiguous()


def sample(logits: Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
           generator: torch.Generator | None = None, indices: Tensor | None = None, check_nan: bool = True,
           uniforms: Tensor | None = None) -> Tensor:
    """Sample one token id per row of ``logits`` without sorting the vocabulary.

    Args:
        logits: ``[B, V]`` float32/float16/bfloat16 (float64 on the torch backend); any
            strides. ``-inf`` bans a token.
        temperature: ``>= 0`` (0 = argmax for that row). A Python number or a ``[B]`` tensor.
            Float knobs must be finite and representable in float32 (NaN, inf or 1e300
            raise ValueError; for tensors when ``check_nan``).
        top_k: ``>= 0`` (0 or ``>= V`` = no cut). Number or ``[B]`` integer tensor.
        top_p: in ``(0, 1]`` (1 = no cut). Number or ``[B]`` tensor.
        min_p: in ``[0, 1]`` (0 = no cut). Number or ``[B]`` tensor.
        generator: a ``torch.Generator`` for reproducible draws: one uniform per output is
            drawn from it with ``torch.rand`` (on the generator's device), so a seeded
            generator gives the same tokens on every run of the same backend. It must live
            on the CPU or on logits' device (ValueError otherwise).
        indices: optional int64 ``[N]``: output ``i`` samples row ``indices[i]`` (many
            samples of one shared row, e.g. the first token of k proofs of one prompt);
            knobs stay per logits row. The output then has ``N`` entries (``N = 0``: an
            empty result).
        check_nan: ``True`` (default) checks values on the host (one device sync): NaN or
            ``+inf`` logits, rows with no finite logit, knob tensors out of range and
            indices out of range raise ``ValueError``. ``False`` skips the checks (no sync,
            no graph break under ``torch.compile``): a row with NaN/``+inf`` logits or none
            finite then yields id ``-1``, and bad knob tensors or indices are undefined
            behaviour.
        uniforms: optional float32 ``[N]`` (N = rows, or ``len(indices)``) on logits'
            device: the draw of each output, in ``[0, 1)``, instead of ``torch.rand``
            (counter-based or replayed draws; the same uniforms give the same tokens on
            every backend up to ties of rounding). Not with ``generator``. Values outside
            ``[0, 1)`` or NaN raise ``ValueError`` when ``check_nan``; without the check they
            are clamped into ``[0, 1)`` (NaN as 0), so every draw stays a kept token.

    Returns:
        int64 ``[B]`` (or ``[N]``) token ids. See the module docstring for the exact order
        of the cuts and the tie rule.
    """
    _checks.tensor("logits", logits, ndim=2, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits must have a non-empty vocabulary (last dim), got shape (B, 0)")
    if not isinstance(check_nan, bool):
        raise TypeError(f"check_nan must be a bool, got {type(check_nan).__name__}")
    device = logits.device
    temperature, t_v = _knob("temperature", temperature, rows, device, integer=False, low=0, high=None,
                             check=check_nan)
    top_k, k_v = _knob("top_k", top_k, rows, device, integer=True, low=0, high=None, check=check_nan)
    top_p, p_v = _knob("top_p", top_p, rows, device, integer=False, low=0, high=1, low_open=True, check=check_nan)
    min_p, mp_v = _knob("min_p", min_p, rows, device, integer=False, low=0, high=1, check=check_nan)
    k_v = min(k_v, vocab)  # larger means all of V; keeps the value inside int64
    n = rows
    if indices is not None:
        _checks.tensor("indices", indices, ndim=1, dtypes=(torch.int64,))
        _checks.same_device(logits=logits, indices=indices)
        # The kernel reads indices as a flat array (a [::2] view is copied); rows of logits.
        indices = _checks.index_tensor("indices", indices, dtypes=(torch.int64,), low=0 if check_nan else None,
                                       high=rows if check_nan else None)
        n = indices.shape[0]
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        # The draws are made on the generator's device, then moved: only the CPU or logits'
        # own device make sense (a generator on another GPU would be a silent cross-device copy).
        if generator.device.type != "cpu" and generator.device != device:
            raise ValueError(f"generator is on {generator.device} but logits is on {device}; "
                             f"use a generator on {device} or on the CPU")
    if uniforms is None:
        gen_device = generator.device if generator is not None else device
        uniforms = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    else:
        uniforms = _check_uniforms(uniforms, n, generator, logits, check_nan)
    ids, status = _sample_op(logits, uniforms, indices, temperature, top_k, top_p, min_p, float(t_v), int(k_v),
                             float(p_v), float(mp_v))
    if check_nan and n:
        bad = status != STATUS_OK
        if bool(bad.any()):
            parts = []
            for code, what in ((STATUS_NON_FINITE, "contain NaN or +inf"),
                               (STATUS_NO_FINITE, "have no finite value (all -inf)")):
                where = (status == code).nonzero()[:, 0]
                if where.numel():
                    row_ids = (indices[where] if indices is not None else where).unique().tolist()
                    parts.append(f"logits rows {row_ids[:8]}{'...' if len(row_ids) > 8 else ''} {what}")
            raise ValueError("; ".join(parts))
    return ids

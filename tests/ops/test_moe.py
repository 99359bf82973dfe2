"""Routing, combine and moe_experts against their references, every backend."""

import pytest
import torch

import fastdf
from fastdf.ops import moe as moe_ops
from fastdf.ops.moe import (moe_combine, moe_combine_reference, moe_experts_reference, moe_gather, moe_gather_reference,
                            moe_route, moe_route_reference)
from fastdf.testing import assert_matches_reference, poisoned

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _routing(T, K, E, device, *, seed=0, skew=False):
    g = torch.Generator().manual_seed(seed)
    if skew:  # most tokens pick the first experts; some experts get nothing
        ids = torch.stack([torch.randperm(min(E, K + 1), generator=g)[:K] for _ in range(T)])
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g) + 0.1
    return ids.to(device), weights.to(device)


def _layer(T, H, I, E, K, dtype, device, *, seed=0, skew=False):
    g = torch.Generator().manual_seed(seed + 100)
    hidden = torch.randn(T, H, generator=g).to(device, dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(device, dtype)
    down = (torch.randn(E, H, I, generator=g) * I**-0.5).to(device, dtype)
    ids, weights = _routing(T, K, E, device, seed=seed, skew=skew)
    return hidden, ids, weights.to(dtype), gate_up, down


# ---------------------------------------------------------------------------- routing

def _check_routing(ids, E, order, inverse, offs):
    T, K = ids.shape
    flat = ids.reshape(-1).cpu()
    order, inverse, offs = order.cpu().long(), inverse.cpu().long().reshape(-1), offs.cpu().long()
    n = flat.numel()
    assert torch.equal(order[inverse], torch.arange(n)) and torch.equal(inverse[order], torch.arange(n))
    valid = (flat >= 0) & (flat < E)
    counts = torch.bincount(flat[valid], minlength=E)
    assert torch.equal(offs, counts.cumsum(0))
    start = 0
    for e in range(E):  # each expert's pairs, in pair order (stable)
        want = torch.nonzero(flat == e).flatten()
        assert torch.equal(order[start:offs[e]], want)
        start = int(offs[e])
    assert torch.equal(order[start:], torch.nonzero(~valid).flatten()), "out-of-range ids sort to the tail"


@pytest.mark.parametrize("T,K,E", [(1, 1, 1), (13, 3, 6), (200, 8, 17), (0, 2, 4)])
def test_route_reference_round_trip(T, K, E):
    ids, _ = _routing(T, K, E, "cpu") if T else (torch.zeros(0, K, dtype=torch.long), None)
    _check_routing(ids, E, *moe_route_reference(ids, E))


def test_route_tail_and_int32():
    ids, _ = _routing(20, 4, 9, "cpu")
    ids[3, 1] = 9
    ids[7, 0] = -1
    _check_routing(ids, 9, *moe_route(ids.int(), 9))


def test_route_is_deterministic():
    ids, _ = _routing(300, 6, 64, "cpu", skew=True)
    a = moe_route(ids, 64)
    b = moe_route(ids.clone(), 64)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("T,K,E", [(1, 1, 1), (517, 6, 64), (4096, 8, 128), (3000, 2, 8), (70000, 8, 256)])
def test_route_cuda_matches_torch(T, K, E):
    ids, _ = _routing(T, K, E, "cpu")
    if T > 10:
        ids[::97, 0] = E + 3  # out of range: the tail
    ids = ids.cuda()
    with fastdf.backend("cuda"), poisoned():
        got = moe_route(ids, E)
        again = moe_route(ids.int(), E)
    want = moe_route_reference(ids, E)
    for g, a, w in zip(got, again, want):
        assert torch.equal(g, w) and torch.equal(a, w)
    _check_routing(ids, E, *got)


@pytest.mark.gpu
def test_gather_cuda():
    x = torch.randn(50, 33, device="cuda", dtype=torch.bfloat16)[:, ::1]
    rows = torch.randint(0, 50, (120,), device="cuda", dtype=torch.int32)
    with fastdf.backend("cuda"):
        got = moe_ops._gather_op(x, rows, rows.view(60, 2))
    assert torch.equal(got, x[rows.long()])


# ---------------------------------------------------------------------------- combine

@pytest.mark.op("moe_combine")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_combine_matches_reference(backend, device, dtype, weighted):
    ids, weights = _routing(19, 3, 5, device)
    order, inverse, offs = moe_route_reference(ids, 5)
    y = torch.randn(57, 300, device=device).to(dtype)[:, ::2]  # strided rows
    w = weights.to(dtype) if weighted else None
    with poisoned():
        out = moe_combine(y, inverse, w)
    assert_matches_reference(out, moe_combine_reference, y, inverse, w)
    again = moe_combine(y, inverse, w)
    assert torch.equal(out, again), "combine must be deterministic"


def test_combine_and_gather_gradients():
    ids, weights = _routing(7, 2, 4, "cpu")
    order, inverse, offs = moe_route_reference(ids, 4)
    y = torch.randn(14, 5, dtype=torch.float64, requires_grad=True)
    w = weights.double().requires_grad_()
    torch.autograd.gradcheck(lambda y, w: moe_combine(y, inverse, w), (y, w))
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: moe_gather(x, order, inverse), (x,))


def test_gather_rows_and_bad_input():
    """moe_gather reads x[order // K] (the reference), its gradient sums each token's K
    copies (so combine(gather(x)) = K x), and every argument is checked before any work."""
    ids, _ = _routing(6, 3, 5, "cpu", seed=3)
    order, inverse, _ = moe_route(ids, 5)
    x = torch.randn(6, 4)
    rows = moe_gather(x, order, inverse)
    assert torch.equal(rows, moe_gather_reference(x, torch.div(order, 3, rounding_mode="floor")))
    assert torch.equal(rows, x[order.long() // 3])
    torch.testing.assert_close(moe_combine(rows, inverse), 3 * x)
    assert moe_gather(x, order[:0], inverse[:, :0]).shape == (0, 4)  # K = 0: no rows
    for args, match in [((x[0], order, inverse), "x"), ((x, order[:-1], inverse), "order"),
                        ((x, order + 100, inverse), "order"), ((x, order.float(), inverse), "order"),
                        ((x, order, inverse.long()), "inverse"), ((x, order, inverse[:-1]), "inverse"),
                        ((x, order, -inverse), "inverse"), ((x.long(), order, inverse), "x")]:
        with pytest.raises(ValueError, match=match):
            moe_gather(*args)
    with pytest.raises(TypeError, match="order"):
        moe_gather(x, order.tolist(), inverse)


# ---------------------------------------------------------------------------- moe_experts

def _run(fn, hidden, ids, weights, gate_up, down, grad, trainable=None, **kw):
    """Output and gradients (hidden, weights, then the trainable or the full weights)."""
    hidden = hidden.detach().requires_grad_()
    weights = weights.detach().requires_grad_()
    if trainable is None:
        gate_up, down = gate_up.detach().requires_grad_(), down.detach().requires_grad_()
        params = (gate_up, down)
    else:
        tids = trainable
        tgu = gate_up[tids].detach().clone().mul_(1.01).requires_grad_()
        tdn = down[tids].detach().clone().mul_(0.99).requires_grad_()
        kw.update(trainable_ids=tids, trainable_gate_up=tgu, trainable_down=tdn)
        gate_up, down = gate_up.detach().requires_grad_(), down.detach().requires_grad_()
        params = (tgu, tdn)
    out = fn(hidden, ids, weights, gate_up, down, **kw)
    grads = torch.autograd.grad((out * grad).sum(), (hidden, weights, *params))
    if trainable is not None:
        assert gate_up.grad is None and down.grad is None
    return (out, *grads)


@pytest.mark.op("moe_experts")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trainable", [None, [4, 1]], ids=["full", "esft"])
def test_moe_matches_reference(backend, device, dtype, trainable):
    hidden, ids, weights, gate_up, down = _layer(13, 24, 20, 6, 3, dtype, device, skew=trainable is not None)
    tids = torch.tensor(trainable, device=device) if trainable else None
    grad = torch.randn(13, 24, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    with poisoned():
        got = _run(fastdf.moe_experts, hidden, ids, weights, gate_up, down, grad, tids)
    assert_matches_reference(got, _run, moe_experts_reference, hidden, ids, weights, gate_up, down, grad, tids)


@pytest.mark.op("moe_experts")
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", torch.nn.functional.softplus])
def test_moe_activations(backend, device, act):
    """Fused activations and, for any other callable, the unfused composite path."""
    hidden, ids, weights, gate_up, down = _layer(9, 16, 12, 5, 2, torch.float32, device, seed=2)
    grad = torch.randn(9, 16, generator=torch.Generator().manual_seed(4)).to(device)
    got = _run(fastdf.moe_experts, hidden, ids, weights, gate_up, down, grad, torch.tensor([2], device=device), act=act)
    assert_matches_reference(got, _run, moe_experts_reference, hidden, ids, weights, gate_up, down, grad,
                             torch.tensor([2], device=device), act=act)


@pytest.mark.op("moe_experts")
def test_moe_frozen_layer_skips_weight_gradients(backend, device):
    """All experts frozen, input needs grad (an ESFT layer above the lowest trainable one)."""
    hidden, ids, weights, gate_up, down = _layer(11, 16, 12, 4, 2, torch.float32, device, seed=3)
    hidden.requires_grad_()
    out = fastdf.moe_experts(hidden, ids, weights, gate_up, down)
    (g,) = torch.autograd.grad(out.square().sum(), hidden)
    h = hidden.detach().requires_grad_()
    (want,) = torch.autograd.grad(moe_experts_reference(h, ids, weights, gate_up, down).square().sum(), h)
    torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4)
    assert gate_up.grad is None and down.grad is None


def test_moe_gradcheck_float64():
    hidden, ids, weights, gate_up, down = _layer(6, 5, 3, 4, 2, torch.float64, "cpu")
    tids = torch.tensor([3, 0])
    tgu, tdn = gate_up[tids].clone().requires_grad_(), down[tids].clone().requires_grad_()
    args = (hidden.requires_grad_(), weights.requires_grad_(), tgu, tdn)
    torch.autograd.gradcheck(lambda h, w, a, b: fastdf.moe_experts(h, ids, w, gate_up, down, trainable_ids=tids,
                                                                   trainable_gate_up=a, trainable_down=b), args)


def test_moe_saves_h1_only_when_needed():
    hidden, ids, weights, gate_up, down = _layer(6, 8, 4, 3, 2, torch.float32, "cpu")
    with torch.no_grad():
        out = torch.ops.fastdf.moe_experts(hidden, ids, weights, gate_up, down, None, None, None, 0, False)
    assert out[1].numel() == 0
    assert torch.equal(out[0], fastdf.moe_experts(hidden, ids, weights, gate_up, down))


def test_moe_opcheck():
    hidden, ids, weights, gate_up, down = _layer(7, 8, 4, 3, 2, torch.float32, "cpu")
    tids = torch.tensor([1])
    tgu, tdn = gate_up[tids].clone(), down[tids].clone()
    torch.library.opcheck(torch.ops.fastdf.moe_experts, (hidden, ids, weights, gate_up, down, None, None, None, 0, True))
    torch.library.opcheck(torch.ops.fastdf.moe_experts, (hidden.requires_grad_(), ids, weights.requires_grad_(), gate_up,
                                                         down, tids, tgu.requires_grad_(), tdn.requires_grad_(), 0, True))
    out, h1, order, inverse, offs = torch.ops.fastdf.moe_experts(hidden, ids, weights, gate_up, down, tids, tgu, tdn, 0,
                                                                 True)
    torch.library.opcheck(torch.ops.fastdf.moe_experts_backward,
                          (torch.randn_like(out), hidden.detach(), weights.detach(), gate_up, down, tids, tgu.detach(),
                           tdn.detach(), h1.detach(), order, inverse, offs, 0, True, True, True, True))
    torch.library.opcheck(torch.ops.fastdf.moe_route, (ids, 3))
    torch.library.opcheck(torch.ops.fastdf.moe_combine, (torch.randn(14, 8, requires_grad=True), inverse,
                                                         weights.detach().requires_grad_()))
    torch.library.opcheck(torch.ops.fastdf.moe_gather, (torch.randn(7, 8, requires_grad=True), order // 2, inverse))


def test_moe_compiles_fullgraph():
    hidden, ids, weights, gate_up, down = _layer(9, 8, 6, 4, 2, torch.float32, "cpu")
    tids = torch.tensor([0, 3])
    tgu, tdn = gate_up[tids].clone().requires_grad_(), down[tids].clone().requires_grad_()
    weights.requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(h, w, a, b):
        return fastdf.moe_experts(h * 2, ids, w.softmax(-1), gate_up, down, trainable_ids=tids, trainable_gate_up=a,
                                  trainable_down=b).sum()

    f(hidden, weights, tgu, tdn).backward()
    refs = [t.detach().requires_grad_() for t in (weights, tgu, tdn)]
    moe_experts_reference(hidden * 2, ids, refs[0].softmax(-1), gate_up, down, trainable_ids=tids,
                          trainable_gate_up=refs[1], trainable_down=refs[2]).sum().backward()
    for got, ref in zip((weights, tgu, tdn), refs):
        torch.testing.assert_close(got.grad, ref.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda a: {**a, "topk_ids": a["topk_ids"] + 4}, ValueError, r"topk_ids must lie in \[0, 4\)"),
        (lambda a: {**a, "topk_ids": a["topk_ids"].float()}, ValueError, "topk_ids must be one of int64, int32"),
        (lambda a: {**a, "topk_ids": a["topk_ids"][:3]}, ValueError, "topk_ids must have shape"),
        (lambda a: {**a, "topk_weights": a["topk_weights"][:, :1]}, ValueError, "topk_weights must have shape"),
        (lambda a: {**a, "hidden": a["hidden"][None]}, ValueError, "hidden must have 2 dims"),
        (lambda a: {**a, "gate_up": a["gate_up"][:, :, :5]}, ValueError, "gate_up must have shape"),
        (lambda a: {**a, "gate_up": a["gate_up"][:, :7]}, ValueError, r"gate_up must have shape \[E, 2I, H\]"),
        (lambda a: {**a, "down": a["down"][:3]}, ValueError, "down must have shape"),
        (lambda a: {**a, "down": a["down"].double()}, ValueError, "down has dtype float64"),
        (lambda a: {**a, "act": "tanh"}, ValueError, "act must be one of"),
        (lambda a: {**a, "act": 3}, TypeError, "act must be a str or a callable"),
        (lambda a: {**a, "trainable_ids": torch.tensor([1, 5])}, ValueError, r"trainable_ids must lie in \[0, 4\)"),
        (lambda a: {**a, "trainable_ids": torch.tensor([1, 1])}, ValueError, "trainable_ids must be unique"),
        (lambda a: {**a, "trainable_gate_up": None}, ValueError, "trainable_ids needs trainable_gate_up"),
        (lambda a: {**a, "trainable_down": a["trainable_down"][:, :3]}, ValueError, "trainable_down must have shape"),
        (lambda a: {**a, "trainable_ids": None}, ValueError, "trainable_gate_up needs trainable_ids"),
    ],
)
def test_moe_bad_input(mutate, error, match):
    hidden, ids, weights, gate_up, down = _layer(6, 8, 4, 4, 2, torch.float32, "cpu")
    tids = torch.tensor([1, 2])
    args = dict(hidden=hidden, topk_ids=ids, topk_weights=weights, gate_up=gate_up, down=down, act="silu",
                trainable_ids=tids, trainable_gate_up=gate_up[tids].clone(), trainable_down=down[tids].clone())
    args = mutate(args)
    with pytest.raises(error, match=match):
        fastdf.moe_experts(args.pop("hidden"), args.pop("topk_ids"), args.pop("topk_weights"), args.pop("gate_up"),
                           args.pop("down"), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("skew", [False, True])
def test_moe_gpu_bf16_large(backend_name, skew):
    """DeepSeek-V2-Lite layer at 1k tokens in bf16, ESFT subset: against the fp32 torch path."""
    hidden, ids, weights, gate_up, down = _layer(1024, 2048, 1408, 64, 6, torch.bfloat16, "cuda", skew=skew)
    tids = torch.tensor([0, 3, 17, 40, 63], device="cuda")
    grad = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
    with fastdf.backend(backend_name):
        got = _run(fastdf.moe_experts, hidden, ids, weights, gate_up, down, grad, tids)
    with fastdf.backend("torch"):
        want = _run(fastdf.moe_experts, *(t.float() if t.is_floating_point() else t for t in
                                         (hidden, ids, weights, gate_up, down, grad)), tids)
    for g, w in zip(got, want):
        scale = w.abs().max().item()
        assert (g.float() - w).abs().max().item() <= 3e-2 * scale + 1e-3


def test_cuda_extension_exports_routing():
    """CI compiles csrc/moe.cu (FASTDF_FORCE_CUDA=1): the bindings exist and agree with Python."""
    import os

    from fastdf import _native

    try:
        ext = _native.module()
    except ImportError as err:
        if os.environ.get("FASTDF_FORCE_CUDA") == "1":
            pytest.fail(f"fastdf._C does not import: {err}")
        pytest.skip(f"fastdf._C not built: {err}")
    assert ext.moe_route_chunk == moe_ops._ROUTE_CHUNK
    assert all(callable(getattr(ext, name)) for name in ("moe_route", "moe_gather", "moe_combine"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            ext.moe_route(0, False, 4, 2, 0, 0, 0, 0, 0, 0)


# ---------------------------------------------------------------------------- hardening (issue 9)

def _spread_cols(t, fill):
    """``t`` [T, K] as a non-contiguous view (every other column of a wider tensor of junk)."""
    big = torch.full((t.shape[0], 2 * t.shape[1]), fill, dtype=t.dtype, device=t.device)
    big[:, ::2] = t
    view = big[:, ::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def _out_and_grads(fn, hidden, ids, weights, gate_up, down, grad, **kw):
    """Output and gradients wrt hidden, weights, gate_up, down (zeros where unused)."""
    leaves = [t.detach().requires_grad_() for t in (hidden, weights, gate_up, down)]
    out = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3], **kw)
    if out.requires_grad:
        got = torch.autograd.grad((out * grad).sum(), leaves, allow_unused=True)
    else:  # the reference's output with no (token, slot) pair is a constant
        got = [None] * 4
    return [out] + [torch.zeros_like(t) if g is None else g for g, t in zip(got, leaves)]


@pytest.mark.op("moe_experts")
@pytest.mark.parametrize("act", ["silu", torch.nn.functional.softplus], ids=["fused", "composite"])
def test_moe_index_tensors_as_views(backend, device, act):
    """topk_ids and trainable_ids given as strided views (the kernels read them as flat
    arrays): the same output and gradients as contiguous copies."""
    hidden, ids, weights, gate_up, down = _layer(9, 16, 8, 5, 2, torch.float32, device, seed=4)
    grad = torch.randn(9, 16, generator=torch.Generator().manual_seed(8)).to(device)
    tids = torch.tensor([4, 0], device=device)
    tids_view = torch.tensor([4, 7, 0, 7], device=device)[::2]
    got = _run(fastdf.moe_experts, hidden, _spread_cols(ids, 3), weights, gate_up, down, grad, tids_view, act=act)
    want = _run(moe_experts_reference, hidden, ids, weights, gate_up, down, grad, tids, act=act)
    for a, b, name in zip(got, want, ("out", "d_hidden", "d_weights", "d_gate_up", "d_down")):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.op("moe_experts")
@pytest.mark.parametrize("T,H,I,K,act", [
    (5, 8, 4, 0, "silu"), (5, 8, 4, 0, torch.nn.functional.softplus), (0, 8, 4, 2, "silu"), (5, 0, 4, 2, "silu"),
    (5, 8, 0, 2, "silu"),
], ids=["K0", "K0-composite", "T0", "H0", "I0"])
def test_moe_zero_sized_dims(backend, device, T, H, I, K, act):
    """No slots, tokens, hidden or intermediate width: the reference's result (zeros of the
    right shape) and gradients on every backend, never an IndexError."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(T, H, generator=g).to(device)
    gate_up = (torch.randn(4, 2 * I, H, generator=g) * 0.3).to(device)
    down = (torch.randn(4, H, I, generator=g) * 0.3).to(device)
    ids, weights = _routing(max(T, 1), max(K, 1), 4, device)
    ids, weights = ids[:T, :K], weights[:T, :K]
    grad = torch.randn(T, H, generator=g).to(device)
    with poisoned():
        got = _out_and_grads(fastdf.moe_experts, hidden, ids, weights, gate_up, down, grad, act=act)
    want = _out_and_grads(moe_experts_reference, hidden, ids, weights, gate_up, down, grad, act=act)
    assert got[0].shape == (T, H)
    for a, b, name in zip(got, want, ("out", "d_hidden", "d_weights", "d_gate_up", "d_down")):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.op("moe_experts")
@pytest.mark.parametrize("act", ["silu", torch.nn.functional.softplus], ids=["fused", "composite"])
@pytest.mark.parametrize("bad,error,match", [
    (lambda ids: ids.masked_fill(ids == 1, -1), ValueError, r"topk_ids must lie in \[0, 4\)"),
    (lambda ids: ids.masked_fill(ids == 1, 4), ValueError, r"topk_ids must lie in \[0, 4\)"),
    (lambda ids: ids.masked_fill(ids == 1, 2**40), ValueError, r"topk_ids must lie in \[0, 4\)"),
    (lambda ids: ids.float(), ValueError, "topk_ids must be one of int64, int32"),
    (lambda ids: ids.bool(), ValueError, "topk_ids must be one of int64, int32"),
    (lambda ids: ids.tolist(), TypeError, "topk_ids must be a torch.Tensor"),
])
def test_moe_bad_ids_same_on_every_backend(backend, device, act, bad, error, match):
    hidden, ids, weights, gate_up, down = _layer(6, 8, 4, 4, 2, torch.float32, device)
    with pytest.raises(error, match=match):
        fastdf.moe_experts(hidden, bad(ids), weights, gate_up, down, act=act)
    tids = torch.tensor([0, 1], device=device)
    with pytest.raises(ValueError, match="trainable_ids must be one of int64"):
        fastdf.moe_experts(hidden, ids, weights, gate_up, down, act=act, trainable_ids=tids.float(),
                           trainable_gate_up=gate_up[:2], trainable_down=down[:2])


@pytest.mark.op("moe_combine")
def test_combine_edge_cases(backend, device):
    """K = 0 gives zeros; a strided inverse reads the right rows; an inverse past y or
    integer weights are refused (the kernels would read out of bounds)."""
    y = torch.randn(8, 5, device=device)
    out = moe_combine(y, torch.zeros(3, 0, dtype=torch.int32, device=device))
    assert out.shape == (3, 5) and not out.any()
    inverse = torch.tensor([[0, 7], [3, 1], [5, 5]], dtype=torch.int32, device=device)
    weights = torch.rand(3, 2, device=device)
    with poisoned():
        got = moe_combine(y, _spread_cols(inverse, 2), _spread_cols(weights, float("nan")))
    torch.testing.assert_close(got, moe_combine_reference(y, inverse, weights))
    for bad in (8, -1):
        with pytest.raises(ValueError, match=r"inverse must lie in \[0, 8\)"):
            moe_combine(y, inverse.masked_fill(inverse == 3, bad), weights)
    with pytest.raises(ValueError, match="weights must be one of"):
        moe_combine(y, inverse, weights.long())
    with pytest.raises(ValueError, match="inverse must be one of int32"):
        moe_combine(y, inverse.float())


def test_route_bounds_and_views():
    ids, _ = _routing(7, 3, 5, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(moe_route(_spread_cols(ids, 9), 5), moe_route_reference(ids, 5)))
    with pytest.raises(ValueError, match="num_experts must be <= 2147483647"):
        moe_route(ids, 2**31)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        moe_route(ids, True)
    with pytest.raises(ValueError, match="topk_ids must be one of int64, int32"):
        moe_route(ids.bool(), 5)


def test_more_pairs_than_int32_are_refused_without_a_copy():
    """2**31 (token, slot) pairs as expanded views (no memory): refused before anything
    materialises them (the routing numbers pairs in int32)."""
    T = 2**31
    ids = torch.zeros(1, 1, dtype=torch.long).expand(T, 1)
    with pytest.raises(ValueError, match="topk_ids has 2147483648 .token, slot. pairs"):
        moe_route(ids, 4)
    hidden, _, _, gate_up, down = _layer(1, 8, 4, 4, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match="topk_ids has 2147483648"):
        fastdf.moe_experts(hidden.expand(T, 8), ids, torch.ones(1, 1).expand(T, 1), gate_up, down)

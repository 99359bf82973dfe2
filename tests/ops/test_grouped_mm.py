"""grouped_mm against a float64 loop over experts, every backend: forward, dX, dW (all
experts or only the trainable ones), empty groups, tail rows, strided weights, odd sizes."""

import pytest
import torch

import fastdf
from fastdf.ops.grouped_mm import grouped_mm_reference
from fastdf.testing import assert_matches_reference, poisoned

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]

# (S, K, N, offs): empty groups (first, middle, last), tail rows past offs[-1], odd K/N.
CASES = [
    (40, 24, 20, [3, 3, 17, 30, 36]),
    (33, 19, 37, [0, 10, 10, 33]),
    (21, 16, 8, [5, 21, 21]),
    (9, 40, 3, [0, 0, 0]),
]


def _inputs(S, K, N, offs, dtype, device, *, hf_layout=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, K, generator=g).to(device, dtype)
    E = len(offs)
    if hf_layout:  # HF stores [E, N, K]; grouped_mm reads its transpose without a copy
        w = torch.randn(E, N, K, generator=g).to(device, dtype).transpose(1, 2)
    else:
        w = torch.randn(E, K, N, generator=g).to(device, dtype)
    return x, w, torch.tensor(offs, dtype=torch.int32, device=device)


@pytest.mark.op("grouped_mm")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"S{c[0]}K{c[1]}N{c[2]}")
def test_forward_matches_reference(backend, device, dtype, case):
    x, w, offs = _inputs(*case, dtype, device)
    with poisoned():
        out = fastdf.grouped_mm(x, w, offs)
    assert out.shape == (case[0], case[2]) and out.dtype == dtype
    assert torch.equal(out[case[3][-1]:], torch.zeros_like(out[case[3][-1]:])), "tail rows must be zero"
    assert_matches_reference(out, grouped_mm_reference, x, w, offs)


@pytest.mark.op("grouped_mm")
def test_forward_strided_views(backend, device):
    """x a column slice of a wider buffer, w a strided slice of a bigger weight (no stride 1)."""
    x_full, w_full, offs = _inputs(30, 48, 40, [4, 4, 19, 27], torch.float32, device, hf_layout=False)
    x = x_full[:, ::2]
    w = w_full[:, 1::2, ::2]  # [E, 24, 20]
    assert not x.is_contiguous() and w.stride(-1) != 1 and w.stride(-2) != 1
    with poisoned():
        out = fastdf.grouped_mm(x, w, offs)
    assert_matches_reference(out, grouped_mm_reference, x, w, offs)


def _grads(x, w, offs, grad, tw=None, tids=None):
    """Gradients of <out, grad> via autograd through the reference."""
    x = x.detach().requires_grad_()
    if tw is None:
        w = w.detach().requires_grad_()
        out = grouped_mm_reference(x, w, offs)
        return torch.autograd.grad((out * grad).sum(), (x, w))
    tw = tw.detach().requires_grad_()
    out = grouped_mm_reference(x, w, offs, trainable_w=tw, trainable_ids=tids)
    return torch.autograd.grad((out * grad).sum(), (x, tw))


@pytest.mark.op("grouped_mm")
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_all_experts(backend, device, dtype):
    x, w, offs = _inputs(40, 24, 20, [3, 3, 17, 30, 36], dtype, device)
    x.requires_grad_()
    w = w.detach().requires_grad_()  # non-leaf transposed view -> a leaf with the same strides
    out = fastdf.grouped_mm(x, w, offs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    with poisoned():
        out.backward(grad)
    assert w.grad.shape == w.shape
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1])), "an empty group's dW is zero"
    assert_matches_reference((x.grad, w.grad), _grads, x, w, offs, grad)


@pytest.mark.op("grouped_mm")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tw_layout", ["like_w", "other"])
def test_backward_trainable_subset(backend, device, dtype, tw_layout):
    """dW only for trainable experts, into the compact gradient; w gets none. trainable_w
    laid out like w (as ESFT makes it) or not (the kernel's two weight paths)."""
    x, w, offs = _inputs(40, 24, 20, [3, 3, 17, 30, 36], dtype, device)
    w = w.detach().requires_grad_()  # requires grad, yet must not get one
    tids = torch.tensor([3, 1, 0], device=device)
    g = torch.Generator().manual_seed(5)
    if tw_layout == "like_w":  # HF layout [E_t, N, K] transposed, like w
        tw = torch.randn(3, 20, 24, generator=g).to(device, dtype).transpose(1, 2).detach().requires_grad_()
        assert tw.stride()[1:] == w.stride()[1:]
    else:
        tw = torch.randn(3, 24, 20, generator=g).to(device, dtype).requires_grad_()
        assert tw.stride()[1:] != w.stride()[1:]
    x.requires_grad_()
    out = fastdf.grouped_mm(x, w, offs, trainable_w=tw, trainable_ids=tids)
    assert_matches_reference(out, grouped_mm_reference, x, w, offs, trainable_w=tw, trainable_ids=tids)
    grad = torch.randn(out.shape, generator=g).to(device, dtype)
    with poisoned():
        out.backward(grad)
    assert w.grad is None
    assert torch.equal(tw.grad[1], torch.zeros_like(tw.grad[1])), "expert 1 has no rows"
    assert_matches_reference((x.grad, tw.grad), _grads, x, w, offs, grad, tw, tids)


@pytest.mark.op("grouped_mm")
def test_backward_weights_only(backend, device):
    """x frozen: only dW runs; w frozen: only dX runs."""
    x, w, offs = _inputs(21, 16, 8, [5, 21, 21], torch.float32, device)
    tids = torch.tensor([2], device=device)
    tw = w[2:3].detach().clone().requires_grad_()
    out = fastdf.grouped_mm(x, w, offs, trainable_w=tw, trainable_ids=tids)
    out.sum().backward()
    assert torch.equal(tw.grad, torch.zeros_like(tw.grad)), "expert 2 has no rows"
    xg = x.detach().requires_grad_()
    fastdf.grouped_mm(xg, w, offs).sum().backward()
    ref = _grads(x, w, offs, torch.ones(21, 8, device=device))[0]
    torch.testing.assert_close(xg.grad, ref)


def test_gradcheck_float64():
    x, w, offs = _inputs(11, 5, 4, [2, 2, 9], torch.float64, "cpu")
    tids = torch.tensor([0, 2])
    tw = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    x.requires_grad_()
    torch.autograd.gradcheck(lambda x, tw: fastdf.grouped_mm(x, w, offs, trainable_w=tw, trainable_ids=tids), (x, tw))
    w = w.detach().requires_grad_()
    torch.autograd.gradcheck(lambda x, w: fastdf.grouped_mm(x, w, offs), (x, w))


def test_opcheck():
    x, w, offs = _inputs(13, 6, 5, [2, 2, 9], torch.float32, "cpu")
    tids = torch.tensor([2, 0])
    tw = torch.randn(2, 6, 5)
    torch.library.opcheck(torch.ops.fastdf.grouped_mm, (x, w, offs, None, None))
    torch.library.opcheck(torch.ops.fastdf.grouped_mm, (x.requires_grad_(), w, offs, tw.requires_grad_(), tids))
    torch.library.opcheck(torch.ops.fastdf.grouped_mm_backward, (torch.randn(13, 5), x.detach(), w, offs, tw.detach(),
                                                                  tids, True, True))


def test_compiles_fullgraph():
    x, w, offs = _inputs(13, 6, 5, [2, 2, 9], torch.float32, "cpu")
    tids = torch.tensor([1])
    tw = torch.randn(1, 6, 5, requires_grad=True)
    x.requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, tw):
        return fastdf.grouped_mm(x * 2, w, offs, trainable_w=tw, trainable_ids=tids).relu().sum()

    f(x, tw).backward()
    xr, twr = x.detach().requires_grad_(), tw.detach().requires_grad_()
    grouped_mm_reference(xr * 2, w, offs, trainable_w=twr, trainable_ids=tids).relu().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(tw.grad, twr.grad)


def _bad(x, w, offs, **kw):
    return fastdf.grouped_mm(x, w, offs, **kw)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda x, w, o: (x, w, torch.tensor([5, 3, 10], dtype=torch.int32)), ValueError, "offs must be non-decreasing"),
        (lambda x, w, o: (x, w, torch.tensor([5, 9, 14], dtype=torch.int32)), ValueError, r"offs\[-1\] must be <="),
        (lambda x, w, o: (x, w, torch.tensor([-1, 9, 10], dtype=torch.int32)), ValueError, "offs must be non-negative"),
        (lambda x, w, o: (x, w, o.long()), ValueError, "offs must be one of int32"),
        (lambda x, w, o: (x, w, o[:2]), ValueError, "offs must have shape"),
        (lambda x, w, o: (x[None], w, o), ValueError, "x must have 2 dims"),
        (lambda x, w, o: (x, w[0], o), ValueError, "w must have 3 dims"),
        (lambda x, w, o: (x, w[:, :4], o), ValueError, "w must have shape .E, K, N. with K"),
        (lambda x, w, o: (x, w.half(), o), ValueError, "w has dtype float16 but x has float32"),
        (lambda x, w, o: (x.int(), w, o), ValueError, "x must be one of"),
        (lambda x, w, o: (x.tolist(), w, o), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input(mutate, error, match):
    x, w, offs = _inputs(12, 6, 5, [2, 2, 9], torch.float32, "cpu")
    with pytest.raises(error, match=match):
        _bad(*mutate(x, w, offs))


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(trainable_ids=torch.tensor([0, 3])), ValueError, r"trainable_ids must lie in \[0, 3\)"),
        (dict(trainable_ids=torch.tensor([1, 1])), ValueError, "trainable_ids must be unique"),
        (dict(trainable_ids=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "trainable_ids must be one of int64"),
        (dict(trainable_w=None, trainable_ids=torch.tensor([0, 1])), ValueError, "trainable_ids needs trainable_w"),
        (dict(trainable_ids=None), ValueError, "trainable_w needs trainable_ids"),
        (dict(trainable_w=torch.randn(2, 5, 5), trainable_ids=torch.tensor([0, 1])), ValueError,
         "trainable_w must have shape"),
        (dict(trainable_w=torch.randn(2, 6, 5).double(), trainable_ids=torch.tensor([0, 1])), ValueError,
         "trainable_w has dtype float64"),
    ],
)
def test_bad_trainable(kw, error, match):
    x, w, offs = _inputs(12, 6, 5, [2, 2, 9], torch.float32, "cpu")
    args = dict(trainable_w=torch.randn(2, 6, 5))
    args.update(kw)
    with pytest.raises(error, match=match):
        fastdf.grouped_mm(x, w, offs, **args)


@pytest.mark.gpu
@pytest.mark.parametrize("skewed", [False, True])
def test_gpu_large_bf16(skewed):
    """DeepSeek-V2-Lite gate_up at 2k tokens, bf16, uniform and skewed groups; ESFT subset."""
    torch.manual_seed(0)
    E, K, N, S = 64, 2048, 2816, 2048 * 6
    counts = torch.full((E,), S // E)
    if skewed:
        counts = torch.zeros(E, dtype=torch.long)
        counts[:4] = S // 4
    offs = counts.cumsum(0).int().cuda()
    x = torch.randn(S, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) * 0.02).transpose(1, 2)
    tids = torch.tensor([0, 5, 63], device="cuda")
    tw = w[tids].detach().clone().requires_grad_()
    x.requires_grad_()
    out = fastdf.grouped_mm(x, w, offs, trainable_w=tw, trainable_ids=tids)
    ref = torch._grouped_mm(x.detach(), w, offs=offs) if hasattr(torch, "_grouped_mm") else None
    if ref is not None:
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(out)
    out.backward(grad)
    bounds = [0] + offs.tolist()
    for j, e in enumerate(tids.tolist()):
        s, t = bounds[e], bounds[e + 1]
        want = x.detach()[s:t].float().T @ grad[s:t].float()
        torch.testing.assert_close(tw.grad[j].float(), want, atol=0.5, rtol=2e-2)


def test_kernels_compile_for_hopper_and_ampere():
    """The real (non-interpreted) compile of the GEMM/MoE kernels for sm_90 and sm_80, on this
    CPU machine: every variant compiles, the GEMMs' K loops are pipelined with async copies
    onto wgmma (Hopper) / mma v2 (Ampere), the TMA-descriptor variants with asynchronous TMA
    copies, and shared memory fits the card."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.ops._aot_compile"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    limits = {90: 227 * 1024, 80: 163 * 1024}
    for name, info in report.items():
        arch = int(name.rsplit("@sm", 1)[1])
        assert info["smem"] <= limits[arch], f"{name}: {info['smem']} bytes of shared memory"
        if name.startswith(("fwd", "dx", "dw")):
            assert info["async_copies"] > 0, f"{name}: K loop not pipelined"
            assert info["mma_versions"] == [3 if arch == 90 else 2], f"{name}: {info}"
            assert (info["wgmma"] > 0) == (arch == 90), f"{name}: {info}"
        if name.startswith("tma_"):  # descriptor variants: TMA loads, pipelined onto wgmma
            assert info["load_kind"].startswith("TMA") and info["tma_async"] > 0, f"{name}: {info}"
            assert info["wgmma"] > 0, f"{name}: {info}"


# ---------------------------------------------------------------------------- hardening (issue 9)

def _spread(t, fill):
    """``t`` as a non-contiguous [::2] view of a bigger tensor whose other entries are junk."""
    big = torch.full((2 * t.numel(),), fill, dtype=t.dtype, device=t.device)
    big[::2] = t
    view = big[::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


@pytest.mark.op("grouped_mm")
@pytest.mark.parametrize("trainable", [False, True])
def test_index_tensors_as_views(backend, device, trainable):
    """offs and trainable_ids given as strided views (kernels index them as flat arrays):
    same rows, dX and dW as with contiguous copies."""
    x, w, offs = _inputs(30, 16, 12, [4, 4, 17, 25], torch.float32, device, hf_layout=False)
    tids = torch.tensor([3, 0], device=device)
    tw = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(5)).to(device)
    grad = torch.randn(30, 12, generator=torch.Generator().manual_seed(6)).to(device)
    kw_view = dict(trainable_w=tw, trainable_ids=_spread(tids, 1)) if trainable else {}
    kw_ref = dict(trainable_w=tw, trainable_ids=tids) if trainable else {}

    def run(offs_, kw, fn):
        xs = x.detach().requires_grad_()
        ws = (kw["trainable_w"] if trainable else w).detach().requires_grad_()
        kw = dict(kw, trainable_w=ws) if trainable else kw
        out = fn(xs, ws if not trainable else w, offs_, **kw)
        return (out, *torch.autograd.grad((out * grad).sum(), (xs, ws)))

    got = run(_spread(offs, 9), kw_view, fastdf.grouped_mm)
    want = run(offs, kw_ref, grouped_mm_reference)
    for a, b, name in zip(got, want, ("out", "dx", "dw")):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.op("grouped_mm")
@pytest.mark.parametrize("S,K,N,offs,trainable", [
    (0, 4, 5, [0, 0], False), (6, 0, 5, [2, 6], False), (6, 4, 0, [2, 6], False), (6, 4, 5, [2, 6], True),
], ids=["S0", "K0", "N0", "no-trainable-experts"])
def test_zero_sized_dims(backend, device, S, K, N, offs, trainable):
    """S, K, N or E_t of 0: the reference's empty/zero result and gradients on every backend."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(S, K, generator=g).to(device).requires_grad_()
    w = torch.randn(len(offs), K, N, generator=g).to(device).requires_grad_()
    offs = torch.tensor(offs, dtype=torch.int32, device=device)
    kw = {}
    if trainable:  # an empty trainable set: every expert uses w, no weight gradient at all
        kw = dict(trainable_w=torch.zeros(0, K, N, device=device, requires_grad=True),
                  trainable_ids=torch.zeros(0, dtype=torch.long, device=device))
    leaves = (x, kw["trainable_w"] if trainable else w)
    grad = torch.randn(S, N, generator=g).to(device)

    def grads(fn):
        out = fn(x, w, offs, **kw)
        got = torch.autograd.grad((out * grad).sum(), leaves, allow_unused=True)
        return [out] + [torch.zeros_like(t) if d is None else d for d, t in zip(got, leaves)]

    with poisoned():
        got = grads(fastdf.grouped_mm)
    want = grads(grouped_mm_reference)
    assert got[0].shape == (S, N) and got[1].shape == x.shape and got[2].shape == leaves[1].shape
    for a, b, name in zip(got, want, ("out", "dx", "dw")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kw,error,match", [
    (dict(offs=torch.tensor([2.0, 2.0, 9.0])), ValueError, "offs must be one of int32"),
    (dict(offs=torch.tensor([True, True, True])), ValueError, "offs must be one of int32"),
    (dict(trainable_ids=torch.tensor([0.0, 1.0])), ValueError, "trainable_ids must be one of int64"),
    (dict(trainable_ids=torch.tensor([True, False])), ValueError, "trainable_ids must be one of int64"),
    (dict(trainable_ids=[0, 1]), TypeError, "trainable_ids must be a torch.Tensor"),
])
@pytest.mark.op("grouped_mm")
def test_bad_index_dtypes(backend, device, kw, error, match):
    """Float/bool/list ids are refused before any kernel, on every backend."""
    x, w, offs = _inputs(12, 6, 5, [2, 2, 9], torch.float32, device)
    args = dict(offs=offs)
    if "trainable_ids" in kw:
        args["trainable_w"] = torch.randn(2, 6, 5, device=device)
    args.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    with pytest.raises(error, match=match):
        fastdf.grouped_mm(x, w, args.pop("offs"), **args)

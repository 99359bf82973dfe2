"""fastdf._cpu's pieces of moe_experts' eager CPU backward (csrc/cpu/moe.cpp): the SwiGLU
gradient against the float64 formula by the rule and against torch's silu_backward where
values are not finite; the routed gradient rows (gather, weight: torch's bits; the dot
with h2 by the rule); every tail width and thread count; and the backward taking them (and
its torch fallback, moe.CPU_KERNELS = False) held to the reference."""

import unittest.mock

import pytest
import torch

import fastdf
from fastdf import _native
from fastdf.ops import moe
from fastdf.testing import assert_close_by_rule, assert_matches_reference

pytestmark = pytest.mark.skipif(_native.cpu_module() is None, reason="needs fastdf._cpu (an AVX-512 CPU)")


def _kernel(dd, h1, threads=1):
    dh1 = torch.full_like(h1, float("nan"))  # every element must be written
    _native.cpu_module().swiglu_backward(dd.data_ptr(), h1.data_ptr(), dh1.data_ptr(), h1.shape[0], dd.shape[1],
                                         threads)
    return dh1


def _formula(dd, h1):
    """torch's SiLU gradient written out: [dd up silu'(gate) | dd silu(gate)]."""
    gate, up = h1.chunk(2, dim=-1)
    s = torch.sigmoid(gate)
    return torch.cat([dd * up * (s * (1 + gate * (1 - s))), dd * (gate * s)], dim=-1)


def _torch_fp32(dd, h1):
    gate, up = h1.chunk(2, dim=-1)
    return torch.cat([torch.ops.aten.silu_backward(dd * up, gate), dd * torch.nn.functional.silu(gate)], dim=-1)


@pytest.mark.parametrize("S,I", [(1, 1), (7, 10), (33, 16), (64, 40), (300, 256)])
@pytest.mark.parametrize("spread", [1.0, 12.0, 60.0])
@pytest.mark.parametrize("threads", [1, 2])
def test_swiglu_backward_within_the_rule(S, I, spread, threads):
    g = torch.Generator().manual_seed(S * I)
    dd = torch.randn(S, I, generator=g)
    h1 = torch.randn(S, 2 * I, generator=g)
    h1[:, :I] *= spread  # saturated sigmoids at the larger spreads, both signs
    got = _kernel(dd, h1, threads)
    assert_close_by_rule(got, _formula(dd.double(), h1.double()), _torch_fp32(dd, h1), name="dh1")
    assert torch.equal(got, _kernel(dd, h1, 1)), "the thread count changed the bits"


def test_swiglu_backward_special_values_as_torch():
    """Non-finite and extreme gates give what torch's silu_backward and silu give (NaN for
    -inf and NaN, 0 where the sigmoid saturates to 0), and tiny gates stay exact."""
    gates = [float("inf"), float("-inf"), float("nan"), 1e30, -1e30, 200.0, -200.0, 104.5, -104.5, 88.8, -88.8,
             87.0, -87.0, 30.0, -30.0, 1e-40, -1e-40, 0.0, -0.0, 1e-7]
    I = len(gates)
    dd = torch.linspace(-2, 2, I).reshape(1, I).repeat(3, 1)
    h1 = torch.empty(3, 2 * I)
    h1[:, :I] = torch.tensor(gates)
    h1[:, I:] = torch.linspace(-1, 3, I)
    got, want = _kernel(dd, h1), _torch_fp32(dd, h1)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("S,T,H", [(1, 1, 1), (9, 5, 12), (64, 40, 16), (300, 150, 130)])
@pytest.mark.parametrize("threads", [1, 2])
def test_routed_grad_rows(S, T, H, threads):
    g = torch.Generator().manual_seed(S + H)
    grad, h2 = torch.randn(T, H, generator=g) * 3, torch.randn(S, H, generator=g)
    tok, w = torch.randint(0, T, (S,), generator=g), torch.rand(S, generator=g)
    gw, dw = torch.full((S, H), float("nan")), torch.full((S,), float("nan"))
    _native.cpu_module().routed_grad(grad.data_ptr(), tok.data_ptr(), w.data_ptr(), h2.data_ptr(), gw.data_ptr(),
                                     dw.data_ptr(), S, H, threads)
    rows = grad.index_select(0, tok)
    assert torch.equal(gw, rows * w[:, None])  # one product per element: torch's bits
    assert_close_by_rule(dw, torch.linalg.vecdot(rows.double(), h2.double()), torch.linalg.vecdot(rows, h2), name="dw")
    gw2 = torch.full((S, H), float("nan"))  # no dw wanted: gw alone
    _native.cpu_module().routed_grad(grad.data_ptr(), tok.data_ptr(), w.data_ptr(), h2.data_ptr(), gw2.data_ptr(), 0,
                                     S, H, threads)
    assert torch.equal(gw2, gw)


def test_moe_backward_uses_the_kernels_and_its_fallback_agrees():
    """fp32 SiLU experts: the eager backward calls each kernel once; with fastdf._cpu
    unavailable it runs torch's passes. Both held to the reference by the rule."""
    T, K, E, H, I = 29, 2, 4, 12, 24
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    gate_up = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    down = torch.randn(E, H, I, generator=g) * I**-0.5
    grad = torch.randn(T, H, generator=g)
    module = _native.cpu_module()
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(module, name)

        def swiglu_backward(self, *args):
            calls.append("swiglu")
            return module.swiglu_backward(*args)

        def routed_grad(self, *args):
            calls.append("routed")
            return module.routed_grad(*args)

    def run(hidden, ids, weights, gate_up, down, grad, fn=fastdf.moe_experts):
        h, w = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
        gu, dn = torch.nn.Parameter(gate_up.clone()), torch.nn.Parameter(down.clone())
        fn(h, ids, w, gu, dn).backward(grad)
        return h.grad, w.grad, gu.grad, dn.grad

    def reference(*args):
        return run(*args, fn=lambda h, ids, w, gu, dn: moe.moe_experts_reference(h, ids, w, gu, dn))

    with unittest.mock.patch.object(_native, "cpu_module", lambda: Spy()):
        fast = run(hidden, ids, weights, gate_up, down, grad)
    assert sorted(calls) == ["routed", "swiglu"]
    with unittest.mock.patch.object(_native, "cpu_module", lambda: None):
        fallback = run(hidden, ids, weights, gate_up, down, grad)
    with unittest.mock.patch.object(moe, "CPU_KERNELS", False), \
            unittest.mock.patch.object(_native, "cpu_module", lambda: Spy()):
        switched_off = run(hidden, ids, weights, gate_up, down, grad)
    assert sorted(calls) == ["routed", "swiglu"]
    assert all(torch.equal(a, b) for a, b in zip(fallback, switched_off))
    for result in (fast, fallback):
        assert_matches_reference(result, reference, hidden, ids, weights, gate_up, down, grad)

"""fastdf._cpu's AdaLN kernels (csrc/cpu/adaln.cpp), the torch backend's fp32 CPU route of
adaln_modulate and gated_residual: results and every gradient against the fp64 reference by
the 2x rule (odd C for the masked tails, one frame, one token a frame, frames of several
row chunks, chunk views of one modulation tensor, subsets of wanted gradients), the same
bits for 1 and 2 threads, what takes the kernels and what does not, and the binding's
refusals. The other adaln tests run through these kernels as well (fp32 CPU is their
default route)."""

import pytest
import torch

import fastdf
from fastdf import _native
from fastdf.ops import adaln
from fastdf.ops.adaln import adaln_modulate_reference, gated_residual_reference
from fastdf.testing import assert_matches_reference, poisoned

pytestmark = pytest.mark.skipif(_native.cpu_module() is None, reason=str(_native.cpu_unavailable_reason()))

# (B, T, F, C): odd C (tails of 1-15 lanes), one frame, per-token, S = 150 (3 row chunks of
# the frame sums), C above one vector group, S = 72 (a chunk of 64 and one of 8)
SHAPES = [(2, 12, 3, 40), (1, 9, 1, 7), (2, 8, 8, 33), (1, 300, 2, 33), (2, 6, 3, 272), (1, 144, 2, 16)]


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernels' calls (and turns the route on)."""
    seen = []
    mod = _native.cpu_module()

    class Counting:
        def __getattr__(self, name):
            fn = getattr(mod, name)
            return lambda *a: seen.append(name) or fn(*a)

    monkeypatch.setattr(adaln, "CPU_KERNEL", True)
    monkeypatch.setattr(_native, "cpu_module", lambda: Counting())
    return seen


def _modulate_inputs(shape, *, affine, seed=0, views=False):
    B, T, F, C = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g) * 2 + 0.5
    if views:  # shift / scale as chunk(2, -1) of one [B, F, 2C] tensor, as DiT blocks make them
        shift, scale = torch.randn(B, F, 2 * C, generator=g).chunk(2, -1)
    else:
        shift, scale = (torch.randn(B, F, C, generator=g) for _ in range(2))
    weight = 1 + 0.3 * torch.randn(C, generator=g) if affine else None
    bias = torch.randn(C, generator=g) if affine else None
    return x, shift, scale, weight, bias


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_modulate_matches_the_reference(calls, shape, affine, norm):
    x, shift, scale, weight, bias = _modulate_inputs(shape, affine=affine, views=shape[3] % 2 == 0)
    leaves = [t.requires_grad_() for t in (x, shift, scale, weight, bias) if t is not None]
    g_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    with poisoned():
        y = fastdf.adaln_modulate(x, shift, scale, norm=norm, weight=weight, bias=bias)
        grads = torch.autograd.grad((y * g_y).sum(), leaves)
    assert calls == ["modulate_forward", "modulate_backward"]

    def ref(x, shift, scale, *affine_and_g):
        w, b = affine_and_g[:-1] if affine else (None, None)
        return adaln_modulate_reference(x, shift, scale, norm=norm, weight=w, bias=b)

    assert_matches_reference(y, lambda *a: ref(*a, None), *leaves)

    def ref_grads(*inputs):
        inputs, g = [t.detach().requires_grad_() for t in inputs[:-1]], inputs[-1]
        return torch.autograd.grad((ref(*inputs, g) * g.to(inputs[0].dtype)).sum(), inputs)

    assert_matches_reference(grads, ref_grads, *leaves, g_y)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_matches_the_reference(calls, shape):
    B, T, F, C = shape
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(B, T, C, generator=g).requires_grad_() for _ in range(2))
    gate = torch.randn(B, F, 3 * C, generator=g)[..., C:2 * C].requires_grad_()  # a chunk view
    g_out = torch.randn(B, T, C, generator=g)
    with poisoned():
        out = fastdf.gated_residual(x, y, gate)
        grads = torch.autograd.grad((out * g_out).sum(), (x, y, gate))
    # one token per frame runs PyTorch's own ops (see test_gated_one_token_per_frame_is_pytorch_s_own)
    assert calls == ([] if F == T else ["gated_forward", "gated_backward"])
    assert_matches_reference(out, gated_residual_reference, x, y, gate)

    def ref_grads(x, y, gate, g):
        inputs = [t.detach().requires_grad_() for t in (x, y, gate)]
        return torch.autograd.grad((gated_residual_reference(*inputs) * g.to(inputs[0].dtype)).sum(), inputs)

    assert_matches_reference(grads, ref_grads, x, y, gate, g_out)


def test_gated_one_token_per_frame_is_pytorch_s_own(calls):
    """A gate per token is plain elementwise work: one addcmul without autograd, eager's
    two native nodes with it (bitwise ``x + gate * y``; the kernel's Python node cost more
    than its fused pass saved), and the kernel where a frame holds more tokens."""
    g = torch.Generator().manual_seed(8)
    x, y, gate = (torch.randn(2, 24, 40, generator=g) for _ in range(3))
    assert torch.equal(fastdf.gated_residual(x, y, gate), torch.addcmul(x, gate, y))
    leaves = [t.clone().requires_grad_() for t in (x, y, gate)]
    out = fastdf.gated_residual(*leaves)
    assert type(out.grad_fn).__name__ == "AddBackward0" and torch.equal(out, x + gate * y)
    assert calls == []
    fastdf.gated_residual(x, y, gate[:, :12])  # two tokens a frame: the kernel
    assert calls == ["gated_forward"]


def test_gated_one_token_per_frame_needs_no_kernel(monkeypatch):
    """The per-token route is PyTorch's own ops, so it holds where fastdf._cpu is off (or
    not built for this CPU); under vmap or a fake-tensor mode the op's own paths run."""
    from fastdf.ops import adaln as AD
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(AD, "CPU_KERNEL", False)
    g = torch.Generator().manual_seed(9)
    x, y, gate = (torch.randn(2, 24, 40, generator=g) for _ in range(3))
    assert torch.equal(fastdf.gated_residual(x, y, gate), torch.addcmul(x, gate, y))
    out = fastdf.gated_residual(*(t.clone().requires_grad_() for t in (x, y, gate)))
    assert type(out.grad_fn).__name__ == "AddBackward0"
    batched = torch.func.vmap(fastdf.gated_residual)(x[None], y[None], gate[None])
    torch.testing.assert_close(batched[0], x + gate * y)
    with FakeTensorMode() as mode:
        fake = fastdf.gated_residual(*(mode.from_tensor(t) for t in (x, y, gate)))
    assert fake.shape == x.shape


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (1, 2), (3,), (0, 4)])
def test_modulate_computes_only_the_wanted_gradients(calls, wanted):
    """Each subset of inputs needing a gradient gets exactly those, equal to the full run's."""
    x, shift, scale, weight, bias = _modulate_inputs((2, 130, 2, 24), affine=True, seed=4)
    inputs = (x, shift, scale, weight, bias)
    g_y = torch.randn(x.shape)
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fastdf.adaln_modulate(*leaves[:3], weight=leaves[3], bias=leaves[4])
    full = torch.autograd.grad((y * g_y).sum(), leaves)
    part = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    with poisoned():
        y = fastdf.adaln_modulate(*part[:3], weight=part[3], bias=part[4])
        got = torch.autograd.grad((y * g_y).sum(), [part[i] for i in wanted])
    for i, g in zip(wanted, got):
        assert torch.equal(g, full[i]), i


def test_gated_computes_only_the_wanted_gradients(calls):
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(2, 12, 20, generator=g) for _ in range(2))
    gate = torch.randn(2, 3, 20, generator=g)
    g_out = torch.randn(2, 12, 20, generator=g)
    for wanted in ((0,), (1,), (2,), (0, 2)):
        part = [t.detach().requires_grad_(i in wanted) for i, t in enumerate((x, y, gate))]
        with poisoned():
            got = torch.autograd.grad((fastdf.gated_residual(*part) * g_out).sum(), [part[i] for i in wanted])
        want = {0: g_out, 1: g_out * gate.repeat_interleave(4, 1),
                2: (g_out * y).reshape(2, 3, 4, 20).sum(2)}
        for i, t in zip(wanted, got):
            torch.testing.assert_close(t, want[i], rtol=1e-6, atol=1e-6)


def test_thread_counts_give_the_same_bits(calls):
    """Frame sums and affine sums are cut by the shape, never by the thread count."""
    x, shift, scale, weight, bias = _modulate_inputs((2, 1024, 4, 96), affine=True, seed=6)  # 2^16+ elements
    g_y = torch.randn(x.shape)
    gate = torch.randn(2, 4, 96)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = [t.detach().requires_grad_() for t in (x, shift, scale, weight, bias)]
            y = fastdf.adaln_modulate(*leaves[:3], weight=leaves[3], bias=leaves[4])
            out = fastdf.gated_residual(x, y, leaves[1])
            results.append([y, out, *torch.autograd.grad((out * g_y).sum(), leaves)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_what_takes_the_kernels(calls):
    x, shift, scale, _, _ = _modulate_inputs((2, 12, 3, 16), affine=False)
    y = torch.randn_like(x)

    def used(fn):
        calls.clear()
        fn()
        return bool(calls)

    assert used(lambda: fastdf.adaln_modulate(x, shift, scale))
    assert used(lambda: fastdf.gated_residual(x, y, shift))
    # elsewhere: the other routes (fp64, 16-bit, strided x or y, a strided last dim of a table,
    # mixed dtypes, an fp64 affine, the triton backend asked for, tracing, transforms)
    assert not used(lambda: fastdf.adaln_modulate(x.double(), shift.double(), scale.double()))
    assert not used(lambda: fastdf.adaln_modulate(x.half(), shift, scale))
    assert not used(lambda: fastdf.adaln_modulate(x.transpose(0, 1).contiguous().transpose(0, 1), shift, scale))
    assert not used(lambda: fastdf.adaln_modulate(x, shift.transpose(1, 2).contiguous().transpose(1, 2), scale))
    assert not used(lambda: fastdf.adaln_modulate(x, shift, scale, weight=torch.ones(16, dtype=torch.float64)))
    assert not used(lambda: fastdf.gated_residual(x, y.transpose(1, 2).contiguous().transpose(1, 2), shift))
    assert not used(lambda: fastdf.gated_residual(x, y.half(), shift))
    batch = x[None].repeat(2, 1, 1, 1)
    assert not used(lambda: torch.func.vmap(lambda a: fastdf.gated_residual(a, a, a[:, :3]))(batch))
    with torch.device("meta"):
        assert not used(lambda: fastdf.gated_residual(x.to("meta"), y.to("meta"), shift.to("meta")))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx, fy, fs = (mode.from_tensor(t) for t in (x, y, shift))
        assert not used(lambda: fastdf.gated_residual(fx, fy, fs))
    with fastdf.backend("triton"):  # the triton backend, not these kernels (it refuses CPU tensors without a GPU)
        try:
            fastdf.gated_residual(x, y, shift)
        except Exception:  # noqa: BLE001 (whatever the triton backend says on this machine)
            pass
        assert not calls


def test_kernel_and_eager_routes_agree(monkeypatch):
    """The kernel route against the eager route it replaced (both held to the reference in
    the adaln tests): within a few float32 ulps of the result's scale."""
    x, shift, scale, weight, bias = _modulate_inputs((2, 96, 4, 48), affine=True, seed=8)
    runs = []
    for on in (True, False):
        monkeypatch.setattr(adaln, "CPU_KERNEL", on)
        leaves = [t.detach().requires_grad_() for t in (x, shift, scale, weight, bias)]
        y = fastdf.adaln_modulate(*leaves[:3], norm="rms", weight=leaves[3], bias=leaves[4])
        out = fastdf.gated_residual(x, y, leaves[2])
        runs.append([y, out, *torch.autograd.grad(out.square().sum(), leaves)])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * float(b.detach().abs().max()))


def test_binding_refuses_what_it_cannot_run():
    mod = _native.cpu_module()
    x = torch.randn(2, 6, 8)
    t = torch.randn(2, 3, 8)
    table = (t.data_ptr(), t.stride(0), t.stride(1))
    with pytest.raises(ValueError, match="T a multiple of F"):
        mod.gated_forward(x.data_ptr(), x.data_ptr(), table, x.data_ptr(), 2, 6, 4, 8, 1)
    with pytest.raises(ValueError, match="B, T, C >= 1"):
        mod.modulate_forward(x.data_ptr(), table, table, 0, 0, x.data_ptr(), 0, 0, 2, 6, 3, 0, False, 1e-6, 1)
    with pytest.raises(ValueError, match="a table is"):
        mod.gated_backward(x.data_ptr(), x.data_ptr(), (t.data_ptr(),), 0, 0, 2, 6, 3, 8, 1)
    with pytest.raises(ValueError, match="affine gradient without its tensor"):
        mod.modulate_backward(x.data_ptr(), x.data_ptr(), table, 0, 0, x.data_ptr(), x.data_ptr(), 0, 0, 0,
                              x.data_ptr(), 0, 2, 6, 3, 8, False, 1)


@pytest.mark.parametrize("where", ["x", "shift", "scale", "weight", "y", "gate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_data_stays_where_the_reference_puts_it(calls, where, value):
    """A NaN / inf in one element: the kernels' non-finite outputs are exactly the
    reference's (a row of x, a frame of a table, a channel of the affine), every other
    element finite and within the rule."""
    x, shift, scale, weight, bias = _modulate_inputs((2, 12, 3, 20), affine=True, seed=11)
    g = torch.Generator().manual_seed(12)
    y, gate = torch.randn(2, 12, 20, generator=g), torch.randn(2, 3, 20, generator=g)
    tensors = dict(x=x, shift=shift, scale=scale, weight=weight, y=y, gate=gate)
    tensors[where].view(-1)[5] = value
    mod = fastdf.adaln_modulate(x, shift, scale, weight=weight, bias=bias)
    out = fastdf.gated_residual(x, y, gate)
    ref_mod = adaln_modulate_reference(x, shift, scale, weight=weight, bias=bias)
    ref_out = gated_residual_reference(x, y, gate)
    for got, want in ((mod, ref_mod), (out, ref_out)):
        assert torch.equal(got.isfinite(), want.isfinite())
        ok = want.isfinite()
        torch.testing.assert_close(got[ok], want[ok].to(got.dtype), rtol=1e-5, atol=1e-5)
    assert calls == ["modulate_forward", "gated_forward"]


def test_gated_kernel_one_token_per_frame_through_the_binding():
    """gated_residual routes a per-token gate to PyTorch's own ops, but the kernel still takes
    F = T (its direct-write branch for one row per frame): its forward and backward equal
    x + gate * y and its gradients (dy = g gate, d gate = g y, no sums to round) exactly,
    apart from the forward's fused multiply-add."""
    g = torch.Generator().manual_seed(10)
    x, y, gate, grad = (torch.randn(2, 20, 33, generator=g) for _ in range(4))
    gate_view = torch.randn(2, 20, 99, generator=g)[..., 33:66].copy_(gate)  # a chunk view, strided rows
    out = adaln._gated_forward_cpu(x, y, gate_view)
    torch.testing.assert_close(out, torch.addcmul(x, gate, y), rtol=2e-7, atol=2e-7)
    leaves = [t.clone().requires_grad_() for t in (x, y)] + [gate_view.detach().requires_grad_()]
    d_x, d_y, d_gate = torch.autograd.grad(adaln._gated_apply(*leaves), leaves, grad)
    assert d_x is grad or torch.equal(d_x, grad)
    assert torch.equal(d_y, grad * gate) and torch.equal(d_gate, grad * y)

"""adaln_modulate and gated_residual against their references (every backend), gradients
against fp64 autograd, opcheck, compile, bad input."""

import pytest
import torch

import fastdf
from fastdf.ops.adaln import adaln_modulate_reference, gated_residual_reference
from fastdf.testing import assert_matches_reference, poisoned

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (B, T, F, C): per-frame, per-token (F = T), one frame (F = 1), odd C, frames not
# aligned with the kernels' row blocks.
SHAPES = [(2, 12, 3, 40), (1, 35, 5, 80), (3, 7, 7, 16), (2, 9, 1, 24), (1, 64, 4, 130)]
# On a GPU each shape is a Triton compile: two of them run there (plus the bf16 ones).
HERE = SHAPES[:2] if torch.cuda.is_available() else SHAPES


def _make(shape, dtype, device, *, affine, table_dtype=None, seed=0):
    B, T, F, C = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, C, generator=g) * 2 + 0.5).to(device, dtype)
    td = table_dtype or dtype
    shift, scale = (torch.randn(B, F, C, generator=g).to(device, td) for _ in range(2))
    weight = (1 + 0.3 * torch.randn(C, generator=g)).to(device, dtype) if affine else None
    bias = torch.randn(C, generator=g).to(device, dtype) if affine else None
    return x, shift, scale, weight, bias


def _modulate_ref(x, shift, scale, weight, bias, *, norm):
    return adaln_modulate_reference(x, shift, scale, norm=norm, weight=weight, bias=bias)


def _params(shapes, dtypes):
    out = []
    for i, shape in enumerate(shapes):
        for dtype in dtypes:
            marks = pytest.mark.gpu if dtype == BF16 else ()
            out.append(pytest.param(shape, dtype, i % 2 == 0, "layer" if i % 3 else "rms", marks=marks,
                                    id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}"))
    return out


@pytest.mark.op("adaln_modulate")
@pytest.mark.parametrize("shape,dtype,affine,norm", _params(HERE, [F32, F16]) + _params(SHAPES[:2], [BF16]))
def test_modulate_matches_reference(backend, device, shape, dtype, affine, norm):
    args = _make(shape, dtype, device, affine=affine)
    x, shift, scale, weight, bias = args
    with poisoned():
        y = fastdf.adaln_modulate(x, shift, scale, norm=norm, weight=weight, bias=bias)
    assert y.dtype == dtype and y.shape == x.shape
    assert_matches_reference(y, lambda *a: _modulate_ref(*a, norm=norm), *args)


@pytest.mark.op("adaln_modulate")
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("shape,dtype,table_dtype", [
    ((2, 12, 3, 40), F32, F32), ((1, 35, 5, 80), F16, F32), ((3, 7, 7, 16), F32, F32),
    pytest.param((2, 300, 3, 1536), BF16, F32, marks=pytest.mark.gpu),
])
def test_modulate_gradients(backend, device, shape, dtype, table_dtype, norm):
    """Gradients of x, shift, scale, weight, bias against fp64 autograd through the reference
    (fp32 tables with fp16 x, as models keep their modulation)."""
    args = [t.requires_grad_() for t in _make(shape, dtype, device, affine=True, table_dtype=table_dtype, seed=1)]
    g_y = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    with poisoned():
        y = fastdf.adaln_modulate(*args[:3], norm=norm, weight=args[3], bias=args[4])
        grads = torch.autograd.grad((y * g_y).sum(), args)
    for g, t in zip(grads, args):
        assert g.dtype == t.dtype and g.shape == t.shape

    def reference_grads(*inputs):
        inputs, g = [t.detach().requires_grad_() for t in inputs[:-1]], inputs[-1]
        out = _modulate_ref(*inputs, norm=norm)
        return torch.autograd.grad((out * g.to(out.dtype)).sum(), inputs)

    assert_matches_reference(grads, reference_grads, *args, g_y)


@pytest.mark.op("adaln_modulate")
def test_modulate_without_affine_and_strided(backend, device):
    """x a strided view (a slice of a wider buffer, transposed storage); tables strided too."""
    B, T, F, C = 2, 12, 4, 40
    x = torch.randn(B, C, 2 * T, device=device).transpose(1, 2)[:, ::2]
    shift = torch.randn(F, B, C, device=device).transpose(0, 1)
    scale = torch.randn(B, F, 2 * C, device=device)[..., ::2]
    for t in (x, shift, scale):
        assert not t.is_contiguous()
        t.requires_grad_()
    with poisoned():
        y = fastdf.adaln_modulate(x, shift, scale, norm="layer")
        grads = torch.autograd.grad(y.square().sum(), (x, shift, scale))
    assert_matches_reference(y, lambda *a: _modulate_ref(*a, None, None, norm="layer"), x, shift, scale)

    def reference_grads(*inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        return torch.autograd.grad(_modulate_ref(*inputs, None, None, norm="layer").square().sum(), inputs)

    assert_matches_reference(grads, reference_grads, x, shift, scale)


def test_modulate_is_a_per_frame_adaln():
    """F = T with the table repeated per token is the same as F frames (and an ordinary
    LayerNorm when the tables are zero)."""
    x, shift, scale, _, _ = _make((2, 12, 3, 16), F32, "cpu", affine=False)
    y = fastdf.adaln_modulate(x, shift, scale)
    per_token = fastdf.adaln_modulate(x, shift.repeat_interleave(4, 1), scale.repeat_interleave(4, 1))
    torch.testing.assert_close(y, per_token)
    zero = torch.zeros_like(shift)
    torch.testing.assert_close(fastdf.adaln_modulate(x, zero, zero), torch.nn.functional.layer_norm(x, (16,), eps=1e-6))


@pytest.mark.op("gated_residual")
@pytest.mark.parametrize("shape,dtype", [(s, d) for s in HERE[:3] for d in (F32, F16)]
                         + [pytest.param((2, 300, 3, 1536), BF16, marks=pytest.mark.gpu)])
def test_gated_residual(backend, device, shape, dtype):
    B, T, F, C = shape
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(B, T, C, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    gate = torch.randn(B, F, C, generator=g).to(device, torch.float32).requires_grad_()
    with poisoned():
        out = fastdf.gated_residual(x, y, gate)
        g_out = torch.randn_like(out)
        grads = torch.autograd.grad((out * g_out).sum(), (x, y, gate))
    assert out.dtype == dtype
    assert_matches_reference(out, gated_residual_reference, x, y, gate)

    def reference_grads(x, y, gate, g):
        inputs = [t.detach().requires_grad_() for t in (x, y, gate)]
        out = gated_residual_reference(*inputs)
        return torch.autograd.grad((out * g.to(out.dtype)).sum(), inputs)

    assert_matches_reference(grads, reference_grads, x, y, gate, g_out)


@pytest.mark.op("gated_residual")
def test_gated_residual_strided(backend, device):
    x = torch.randn(2, 40, 10, device=device).transpose(1, 2)
    y = torch.randn(2, 10, 80, device=device)[..., ::2]
    gate = torch.randn(5, 2, 40, device=device).transpose(0, 1)
    with poisoned():
        out = fastdf.gated_residual(x, y, gate)
    assert_matches_reference(out, gated_residual_reference, x, y, gate)


def test_opcheck():
    x, shift, scale, weight, bias = _make((2, 6, 3, 8), F32, "cpu", affine=True)
    for rms in (False, True):
        torch.library.opcheck(torch.ops.fastdf.adaln_modulate, (x, shift, scale, weight, bias, rms, 1e-6))
        torch.library.opcheck(torch.ops.fastdf.adaln_modulate, (x, shift, scale, None, None, rms, 1e-5))
    args = [t.double().requires_grad_() for t in (x, shift, scale, weight, bias)]
    torch.library.opcheck(torch.ops.fastdf.adaln_modulate, (*args, False, 1e-6))
    y, mean, rstd = torch.ops.fastdf.adaln_modulate(x, shift, scale, weight, bias, False, 1e-6)
    torch.library.opcheck(torch.ops.fastdf.adaln_modulate_backward, (torch.randn_like(y), x, scale, weight, bias,
                                                                     mean, rstd, False))
    torch.library.opcheck(torch.ops.fastdf.adaln_modulate_backward, (torch.randn_like(y), x, scale, None, None,
                                                                     mean, rstd, True))
    gate = shift
    torch.library.opcheck(torch.ops.fastdf.gated_residual, (x, torch.randn_like(x), gate))
    torch.library.opcheck(torch.ops.fastdf.gated_residual, (x.double().requires_grad_(),
                                                            torch.randn_like(x).double().requires_grad_(),
                                                            gate.double().requires_grad_()))
    torch.library.opcheck(torch.ops.fastdf.gated_residual_backward, (torch.randn_like(x), x, gate))


def test_compiles_fullgraph():
    x, shift, scale, weight, bias = (t.requires_grad_() for t in _make((2, 6, 3, 8), F32, "cpu", affine=True))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(x, shift, scale, gate):
        h = fastdf.adaln_modulate(x, shift, scale, norm="rms", weight=weight, bias=bias)
        return fastdf.gated_residual(x, torch.tanh(h), gate).sum()

    got = block(x, shift, scale, shift * 0.5)
    got.backward()
    grads = [t.grad for t in (x, shift, scale, weight, bias)]
    inputs = [t.detach().requires_grad_() for t in (x, shift, scale, weight, bias)]
    h = adaln_modulate_reference(*inputs[:3], norm="rms", weight=inputs[3], bias=inputs[4])
    want = gated_residual_reference(inputs[0], torch.tanh(h), inputs[1] * 0.5).sum()
    want.backward()
    torch.testing.assert_close(got, want)
    for a, t in zip(grads, inputs):
        torch.testing.assert_close(a, t.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call,error,match", [
    (lambda x, s, c, w: fastdf.adaln_modulate(x[0], s, c), ValueError, "x must have 3 dims"),
    (lambda x, s, c, w: fastdf.adaln_modulate(x, s[:, :, :4], c), ValueError, "shift must have shape"),
    (lambda x, s, c, w: fastdf.adaln_modulate(x, s, c[:, :2]), ValueError, "scale must have shape"),
    (lambda x, s, c, w: fastdf.adaln_modulate(x[:, :5], s, c), ValueError, "T must be a multiple of F"),
    (lambda x, s, c, w: fastdf.adaln_modulate(x, s, c, norm="batch"), ValueError, "norm must be 'layer' or 'rms'"),
    (lambda x, s, c, w: fastdf.adaln_modulate(x, s, c, norm=None), TypeError, "norm must be a str"),
    (lambda x, s, c, w: fastdf.adaln_modulate(x, s, c, weight=w[:3]), ValueError, "weight must have shape"),
    (lambda x, s, c, w: fastdf.adaln_modulate(x, s, c, bias=w[None]), ValueError, "bias must have 1 dims"),
    (lambda x, s, c, w: fastdf.adaln_modulate(x, s, c.half()), ValueError, "scale has dtype float16 but shift"),
    (lambda x, s, c, w: fastdf.adaln_modulate(x, s.to("meta"), c.to("meta")), ValueError, "shift is on meta"),
    (lambda x, s, c, w: fastdf.adaln_modulate(x.int(), s, c), ValueError, "x must be one of"),
    (lambda x, s, c, w: fastdf.adaln_modulate(x, s, c, eps=-1.0), ValueError, "eps must be >= 0"),
    (lambda x, s, c, w: fastdf.adaln_modulate(x.tolist(), s, c), TypeError, "x must be a torch.Tensor"),
    (lambda x, s, c, w: fastdf.gated_residual(x, x[:, :3], s), ValueError, "y must have shape"),
    (lambda x, s, c, w: fastdf.gated_residual(x, x.int(), s), ValueError, "y must be one of"),
    (lambda x, s, c, w: fastdf.gated_residual(x, x, s[:, :, :2]), ValueError, "gate must have shape"),
    (lambda x, s, c, w: fastdf.gated_residual(x, x, s[:1]), ValueError, "gate must have shape"),
    (lambda x, s, c, w: fastdf.gated_residual(x, x, torch.randn(2, 5, 8)), ValueError, "T must be a multiple of F"),
])
def test_bad_input(call, error, match):
    x, shift, scale, weight, _ = _make((2, 6, 3, 8), F32, "cpu", affine=True)
    with pytest.raises(error, match=match):
        call(x, shift, scale, weight)


@pytest.mark.op("gated_residual")
def test_gated_residual_mixed_dtypes(backend, device):
    """An fp16 branch output on an fp32 residual stream (autocast): the result stays fp32."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 24, generator=g).to(device).requires_grad_()
    y = torch.randn(2, 6, 24, generator=g).to(device, F16).requires_grad_()
    gate = torch.randn(2, 3, 24, generator=g).to(device, F16).requires_grad_()
    with poisoned():
        out = fastdf.gated_residual(x, y, gate)
        grads = torch.autograd.grad(out.square().sum(), (x, y, gate))
    assert out.dtype == torch.float32 and [t.dtype for t in grads] == [torch.float32, F16, F16]
    assert_matches_reference(out, gated_residual_reference, x, y, gate)


# ---------------------------------------------------------------------------- hardening (issue 9)

@pytest.mark.op("adaln_modulate")
@pytest.mark.parametrize("eps,error,match", [
    (float("nan"), ValueError, "eps must be finite"), (float("inf"), ValueError, "eps must be finite"),
    (1e300, ValueError, "eps = 1e\\+300 is not representable in float32"), (10**400, ValueError, "eps must be finite"),
    (-1e-6, ValueError, "eps must be >= 0"), (True, TypeError, "eps must be a number"),
    ("1e-6", TypeError, "eps must be a number"), (torch.tensor(1e-6), TypeError, "eps must be a number"),
])
def test_bad_eps(backend, device, eps, error, match):
    """Float knobs are finite, in range and representable in float32 (the kernels' dtype)."""
    x, shift, scale, _, _ = _make((1, 4, 2, 8), F32, device, affine=False)
    with pytest.raises(error, match=match):
        fastdf.adaln_modulate(x, shift, scale, eps=eps)


@pytest.mark.op("adaln_modulate", "gated_residual")
@pytest.mark.parametrize("shape", [(0, 4, 2, 8), (2, 0, 2, 8), (2, 4, 2, 0)], ids=["B0", "T0", "C0"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_zero_sized_dims(backend, device, shape, norm):
    """B, T or C of 0: the reference's empty output and zero table/affine gradients on every
    backend (no ZeroDivisionError/IndexError)."""
    x, shift, scale, weight, bias = _make(shape, F32, device, affine=True)
    gate = shift * 0.5
    y_in = torch.randn_like(x)

    def run(mod, gated):
        leaves = [t.detach().requires_grad_() for t in (x, shift, scale, weight, bias, gate, y_in)]
        h = mod(*leaves[:3], norm=norm, weight=leaves[3], bias=leaves[4])
        out = gated(leaves[0], h + leaves[6], leaves[5])
        grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
        return [h, out] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]

    with poisoned():
        got = run(fastdf.adaln_modulate, fastdf.gated_residual)
    want = run(adaln_modulate_reference, gated_residual_reference)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    assert not got[3].any() and not got[4].any(), "no tokens or channels: the table gradients are zero"


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "eager"])
def test_vmap_and_grad_transforms(monkeypatch, kernel):
    """Under torch.func transforms both ops run (a regression: the CPU eager route's out=
    addcmul has no batching rule) and give the reference's values and gradients."""
    from fastdf.ops import adaln

    monkeypatch.setattr(adaln, "CPU_KERNEL", kernel)
    x = torch.randn(3, 2, 12, 16, generator=torch.Generator().manual_seed(0))

    def ours(a):
        return fastdf.gated_residual(a, fastdf.adaln_modulate(a, a[:, :3], a[:, 3:6], norm="rms"), a[:, 6:9])

    def ref(a):
        return gated_residual_reference(a, adaln_modulate_reference(a, a[:, :3], a[:, 3:6], norm="rms"), a[:, 6:9])

    torch.testing.assert_close(torch.func.vmap(ours)(x), torch.stack([ref(a) for a in x]))
    got = torch.func.vmap(torch.func.grad(lambda a: ours(a).square().sum()))(x)
    want = torch.func.vmap(torch.func.grad(lambda a: ref(a).square().sum()))(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

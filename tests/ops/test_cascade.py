"""merge_attention_states against its reference and logaddexp, every backend."""

import pytest
import torch

import fastdf
from fastdf.ops.cascade import merge_attention_states_reference
from fastdf.testing import assert_matches_reference, poisoned

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _states(shape, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    o_a = torch.randn(*shape, d, generator=g).to(device, dtype)
    o_b = torch.randn(*shape, d, generator=g).to(device, dtype)
    lse_a = (3 * torch.randn(*shape, generator=g)).to(device)
    lse_b = (3 * torch.randn(*shape, generator=g)).to(device)
    return o_a, lse_a, o_b, lse_b


def _attention(q, k, v):
    s = q @ k.transpose(-1, -2)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


@pytest.mark.op("merge_attention_states")
def test_merge_equals_attention_over_union(backend, device):
    """Merging attention over two key sets equals attention over their union."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    k = torch.randn(3, 19, 16, generator=g, dtype=torch.float64)
    v = torch.randn(3, 19, 16, generator=g, dtype=torch.float64)
    o_full, lse_full = _attention(q, k, v)
    o_a, lse_a = _attention(q, k[:, :7], v[:, :7])
    o_b, lse_b = _attention(q, k[:, 7:], v[:, 7:])
    args = [t.float().to(device) for t in (o_a, lse_a, o_b, lse_b)]
    o, lse = fastdf.merge_attention_states(*args)
    torch.testing.assert_close(o.cpu().double(), o_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), lse_full, atol=1e-5, rtol=1e-5)


@pytest.mark.op("merge_attention_states")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,d", [((7,), 40), ((2, 3, 5), 80), ((1, 1, 1, 1), 16), ((3, 2, 2, 3, 2), 24)])
def test_merge_matches_reference(backend, device, dtype, shape, d):
    args = _states(shape, d, dtype, device)
    with poisoned():
        out = fastdf.merge_attention_states(*args)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    assert_matches_reference(out, merge_attention_states_reference, *args)


@pytest.mark.op("merge_attention_states")
def test_merge_strided_views(backend, device):
    """[B, T, H, D] storage viewed as [B, H, T, D]; lse from a transposed buffer; D strided."""
    o_a, lse_a, o_b, lse_b = _states((2, 9, 4), 32, torch.float32, device)
    o_a = o_a.transpose(1, 2)  # [2, 4, 9, 32] non-contiguous
    o_b = torch.randn(2, 4, 64, 9, device=device).transpose(-1, -2)[..., ::2]  # head dim stride 2*9
    lse_a = lse_a.transpose(1, 2)
    lse_b = torch.randn(2, 9, 4, device=device).transpose(1, 2)
    assert not o_a.is_contiguous() and not o_b.is_contiguous()
    with poisoned():
        out = fastdf.merge_attention_states(o_a, lse_a, o_b, lse_b)
    assert_matches_reference(out, merge_attention_states_reference, o_a, lse_a, o_b, lse_b)


@pytest.mark.op("merge_attention_states")
def test_merge_empty_states(backend, device):
    """-inf lse: an empty side contributes nothing; two empty sides give zeros and -inf."""
    o_a, lse_a, o_b, lse_b = _states((6,), 8, torch.float32, device)
    lse_a[0] = lse_b[0] = float("-inf")
    lse_a[1] = float("-inf")
    lse_b[2] = float("-inf")
    o, lse = fastdf.merge_attention_states(o_a, lse_a, o_b, lse_b)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and lse[0] == float("-inf")
    torch.testing.assert_close(o[1], o_b[1])
    torch.testing.assert_close(lse[1], lse_b[1])
    torch.testing.assert_close(o[2], o_a[2])
    assert torch.isfinite(o).all()


@pytest.mark.op("merge_attention_states")
def test_merge_lse_is_logaddexp(backend, device):
    o_a, lse_a, o_b, lse_b = _states((4, 33), 16, torch.float32, device)
    lse_a[0, :5] += 80.0  # large gaps must not overflow
    _, lse = fastdf.merge_attention_states(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(lse, torch.logaddexp(lse_a, lse_b))


def test_merge_gradients_match_autograd_through_reference():
    o_a, lse_a, o_b, lse_b = (t.double().requires_grad_() for t in _states((3, 4), 8, torch.float32, "cpu"))
    torch.autograd.gradcheck(fastdf.merge_attention_states, (o_a, lse_a, o_b, lse_b))
    out = fastdf.merge_attention_states(o_a, lse_a, o_b, lse_b)
    ref = merge_attention_states_reference(o_a, lse_a, o_b, lse_b)
    g_o, g_l = torch.randn_like(out[0]), torch.randn_like(out[1])
    got = torch.autograd.grad((out[0] * g_o).sum() + (out[1] * g_l).sum(), (o_a, lse_a, o_b, lse_b))
    want = torch.autograd.grad((ref[0] * g_o).sum() + (ref[1] * g_l).sum(), (o_a, lse_a, o_b, lse_b))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.op("merge_attention_states")
def test_merge_backward_under_backend(backend, device):
    args = [t.requires_grad_() for t in _states((5, 3), 16, torch.float32, device)]
    o, lse = fastdf.merge_attention_states(*args)
    (o.square().sum() + lse.sum()).backward()

    def reference_grads(*inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        ref = merge_attention_states_reference(*inputs)
        return torch.autograd.grad(ref[0].square().sum() + ref[1].sum(), inputs)

    assert_matches_reference(tuple(t.grad for t in args), reference_grads, *args)


def test_merge_opcheck():
    args = _states((2, 3), 8, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.fastdf.merge_attention_states, args)
    args = [t.double().requires_grad_() for t in args]
    torch.library.opcheck(torch.ops.fastdf.merge_attention_states, args)


def test_merge_compiles_fullgraph():
    args = _states((2, 3), 8, torch.float32, "cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(o_a, lse_a, o_b, lse_b):
        o, lse = fastdf.merge_attention_states(o_a * 2, lse_a, o_b, lse_b)
        return o + 1, lse

    o, lse = f(*args)
    ref = merge_attention_states_reference(args[0] * 2, *args[1:])
    torch.testing.assert_close(o, ref[0] + 1)
    torch.testing.assert_close(lse, ref[1])


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda a: (a[0].numpy(), *a[1:]), TypeError, "o_a must be a torch.Tensor"),
        (lambda a: (a[0], a[1].half(), *a[2:]), ValueError, "lse_a must be one of float32"),
        (lambda a: (a[0], a[1], a[2].half(), a[3]), ValueError, "o_b has dtype float16 but o_a has float32"),
        (lambda a: (a[0], a[1], a[2][:, :1], a[3]), ValueError, "o_b must have shape"),
        (lambda a: (a[0], a[1][:1], a[2], a[3]), ValueError, "lse_a must have shape"),
        (lambda a: (a[0].int(), *a[1:]), ValueError, "o_a must be one of"),
        (lambda a: (a[0], a[1], a[2], a[3].to("meta")), ValueError, "lse_b is on meta"),
    ],
)
def test_merge_bad_input(mutate, error, match):
    args = _states((2, 3), 8, torch.float32, "cpu")
    with pytest.raises(error, match=match):
        fastdf.merge_attention_states(*mutate(args))


# ---------------------------------------------------------------------------- fastdf._cpu's merge

def _merge_calls(monkeypatch):
    from fastdf.ops import cascade
    calls = []
    run = cascade._merge_cpu
    monkeypatch.setattr(cascade, "_merge_cpu", lambda *a: calls.append(run(*a)) or calls[-1])
    return calls


@pytest.mark.skipif(fastdf._native.cpu_module() is None, reason=str(fastdf._native.cpu_unavailable_reason()))
@pytest.mark.parametrize("shape,d,gap", [((3, 5), 64, 3.0), ((16,), 8, 3.0), ((2, 33), 24, 80.0), ((37,), 1, 0.0),
                                         ((600,), 512, 3.0)],
                         ids=["tail-rows", "16-rows", "far-apart", "equal-lse", "threads"])
def test_cpu_merge_kernel_matches_reference(monkeypatch, shape, d, gap):
    """fp32 CPU states without gradients take fastdf._cpu's one-call merge: 16-row vector
    groups and a scalar tail, lse gaps up to 80 (weights e^-80), equal lse, the threaded
    blend (rows x D > 2^18); poisoned outputs are fully written."""
    calls = _merge_calls(monkeypatch)
    o_a, lse_a, o_b, lse_b = _states(shape, d, torch.float32, "cpu", seed=d)
    lse_b = lse_a - gap * torch.sign(torch.randn(shape, generator=torch.Generator().manual_seed(1))) if gap else lse_a.clone()
    with poisoned():
        got = fastdf.merge_attention_states(o_a, lse_a, o_b, lse_b)
    assert len(calls) == 1 and calls[0] is not None
    assert_matches_reference(got, merge_attention_states_reference, o_a, lse_a, o_b, lse_b)
    assert torch.equal(got[1], torch.logaddexp(lse_a, lse_b)) or torch.allclose(got[1], torch.logaddexp(lse_a, lse_b),
                                                                                rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(fastdf._native.cpu_module() is None, reason=str(fastdf._native.cpu_unavailable_reason()))
def test_cpu_merge_kernel_leaves_the_rest_to_the_general_path(monkeypatch):
    """Empty (-inf) or +inf states, gradients, strided views and 16-bit states do not use
    the kernel's result; the answers are the general path's."""
    calls = _merge_calls(monkeypatch)
    o_a, lse_a, o_b, lse_b = _states((4, 8), 16, torch.float32, "cpu")
    lse_b[1, 2] = float("-inf")
    o_b[1, 2] = float("nan")  # an empty state's o is never read
    got = fastdf.merge_attention_states(o_a, lse_a, o_b, lse_b)
    assert calls == [None]
    assert torch.equal(got[0][1, 2], o_a[1, 2]) and torch.equal(got[1][1, 2], lse_a[1, 2])
    o_b[1, 2] = 0.0
    lse_b[1, 2] = 0.0
    o_a.requires_grad_()
    fastdf.merge_attention_states(o_a, lse_a, o_b, lse_b)[0].sum().backward()
    assert calls == [None] and o_a.grad is not None
    o_a = o_a.detach()
    strided = torch.stack([o_a, o_a], -1)[..., 0]
    assert fastdf.merge_attention_states(strided, lse_a, o_b, lse_b) is not None and calls[-1] is None
    fastdf.merge_attention_states(o_a.half(), lse_a, o_b.half(), lse_b)
    assert len(calls) == 2  # fp16: not offered to the kernel

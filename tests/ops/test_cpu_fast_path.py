"""The CPU torch backend's fast implementations (issue 11) against the readable references:
the plain-torch eager path of adaln / merge equals the custom op's torch implementation,
runs only where the torch backend would, and the MoE/grouped-GEMM pieces give the
reference's exact bits."""

import pytest
import torch

import fastdf
from fastdf.ops import adaln, cascade, moe
from fastdf.ops._eager import torch_backend_eager
from fastdf.ops.grouped_mm import grouped_mm_loop, grouped_mm_reference


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def test_eager_path_only_where_the_torch_backend_runs(monkeypatch):
    monkeypatch.delenv("FASTDF_BACKEND", raising=False)
    assert torch_backend_eager(torch.device("cpu"))
    assert not torch_backend_eager(torch.device("meta"))
    with fastdf.backend("torch"):
        assert torch_backend_eager(torch.device("meta"))
    with fastdf.backend("triton"):
        assert not torch_backend_eager(torch.device("cpu"))

    # FASTDF_BACKEND is read on every call (set, changed, refused, removed at run time)
    for value, cpu, meta in (("torch", True, True), (" Triton", False, False), ("", True, False)):
        monkeypatch.setenv("FASTDF_BACKEND", value)
        assert (torch_backend_eager(torch.device("cpu")), torch_backend_eager(torch.device("meta"))) == (cpu, meta)
    monkeypatch.setenv("FASTDF_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTDF_BACKEND"):
        torch_backend_eager(torch.device("cpu"))
    monkeypatch.delenv("FASTDF_BACKEND")
    assert torch_backend_eager(torch.device("cpu"))

    @torch.compile(fullgraph=True, backend="eager")
    def traced(x):
        return x + 1 if torch_backend_eager(x.device) else x - 1

    assert torch.equal(traced(torch.zeros(2)), -torch.ones(2)), "under torch.compile the custom op must stay"


def test_eager_path_skips_the_custom_op(monkeypatch):
    calls = []
    for mod, name in ((adaln, "_modulate_op"), (adaln, "_gated_op"), (cascade, "_merge_op")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    x, shift, scale = torch.randn(2, 8, 16), torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    fastdf.adaln_modulate(x, shift, scale)
    fastdf.gated_residual(x, x, shift)
    o, lse = torch.randn(3, 5, 8), torch.randn(3, 5)
    fastdf.merge_attention_states(o, lse, o, lse)
    assert calls == []
    fastdf.adaln_modulate(x.half(), shift, scale)  # 16-bit x keeps the custom op (fp32 gradient chain)
    lse_empty = lse.clone()
    lse_empty[0, 0] = float("-inf")
    fastdf.merge_attention_states(o, lse_empty, o, lse)  # non-finite lse: the custom op's semantics
    assert calls == ["_modulate_op", "_merge_op"]


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modulate_eager_equals_custom_op(norm, affine, dtype):
    g = torch.Generator().manual_seed(0)
    B, T, F, C = 2, 12, 3, 20
    x = torch.randn(B, T, C, generator=g, dtype=dtype) * 2 + 1
    shift, scale = (torch.randn(B, F, C, generator=g, dtype=dtype) for _ in range(2))
    weight = torch.randn(C, generator=g, dtype=dtype) if affine else None
    bias = torch.randn(C, generator=g, dtype=dtype) if affine else None
    dy = torch.randn(B, T, C, generator=g, dtype=dtype)
    # fp64 too stays near fp32 precision: the custom op keeps fp32 statistics for its backward
    tol = dict(atol=1e-5, rtol=1e-5)
    results = []
    for eager in (True, False):
        leaves = _leaves(*(t for t in (x, shift, scale, weight, bias) if t is not None))
        args = leaves[:3] + ([None, None] if not affine else leaves[3:])
        if eager:
            y = fastdf.adaln_modulate(*args[:3], norm=norm, weight=args[3], bias=args[4])
        else:
            y = torch.ops.fastdf.adaln_modulate(*args, norm == "rms", 1e-6)[0]
        results.append((y, torch.autograd.grad(y, leaves, dy)))
        with torch.no_grad():  # the in-place no-grad branch gives the same values
            y_ng = fastdf.adaln_modulate(*(t.detach() if t is not None else None for t in args[:3]), norm=norm,
                                         weight=None if args[3] is None else args[3].detach(),
                                         bias=None if args[4] is None else args[4].detach())
        torch.testing.assert_close(y_ng, y.detach(), **tol)
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y0, y1, **tol)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, **tol)


def test_gated_eager_equals_custom_op():
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(2, 12, 20, generator=g) for _ in range(2))
    gate = torch.randn(2, 4, 20, generator=g)
    dout = torch.randn(2, 12, 20, generator=g)
    got = []
    for fn in (fastdf.gated_residual, torch.ops.fastdf.gated_residual):
        leaves = _leaves(x, y, gate)
        out = fn(*leaves)
        got.append((out, *torch.autograd.grad(out, leaves, dout)))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_merge_finite_path_matches_reference_values_and_gradients():
    g = torch.Generator().manual_seed(2)
    o_a, o_b = (torch.randn(3, 4, 16, generator=g, dtype=torch.float64) for _ in range(2))
    lse_a, lse_b = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 30 for _ in range(2))
    leaves = _leaves(o_a, lse_a, o_b, lse_b)
    o, lse = fastdf.merge_attention_states(*leaves)
    ref = cascade.merge_attention_states_reference(*leaves)
    torch.testing.assert_close((o, lse), ref, atol=1e-12, rtol=1e-12)
    go, gl = torch.randn_like(o), torch.randn_like(lse)
    want = torch.autograd.grad(ref, leaves, (go, gl))
    for a, b in zip(torch.autograd.grad((o, lse), leaves, (go, gl)), want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # an overflowing difference (finite lse) falls back to the reference
    big = torch.full((3, 4), 3e38)
    o2, lse2 = fastdf.merge_attention_states(o_a.float(), big, o_b.float(), -big)
    torch.testing.assert_close(o2, o_a.float())


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_combine_fast_is_bitwise_the_reference(K, weighted):
    g = torch.Generator().manual_seed(K)
    y = torch.randn(7 * K, 33, generator=g)
    inverse = torch.randperm(7 * K, generator=g).view(7, K).int()
    w = torch.rand(7, K, generator=g) if weighted else None
    assert torch.equal(moe._combine_torch_fast(y, inverse, w), moe.moe_combine_reference(y, inverse, w))


def test_grouped_mm_loop_is_bitwise_the_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 24, generator=g)
    w = torch.randn(4, 32, 24, generator=g).transpose(1, 2)  # HF layout, read transposed
    offs = torch.tensor([5, 5, 21, 33], dtype=torch.int32)  # an empty group and a zero tail
    tw, tids = torch.randn(1, 24, 32, generator=g), torch.tensor([2])
    for kw in ({}, dict(trainable_w=tw, trainable_ids=tids)):
        assert torch.equal(grouped_mm_loop(x, w, offs, **kw), grouped_mm_reference(x, w, offs, **kw))


def _named_checks_pass(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (TypeError, ValueError):
        return False
    return True


def _variants(good: dict, bad_values: dict):
    """``good`` and every copy of it with one argument replaced by one of its bad values."""
    yield good
    for name, values in bad_values.items():
        for value in values:
            yield {**good, name: value}


def test_one_expression_accept_agrees_with_the_named_checks():
    """The public ops accept valid arguments in one expression and run the named checks
    only otherwise: that expression must never accept what a named check refuses (nor
    refuse valid input, which would only cost time; checked too)."""
    B, T, F, C = 2, 6, 3, 4
    x, tab = torch.randn(B, T, C), torch.randn(B, F, C)
    meta = lambda t: t.to("meta")  # noqa: E731
    tables = [torch.randn(B, 4, C), torch.randn(B, 0, C), torch.randn(1, F, C), torch.randn(B, F, C + 1),
              torch.randn(B, F, C, 1), tab.long(), meta(tab), tab.double(), tab.half(), "t", None]
    xs = [x.long(), x[0], meta(x), x.double(), x.half(), 1.0]
    for kw in _variants(dict(x=x, shift=tab, scale=tab, norm="layer", weight=None, bias=None),
                        dict(x=xs, shift=tables, scale=tables, norm=["rms", "batch", 3],
                             weight=[torch.randn(C), torch.randn(C + 1), torch.randn(1, C), meta(torch.randn(C)), "w"],
                             bias=[torch.randn(C), torch.randn(C).long(), torch.randn(C + 1)])):
        assert adaln._modulate_args_ok(*kw.values()) == _named_checks_pass(_modulate_named_checks, **kw), kw
    for kw in _variants(dict(x=x, y=x, gate=tab), dict(x=xs, y=xs + [torch.randn(B, T, C + 1)], gate=tables)):
        assert adaln._gated_args_ok(**kw) == _named_checks_pass(_gated_named_checks, **kw), kw
    o, lse = torch.randn(3, 5, 8), torch.randn(3, 5)
    os_ = [o.double(), o.long(), o[..., :4], meta(o), torch.randn(()), "o"]
    lses = [lse.double(), lse.half(), lse[:, :4], meta(lse), lse[..., None], 0.0]
    for kw in _variants(dict(o_a=o, lse_a=lse, o_b=o, lse_b=lse), dict(o_a=os_, lse_a=lses, o_b=os_, lse_b=lses)):
        assert cascade._merge_args_ok(**kw) == _named_checks_pass(_merge_named_checks, **kw), kw
    assert cascade._merge_args_ok(o.double(), lse.double(), o.double(), lse.double())


def _modulate_named_checks(x, shift, scale, norm, weight, bias):
    """adaln_modulate's named checks on their own (monkeypatching the accept to False)."""
    import unittest.mock

    with unittest.mock.patch.object(adaln, "_modulate_args_ok", lambda *a: False), \
            unittest.mock.patch.object(adaln, "_modulate_eager", lambda *a: None), \
            unittest.mock.patch.object(adaln, "_modulate_op", lambda *a: (None, None, None)):
        adaln.adaln_modulate(x, shift, scale, norm=norm, weight=weight, bias=bias)


def _gated_named_checks(x, y, gate):
    import unittest.mock

    with unittest.mock.patch.object(adaln, "_gated_args_ok", lambda *a: False), \
            unittest.mock.patch.object(adaln, "_gated_eager", lambda *a: None), \
            unittest.mock.patch.object(adaln, "_gated_op", lambda *a: None):
        adaln.gated_residual(x, y, gate)


def _merge_named_checks(o_a, lse_a, o_b, lse_b):
    import unittest.mock

    with unittest.mock.patch.object(cascade, "_merge_args_ok", lambda *a: False), \
            unittest.mock.patch.object(cascade, "_merge_finite", lambda *a: (None, None)), \
            unittest.mock.patch.object(cascade, "_merge_op", lambda *a: None):
        cascade.merge_attention_states(o_a, lse_a, o_b, lse_b)


def test_cpu_kernel_route_is_the_eager_rule_in_one_call(monkeypatch):
    """cpu_kernel_route() == torch_backend_eager(cpu) and plain_tensors() under every
    backend request (env var set, changed, refused; fastdf.backend blocks), dispatch modes,
    functorch transforms and tracing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastdf.ops._eager import cpu_kernel_route, plain_tensors

    cpu = torch.device("cpu")

    def agree():
        want = torch_backend_eager(cpu) and plain_tensors()
        assert cpu_kernel_route() == want
        return want

    monkeypatch.delenv("FASTDF_BACKEND", raising=False)
    assert agree()
    for value, want in (("torch", True), ("auto", True), ("", True), (" Triton", False), ("cuda", False)):
        monkeypatch.setenv("FASTDF_BACKEND", value)
        assert agree() == want, value
    monkeypatch.setenv("FASTDF_BACKEND", "bogus-value-never-seen")
    with pytest.raises(ValueError, match="FASTDF_BACKEND"):
        cpu_kernel_route()
    monkeypatch.delenv("FASTDF_BACKEND")
    for name, want in (("triton", False), ("torch", True), ("auto", True)):
        with fastdf.backend(name):
            assert agree() == want, name
    with FakeTensorMode():
        assert not agree()
    assert not torch.func.vmap(lambda t: t + int(agree()))(torch.zeros(2)).any()

    @torch.compile(fullgraph=True, backend="eager")
    def traced(x):
        return x + 1 if cpu_kernel_route() else x - 1

    assert torch.equal(traced(torch.zeros(2)), -torch.ones(2))

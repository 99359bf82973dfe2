"""The eager CPU path of moe_experts and grouped_mm (issue 11, round 3) against the custom
op's torch implementation and the references: the same bits forward and backward, the
same errors, frozen experts without weight gradients, and ``torch._grouped_mm`` used only
where its layout rule holds. Plus the merge's lerp formulation at large lse gaps."""

import importlib
import unittest.mock

import pytest
import torch

import fastdf
from fastdf.ops import moe
from fastdf.ops.cascade import merge_attention_states_reference
from fastdf.ops.grouped_mm import grouped_mm_cpu_native, grouped_mm_loop, grouped_mm_reference
from fastdf.testing import assert_matches_reference


def _layer(T, K, E, H, I, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g).to(dtype)
    gate_up = torch.nn.Parameter((torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype))
    down = torch.nn.Parameter((torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype))
    return hidden, ids, weights, gate_up, down


def _op(hidden, ids, weights, gate_up, down, tids=None, tgu=None, tdown=None, act=0, save=False):
    return torch.ops.fastdf.moe_experts(hidden, ids, weights, gate_up, down, tids, tgu, tdown, act, save)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,K,E,H,I", [(40, 2, 4, 16, 24), (23, 3, 5, 12, 10), (9, 1, 3, 8, 6)])
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_eager_forward_is_the_custom_op_bitwise(dtype, T, K, E, H, I, act):
    """No grad (SiLU/ReLU in place over h1) and with grad (h1 kept): the custom op's bits."""
    hidden, ids, weights, gate_up, down = _layer(T, K, E, H, I, dtype)
    code = moe.ACTIVATIONS[act]
    with unittest.mock.patch.object(moe, "_moe_op", side_effect=AssertionError("custom op called")):
        with torch.no_grad():
            got = fastdf.moe_experts(hidden, ids, weights, gate_up, down, act=act)
        got_grad_mode = fastdf.moe_experts(hidden, ids, weights, gate_up, down, act=act)
    with torch.no_grad():
        want = _op(hidden, ids, weights, gate_up, down, act=code)
    assert torch.equal(got, want) and torch.equal(got_grad_mode.detach(), want)
    ref = moe.moe_experts_reference(hidden, ids, weights, gate_up.detach(), down.detach(), act=act)
    if K <= 2:  # the reference adds each expert's rows by index_add: the same sums only for K <= 2
        assert torch.equal(got, ref)


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("dtype,act", [(torch.float32, "silu"), (torch.float64, "silu"), (torch.float32, "gelu"),
                                       (torch.float32, "relu")])
def test_eager_backward_matches_the_reference(K, trainable, dtype, act):
    """The eager backward keeps h2 and groups its products differently from the op's
    backward (weighted dout rows before the GEMM, the routing-weight gradient from h2): the
    forward is the op's bits, every gradient is held to the reference by the rule, the op's
    too. Trainable experts include one no token reaches (its gradients: zeros)."""
    T, E, H, I = 31, 6, 12, 16
    hidden, ids, weights, gate_up, down = _layer(T, K, E, H, I, dtype, seed=K)
    ids = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(t))[:K] for t in range(T)])
    grad = torch.randn(T, H, generator=torch.Generator().manual_seed(9)).to(dtype)
    tids = torch.tensor([1, 5, 4]) if trainable else None  # expert 5: no rows
    code = moe.ACTIVATIONS[act]

    def run(fn, hidden, ids, weights, gate_up, down, grad, tids):
        h, w = hidden.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
        gu, dn = (torch.nn.Parameter(t.detach().clone(), requires_grad=not trainable) for t in (gate_up, down))
        tgu = torch.nn.Parameter(gate_up.detach()[tids].clone()) if trainable else None
        tdn = torch.nn.Parameter(down.detach()[tids].clone()) if trainable else None
        out = fn(h, ids, w, gu, dn, tids, tgu, tdn)
        out.backward(grad)
        assert not trainable or (gu.grad, dn.grad) == (None, None), "frozen experts got weight gradients"
        params = (tgu, tdn) if trainable else (gu, dn)
        return out.detach(), h.grad, w.grad, *(p.grad for p in params)

    def eager(h, ids, w, gu, dn, tids, tgu, tdn):
        return fastdf.moe_experts(h, ids, w, gu, dn, act=act, trainable_ids=tids, trainable_gate_up=tgu,
                                  trainable_down=tdn)

    def reference(h, ids, w, gu, dn, tids, tgu, tdn):
        return moe.moe_experts_reference(h, ids, w, gu, dn, act=act, trainable_ids=tids, trainable_gate_up=tgu,
                                         trainable_down=tdn)

    with unittest.mock.patch.object(moe, "_moe_op", side_effect=AssertionError("custom op called")):
        got = run(eager, hidden, ids, weights, gate_up, down, grad, tids)
    op = run(lambda h, ids, w, gu, dn, tids, tgu, tdn: _op(h, ids, w, gu, dn, tids, tgu, tdn, act=code, save=True),
             hidden, ids, weights, gate_up, down, grad, tids)
    assert torch.equal(got[0], op[0])
    if trainable:  # expert 5 (slot 1) has no rows
        assert not got[-1][1].any() and not got[-2][1].any()
    for result in (got, op):
        assert_matches_reference(result, run, reference, hidden, ids, weights, gate_up, down, grad, tids)


def test_eager_path_only_for_the_torch_backend_and_plain_tensors(monkeypatch):
    hidden, ids, weights, gate_up, down = _layer(6, 2, 3, 8, 8, torch.float32)
    calls = []
    real = moe._moe_op
    monkeypatch.setattr(moe, "_moe_op", lambda *a: calls.append(1) or real(*a))
    fastdf.moe_experts(hidden, ids, weights, gate_up, down)
    assert calls == []

    class Traced(torch.Tensor):  # a subclass that may carry __torch_function__ behaviour
        pass

    fastdf.moe_experts(hidden.as_subclass(Traced), ids, weights, gate_up, down)
    assert calls == [1]
    with fastdf.backend("triton"):  # another backend asked for: the custom op (the Triton interpreter here)
        fastdf.moe_experts(hidden, ids, weights, gate_up, down)
    assert calls == [1, 1]


@pytest.mark.parametrize("bad,match", [
    (-1, r"topk_ids must lie in \[0, 3\).*\[-1, 2\]"),
    (3, r"topk_ids must lie in \[0, 3\).*\[0, 3\]"),
])
def test_eager_path_refuses_ids_out_of_range(bad, match):
    hidden, ids, weights, gate_up, down = _layer(6, 2, 3, 8, 8, torch.float32)
    ids[2, 1] = bad
    with pytest.raises(ValueError, match=match):
        fastdf.moe_experts(hidden, ids, weights, gate_up, down)
    with pytest.raises(ValueError, match=match):
        fastdf.moe_experts(hidden, ids.int(), weights, gate_up, down)


@pytest.mark.parametrize("tids,match", [(torch.tensor([1, 1]), "unique"), (torch.tensor([0, 3]), r"lie in \[0, 3\)")])
def test_eager_path_refuses_bad_trainable_ids(tids, match):
    hidden, ids, weights, gate_up, down = _layer(6, 2, 3, 8, 8, torch.float32)
    tgu, tdn = gate_up.detach()[:2].clone(), down.detach()[:2].clone()
    with pytest.raises(ValueError, match=match):
        fastdf.moe_experts(hidden, ids, weights, gate_up, down, trainable_ids=tids, trainable_gate_up=tgu,
                           trainable_down=tdn)


def _named_checks_pass(**kw):
    """moe_experts' named checks alone (the accept expression forced False, no op run)."""
    with unittest.mock.patch.object(moe, "_moe_args_ok", lambda *a: False), \
            unittest.mock.patch.object(moe, "_moe_eager", lambda *a: None), \
            unittest.mock.patch.object(moe, "_moe_op", lambda *a: (None,)), \
            unittest.mock.patch.object(moe, "check_moe_values", lambda *a: None):
        try:
            moe.moe_experts(**kw)
        except (TypeError, ValueError):
            return False
    return True


def test_one_expression_accept_agrees_with_the_named_checks():
    """The accept may only take arguments every named check takes (and, for the eager
    path, nonzero sizes on the CPU); it must take the common valid cases."""
    hidden, ids, weights, gate_up, down = _layer(6, 2, 3, 8, 4, torch.float32)
    good = dict(hidden=hidden, topk_ids=ids, topk_weights=weights, gate_up=gate_up, down=down)
    meta = lambda t: t.to("meta")  # noqa: E731
    bad = dict(
        hidden=[hidden.double(), hidden.long(), hidden[:5], hidden[:, :7], hidden[None], meta(hidden), hidden[:0], 1.0],
        topk_ids=[ids.float(), ids.int(), ids[:5], ids[:, :0], ids[..., None], meta(ids), ids.t().contiguous().t()[:, :1],
                  ids.to(torch.int16), "ids"],
        topk_weights=[weights.double(), weights.half(), weights[:, :1], weights.long(), meta(weights), None],
        gate_up=[gate_up.double(), gate_up[:, :15], gate_up[:2], gate_up[..., :7], gate_up[:, :0], gate_up[0],
                 meta(gate_up)],
        down=[down.double(), down[:2], down[..., :3], down[:, :7], meta(down), down[0]],
    )
    for name, values in bad.items():
        for value in values:
            kw = {**good, name: value}
            args = [kw[k] for k in ("hidden", "topk_ids", "topk_weights", "gate_up", "down")]
            if moe._moe_args_ok(*args):
                assert _named_checks_pass(**kw), (name, value)
    assert moe._moe_args_ok(hidden, ids, weights, gate_up, down)
    assert moe._moe_args_ok(hidden, ids.int(), weights.double(), gate_up.detach(), down.detach())
    assert moe._moe_args_ok(hidden.double(), ids, weights, gate_up.double(), down.double())
    assert _named_checks_pass(**good)


LAYOUTS = [
    ("contiguous", lambda x, w: (x, w)),
    ("HF weights read transposed", lambda x, w: (x, w.transpose(1, 2).contiguous().transpose(1, 2))),
    ("x rows padded to 16 bytes", lambda x, w: (torch.nn.functional.pad(x, (0, 4))[:, : x.shape[1]], w)),
    ("x rows padded to 4 bytes", lambda x, w: (torch.nn.functional.pad(x, (0, 1))[:, : x.shape[1]], w)),
    ("x column-major", lambda x, w: (x.t().contiguous().t(), w)),
    ("x 4-byte offset", lambda x, w: (torch.cat([x.new_zeros(1), x.reshape(-1)])[1:].view(x.shape), w)),
    ("w every other column", lambda x, w: (x, torch.repeat_interleave(w, 2, -1)[..., ::2])),
    ("w expert-strided", lambda x, w: (x, torch.cat([w, w], 1)[:, : w.shape[1]])),
]


@pytest.mark.parametrize("name,layout", LAYOUTS, ids=[n for n, _ in LAYOUTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_mm_native_only_where_torch_takes_it_and_bitwise(name, layout, dtype):
    """The predicate says yes only where torch._grouped_mm runs (and for the MoE path's
    layouts), and the result is the reference's bits either way; rows past the last
    group are zeros."""
    g = torch.Generator().manual_seed(4)
    x, w = layout(torch.randn(45, 24, generator=g).to(dtype), torch.randn(4, 24, 16, generator=g).to(dtype))
    offs = torch.tensor([5, 5, 21, 39], dtype=torch.int32)  # an empty group and a zero tail
    try:
        torch._grouped_mm(x, w, offs=offs)
        torch_takes_it = True
    except RuntimeError:
        torch_takes_it = False
    native = grouped_mm_cpu_native(x, w)
    assert torch_takes_it or not native, "the predicate takes a layout torch._grouped_mm refuses"
    # Stricter than torch only on purpose (data alignment it does not check on the CPU):
    # the layouts the MoE path produces must be taken.
    assert native or name not in ("contiguous", "HF weights read transposed", "w expert-strided")
    out = grouped_mm_loop(x, w, offs)
    assert torch.equal(out, grouped_mm_reference(x, w, offs))
    assert torch.equal(out[39:], torch.zeros_like(out[39:]))


def test_grouped_mm_loop_without_a_native_cpu_kernel(monkeypatch):
    """A torch without torch._grouped_mm on the CPU (before 2.9): the Python loop, same bits."""
    gm = importlib.import_module("fastdf.ops.grouped_mm")  # fastdf.ops.grouped_mm is also a function's name

    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(30, 16, generator=g), torch.randn(3, 16, 8, generator=g)
    offs = torch.tensor([4, 19, 30], dtype=torch.int32)
    assert grouped_mm_cpu_native(x, w)
    monkeypatch.setattr(gm, "_NATIVE_CPU", [False])
    monkeypatch.setattr(torch, "_grouped_mm", None)  # would raise TypeError if called
    assert not grouped_mm_cpu_native(x, w)
    assert torch.equal(grouped_mm_loop(x, w, offs), grouped_mm_reference(x, w, offs))
    hidden, ids, weights, gate_up, down = _layer(12, 2, 3, 8, 8, torch.float32)
    with torch.no_grad():
        assert torch.equal(fastdf.moe_experts(hidden, ids, weights, gate_up, down),
                           moe.moe_experts_reference(hidden, ids, weights, gate_up, down))


def test_grouped_mm_native_refuses_zero_sizes_and_fp64():
    assert not grouped_mm_cpu_native(torch.randn(0, 8), torch.randn(2, 8, 8))
    assert not grouped_mm_cpu_native(torch.randn(4, 0), torch.randn(2, 0, 8))
    assert not grouped_mm_cpu_native(torch.randn(4, 8).double(), torch.randn(2, 8, 8).double())
    assert not grouped_mm_cpu_native(torch.randn(4, 8), torch.randn(2, 8, 8).half())


def test_merge_lerp_within_the_rule_at_large_lse_gaps():
    """fp32 merge (sigmoid weight, lerp) against the float64 reference under the 2x rule:
    gaps from -40 to 40 (weights at 0, 1 and every rounding regime between) and outputs of
    unequal magnitude (the w ~ 1 side of lerp multiplies o_a - o_b by 1 - w)."""
    g = torch.Generator().manual_seed(6)
    rows, D = 400, 16
    gap = torch.linspace(-40, 40, rows)
    lse_b = torch.randn(rows, generator=g) * 10
    lse_a = lse_b + gap
    o_a = torch.randn(rows, D, generator=g)
    o_b = torch.randn(rows, D, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    out = fastdf.merge_attention_states(o_a, lse_a, o_b, lse_b)
    assert_matches_reference(out, merge_attention_states_reference, o_a, lse_a, o_b, lse_b)

"""Property-based checks of the public op surface (issue #9).

For every public op, hypothesis draws a random *valid* call (sizes including 1, odd sizes,
strided views, GQA, optional knobs, fp32/fp16) and a random *invalid* mutation of one
argument (wrong type, dtype, rank or size; NaN / inf / float32-overflowing knobs; bools
and floats where ints belong; out-of-range ids and lengths). On every backend that can
run here:
- a valid call matches the torch reference (the 2x-torch-error rule, exact for ids);
- an invalid call raises ValueError or TypeError whose message names the argument;
- no call, good or bad, changes its inputs.
Seeds are fixed (derandomize) and examples bounded so the file stays well under a minute
on 2 cores with the Triton interpreter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fastdf
from fastdf.ops import REGISTRY
from fastdf.ops.adaln import adaln_modulate_reference, gated_residual_reference
from fastdf.ops.attention import df_attention_reference
from fastdf.ops.cascade import merge_attention_states_reference, shared_prefix_attention_reference
from fastdf.ops.grouped_mm import grouped_mm_reference
from fastdf.ops.moe import moe_experts_reference
from fastdf.ops.sampling import sample_reference
from fastdf.testing import assert_matches_reference

# No shrinking: a failing kernel call under the interpreter is slow to shrink, and the
# drawn call printed with the failure is small already.
_COMMON = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
               phases=(Phase.explicit, Phase.generate))
VALID = settings(max_examples=12, **_COMMON)
INVALID = settings(max_examples=40, **_COMMON)

NAN, INF = float("nan"), float("inf")
# Finite in Python, not in float32 (or not a usable value at all).
BAD_FLOATS = [NAN, INF, -INF, 1e300]


@dataclass
class Call:
    fn: Callable
    args: dict  # every argument by name (positional ones first, in order)
    positional: tuple
    reference: Callable | None = None  # same arguments -> expected output
    exact: bool = False  # integer outputs: equal, not by rule

    def run(self, **override):
        values = {**self.args, **override}
        pos = [values[n] for n in self.positional]
        kw = {n: v for n, v in values.items() if n not in self.positional}
        return self.fn(*pos, **kw)


@dataclass
class Case:
    op: str  # REGISTRY name (backends) or a plain label
    build: Callable  # draw -> Call
    mutations: list = field(default_factory=list)  # (argument name, names accepted in the message, draw, call -> bad value)


def snapshot(values):
    return {n: v.detach().clone() for n, v in values.items() if isinstance(v, torch.Tensor)}


def assert_unchanged(before, values):
    for n, t in before.items():
        now = values[n].detach()
        assert now.dtype == t.dtype and now.shape == t.shape, f"{n} changed shape/dtype"
        assert torch.equal(torch.nan_to_num(now.double(), nan=1.5e300), torch.nan_to_num(t.double(), nan=1.5e300)), \
            f"the call changed its input {n}"


def names_argument(message: str, names) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


# --------------------------------------------------------------------------- builders

def build_attention(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    B, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    tq = draw(st.integers(1, 6))
    tk = tq + draw(st.integers(0, 5))
    D = draw(st.sampled_from([4, 8, 12]))
    causal = draw(st.booleans())
    frame = draw(st.integers(1, 3))
    window = draw(st.one_of(st.none(), st.integers(1, 3))) if causal else None
    sinks = draw(st.integers(0, 2)) if window is not None else 0
    scale = draw(st.one_of(st.none(), st.floats(0.05, 1.0)))
    strided = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def heads(h, t):  # [B, T, H, D] storage viewed as [B, H, T, D] when strided
        if strided:
            return torch.randn(B, t, h, D, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(B, h, t, D, generator=g).to(dtype)

    args = dict(q=heads(hkv * group, tq), k=heads(hkv, tk), v=heads(hkv, tk), frame_size=frame, causal=causal,
                window_frames=window, sink_frames=sinks, scale=scale)

    def reference(q, k, v, **kw):
        return df_attention_reference(q, k, v, **kw)[0]

    return Call(fastdf.df_attention, args, ("q", "k", "v"), reference)


ATTENTION_MUTATIONS = [
    ("q", ["q"], lambda c: c.args["q"].tolist()),
    ("q", ["q"], lambda c: c.args["q"].to(torch.int64)),
    ("q", ["q"], lambda c: c.args["q"][0]),
    ("k", ["k", "q"], lambda c: c.args["k"][..., :-1]),
    ("v", ["v", "k"], lambda c: c.args["v"].to(torch.float64 if c.args["v"].dtype != torch.float64 else torch.float32)),
    ("q", ["q", "k", "Tq", "Tk"], lambda c: torch.cat([c.args["q"]] * 2 + [c.args["k"][:, :1].expand(-1, c.args["q"].shape[1], -1, -1)], 2)),
    ("frame_size", ["frame_size"], lambda c: 0),
    ("frame_size", ["frame_size"], lambda c: 1.5),
    ("frame_size", ["frame_size"], lambda c: True),
    ("frame_size", ["frame_size"], lambda c: "2"),
    ("scale", ["scale"], lambda c: NAN),
    ("scale", ["scale"], lambda c: INF),
    ("scale", ["scale"], lambda c: 1e300),
    ("scale", ["scale"], lambda c: -1.0),
    ("scale", ["scale"], lambda c: "0.5"),
    ("sink_frames", ["sink_frames"], lambda c: -1),
    ("sink_frames", ["sink_frames"], lambda c: 1.0),
    ("window_frames", ["window_frames"], lambda c: 0),
    ("window_frames", ["window_frames"], lambda c: 2.5),
    ("causal", ["causal"], lambda c: "yes"),
]


def build_adaln(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    B, F, S, C = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.sampled_from([4, 7, 16]))
    norm = draw(st.sampled_from(["layer", "rms"]))
    affine = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    args = dict(x=r(B, F * S, C), shift=r(B, F, C), scale=r(B, F, C), norm=norm,
                weight=r(C) if affine else None, bias=r(C) if affine else None,
                eps=draw(st.sampled_from([1e-6, 1e-5])))
    return Call(fastdf.adaln_modulate, args, ("x", "shift", "scale"), adaln_modulate_reference)


ADALN_MUTATIONS = [
    ("x", ["x"], lambda c: c.args["x"].to(torch.int64)),
    ("x", ["x"], lambda c: c.args["x"][0]),
    ("shift", ["shift"], lambda c: c.args["shift"][..., :-1]),
    ("scale", ["scale"], lambda c: torch.cat([c.args["scale"], c.args["scale"][:, :1]], 1)
     if c.args["x"].shape[1] % (c.args["scale"].shape[1] + 1) else c.args["scale"][:, :, :-1]),
    ("norm", ["norm"], lambda c: "batch"),
    ("eps", ["eps"], lambda c: NAN),
    ("eps", ["eps"], lambda c: -1.0),
    ("eps", ["eps"], lambda c: INF),
    ("eps", ["eps"], lambda c: 1e300),
    ("eps", ["eps"], lambda c: "1e-6"),
    ("weight", ["weight"], lambda c: torch.ones(c.args["x"].shape[-1] + 1, dtype=c.args["x"].dtype)),
]


def build_gated(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    B, F, S, C = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.sampled_from([4, 7]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    args = dict(x=r(B, F * S, C), y=r(B, F * S, C), gate=r(B, F, C))
    return Call(fastdf.gated_residual, args, ("x", "y", "gate"), gated_residual_reference)


GATED_MUTATIONS = [
    ("x", ["x"], lambda c: c.args["x"].bool()),
    ("y", ["y", "x"], lambda c: c.args["y"][:, :, :-1]),
    ("gate", ["gate"], lambda c: c.args["gate"][0]),
    ("gate", ["gate"], lambda c: [1.0]),
]


def _offs(draw, rows, experts):
    cuts = sorted(draw(st.lists(st.integers(0, rows), min_size=experts, max_size=experts)))
    return cuts


def build_grouped_mm(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    S, K, N, E = draw(st.integers(1, 9)), draw(st.sampled_from([4, 8, 12])), draw(st.sampled_from([4, 8, 10])), draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(S, K, generator=g).to(dtype)
    w = torch.randn(E, N, K, generator=g).to(dtype).transpose(1, 2) if draw(st.booleans()) else \
        torch.randn(E, K, N, generator=g).to(dtype)
    ends = torch.tensor(_offs(draw, S, E), dtype=torch.int32)
    if draw(st.booleans()):  # a strided view: the class of the non-contiguous offs bug
        wide = torch.zeros(2 * E, dtype=torch.int32)
        wide[::2] = ends
        ends = wide[::2]
    args = dict(x=x, w=w, offs=ends, trainable_w=None, trainable_ids=None)
    if draw(st.booleans()):
        ids = sorted(draw(st.sets(st.integers(0, E - 1), min_size=1, max_size=E)))
        args["trainable_ids"] = torch.tensor(ids, dtype=torch.int64)
        args["trainable_w"] = torch.randn(len(ids), K, N, generator=g).to(dtype)
    return Call(fastdf.grouped_mm, args, ("x", "w", "offs"), grouped_mm_reference)


GROUPED_MUTATIONS = [
    ("x", ["x"], lambda c: c.args["x"].to(torch.int32)),
    ("w", ["w", "x"], lambda c: c.args["w"][:, :-1]),
    ("offs", ["offs"], lambda c: c.args["offs"].float()),
    ("offs", ["offs"], lambda c: c.args["offs"].tolist()),
    ("offs", ["offs"], lambda c: torch.cat([c.args["offs"], c.args["offs"][-1:]])),
    ("offs", ["offs"], lambda c: c.args["offs"] + c.args["x"].shape[0] + 1),
    ("offs", ["offs"], lambda c: c.args["offs"] - c.args["offs"].max() - 1),
]


def build_moe(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    T, K, E, H, I = (draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 4)),
                     draw(st.sampled_from([4, 8])), draw(st.sampled_from([4, 6])))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    args = dict(hidden=torch.randn(T, H, generator=g).to(dtype),
                topk_ids=torch.randint(0, E, (T, K), generator=g),
                topk_weights=torch.rand(T, K, generator=g).to(dtype),
                gate_up=(torch.randn(E, 2 * I, H, generator=g) * 0.5).to(dtype),
                down=(torch.randn(E, H, I, generator=g) * 0.5).to(dtype),
                act=draw(st.sampled_from(["silu", "gelu"])))
    return Call(fastdf.moe_experts, args, ("hidden", "topk_ids", "topk_weights", "gate_up", "down"),
                moe_experts_reference)


MOE_MUTATIONS = [
    ("hidden", ["hidden"], lambda c: c.args["hidden"].long()),
    ("topk_ids", ["topk_ids"], lambda c: c.args["topk_ids"].float()),
    ("topk_ids", ["topk_ids"], lambda c: c.args["topk_ids"].bool()),
    ("topk_ids", ["topk_ids"], lambda c: c.args["topk_ids"] + c.args["gate_up"].shape[0]),
    ("topk_ids", ["topk_ids"], lambda c: c.args["topk_ids"] - c.args["gate_up"].shape[0]),
    ("topk_weights", ["topk_weights", "topk_ids"], lambda c: c.args["topk_weights"][:, :0]
     if c.args["topk_weights"].shape[1] > 1 else c.args["topk_weights"][:0]),
    ("gate_up", ["gate_up"], lambda c: c.args["gate_up"][:, :-1]),
    ("down", ["down", "gate_up"], lambda c: c.args["down"][..., :-1]),
    ("act", ["act"], lambda c: "swish7"),
]


def build_sample(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    B, V = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 7, 33]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    args = dict(logits=logits, temperature=draw(st.sampled_from([0.0, 0.7, 1.0])),
                top_k=draw(st.integers(0, V + 1)), top_p=draw(st.sampled_from([0.5, 0.9, 1.0])),
                min_p=draw(st.sampled_from([0.0, 0.1])), seed=draw(st.integers(0, 1000)))

    def call(logits, temperature, top_k, top_p, min_p, seed, **extra):
        return fastdf.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             generator=torch.Generator().manual_seed(seed), **extra)

    def reference(logits, temperature, top_k, top_p, min_p, seed):
        u = torch.rand(logits.shape[0], generator=torch.Generator().manual_seed(seed))
        full = lambda v, dt: torch.full((logits.shape[0],), v, dtype=dt)  # noqa: E731
        return sample_reference(logits, u, full(temperature, torch.float32), full(top_k, torch.int64),
                                full(top_p, torch.float32), full(min_p, torch.float32))[0]

    return Call(call, args, (), reference, exact=True)


SAMPLE_MUTATIONS = [
    ("logits", ["logits"], lambda c: c.args["logits"].long()),
    ("logits", ["logits"], lambda c: c.args["logits"][0]),
    ("temperature", ["temperature"], lambda c: NAN),
    ("temperature", ["temperature"], lambda c: 1e300),
    ("temperature", ["temperature"], lambda c: -1.0),
    ("temperature", ["temperature"], lambda c: "1"),
    ("temperature", ["temperature"], lambda c: torch.full((c.args["logits"].shape[0],), NAN)),
    ("top_k", ["top_k"], lambda c: -1),
    ("top_k", ["top_k"], lambda c: 1.5),
    ("top_k", ["top_k"], lambda c: True),
    ("top_p", ["top_p"], lambda c: 0.0),
    ("top_p", ["top_p"], lambda c: 1.5),
    ("top_p", ["top_p"], lambda c: NAN),
    ("min_p", ["min_p"], lambda c: -0.1),
    ("min_p", ["min_p"], lambda c: NAN),
]


def build_merge(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    D = draw(st.sampled_from([1, 5, 8]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def lse():
        x = torch.randn(*lead, generator=g) * 4
        empty = torch.rand(*lead, generator=g) < 0.2  # rows that saw no key
        return x.masked_fill(empty, -INF)

    args = dict(o_a=torch.randn(*lead, D, generator=g).to(dtype), lse_a=lse(),
                o_b=torch.randn(*lead, D, generator=g).to(dtype), lse_b=lse())
    return Call(fastdf.merge_attention_states, args, ("o_a", "lse_a", "o_b", "lse_b"),
                merge_attention_states_reference)


MERGE_MUTATIONS = [
    ("o_a", ["o_a"], lambda c: c.args["o_a"].long()),
    ("lse_a", ["lse_a"], lambda c: c.args["lse_a"].half()),
    ("lse_b", ["lse_b", "o_b"], lambda c: c.args["lse_b"][..., :0]),
    ("o_b", ["o_b", "o_a"], lambda c: torch.cat([c.args["o_b"], c.args["o_b"]], -1)),
    ("o_b", ["o_b"], lambda c: None),
]


def build_shared_prefix(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    G, N, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    P, S, D = draw(st.integers(1, 6)), draw(st.integers(1, 4)), draw(st.sampled_from([4, 8]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    plens = torch.randint(0, P + 1, (G,), generator=g) if draw(st.booleans()) else None
    slens = torch.randint(0, S + 1, (G, N), generator=g) if draw(st.booleans()) else None
    if slens is not None and draw(st.booleans()):
        slens = slens.t().contiguous().t()  # a transposed view
    args = dict(q=r(G, N, hkv * group, D), k_prefix=r(G, hkv, P, D), v_prefix=r(G, hkv, P, D),
                k_suffix=r(G, N, hkv, S, D), v_suffix=r(G, N, hkv, S, D), prefix_lens=plens,
                suffix_lens=slens, scale=draw(st.one_of(st.none(), st.floats(0.1, 1.0))))

    def reference(q, k_prefix, v_prefix, k_suffix, v_suffix, prefix_lens, suffix_lens, scale):
        pl = prefix_lens if prefix_lens is not None else torch.full((G,), P)
        sl = suffix_lens if suffix_lens is not None else torch.full((G, N), S)
        return shared_prefix_attention_reference(q, k_prefix, v_prefix, k_suffix, v_suffix, pl, sl,
                                                 D ** -0.5 if scale is None else scale)[0].to(q.dtype)

    return Call(fastdf.shared_prefix_attention, args, ("q", "k_prefix", "v_prefix", "k_suffix", "v_suffix"),
                reference)


def _lens(c, name, value):
    shape = (c.args["q"].shape[0],) if name == "prefix_lens" else tuple(c.args["q"].shape[:2])
    return torch.full(shape, value, dtype=torch.int64)


SHARED_PREFIX_MUTATIONS = [
    ("q", ["q"], lambda c: c.args["q"].long()),
    ("k_prefix", ["k_prefix", "q"], lambda c: c.args["k_prefix"][..., :-1]),
    ("v_suffix", ["v_suffix", "k_suffix"], lambda c: c.args["v_suffix"][:, :, :, :0]
     if c.args["v_suffix"].shape[3] > 0 else c.args["v_suffix"][0]),
    ("prefix_lens", ["prefix_lens"], lambda c: _lens(c, "prefix_lens", 1).float()),
    ("suffix_lens", ["suffix_lens"], lambda c: _lens(c, "suffix_lens", 1)[0]),
    ("scale", ["scale"], lambda c: NAN),
    ("scale", ["scale"], lambda c: 1e300),
    ("scale", ["scale"], lambda c: -INF),
]

CASES = [
    Case("df_attention", build_attention, ATTENTION_MUTATIONS),
    Case("adaln_modulate", build_adaln, ADALN_MUTATIONS),
    Case("gated_residual", build_gated, GATED_MUTATIONS),
    Case("grouped_mm", build_grouped_mm, GROUPED_MUTATIONS),
    Case("moe_experts", build_moe, MOE_MUTATIONS),
    Case("sample", build_sample, SAMPLE_MUTATIONS),
    Case("merge_attention_states", build_merge, MERGE_MUTATIONS),
    Case("shared_prefix_attention", build_shared_prefix, SHARED_PREFIX_MUTATIONS),
]


def _params():
    out = []
    for case in CASES:
        for name in REGISTRY[case.op].backends:
            if name == "cuda":
                continue  # csrc kernels: tests/cuda_cpu runs them on the CPU; the GPU run covers this file too
            out.append(pytest.param(case, name, id=f"{case.op}-{name}"))
    return out


def _enter(backend_name):
    reason = fastdf.ops.unavailable_reason(backend_name, "cpu")
    if reason:
        pytest.skip(f"{backend_name} unavailable: {reason}")
    return fastdf.backend(backend_name)


@pytest.mark.parametrize("case, backend_name", _params())
def test_valid_calls_match_reference_and_leave_inputs_alone(case, backend_name):
    with _enter(backend_name):
        @VALID
        @given(st.data())
        def check(data):
            call = data.draw(st.composite(lambda d: case.build(d))())
            before = snapshot(call.args)
            out = call.run()
            assert_unchanged(before, call.args)
            if call.exact:
                assert torch.equal(out, call.reference(**call.args))
                return
            assert_matches_reference(out, lambda *a: call.reference(**dict(zip(call.args, a))), *call.args.values())

        check()


@pytest.mark.parametrize("case, backend_name", _params())
def test_invalid_calls_name_the_argument_and_change_nothing(case, backend_name):
    with _enter(backend_name):
        @INVALID
        @given(st.data())
        def check(data):
            call = data.draw(st.composite(lambda d: case.build(d))())
            arg, names, bad = data.draw(st.sampled_from(case.mutations))
            value = bad(call)
            before = snapshot(call.args)
            with pytest.raises((ValueError, TypeError)) as info:
                call.run(**{arg: value})
            assert names_argument(str(info.value), names), (
                f"{case.op}: bad {arg} raised {type(info.value).__name__}({info.value}) without naming {names}")
            assert_unchanged(before, call.args)

        check()


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_shared_prefix_lengths_out_of_range_are_clamped(backend_name):
    """Lengths are documented as clamped to [0, P] / [0, S] (refusing them would cost a host
    sync per decode step): values far outside, int64 beyond int32 included, must act
    exactly as the clamped lengths and never wrap."""
    with _enter(backend_name):
        @VALID
        @given(st.data())
        def check(data):
            call = data.draw(st.composite(lambda d: build_shared_prefix(d))())
            P, S = call.args["k_prefix"].shape[2], call.args["k_suffix"].shape[3]
            G, N = call.args["q"].shape[:2]
            pl = torch.tensor(data.draw(st.lists(st.sampled_from([-1, -(2**31) - 5, 0, P, P + 1, 2**31, 2**32 + 1]),
                                                 min_size=G, max_size=G)), dtype=torch.int64)
            sl = torch.tensor(data.draw(st.lists(st.sampled_from([-7, 0, S, S + 3, 2**32 + 1, 2**40]),
                                                 min_size=G * N, max_size=G * N)), dtype=torch.int64).view(G, N)
            out = call.run(prefix_lens=pl, suffix_lens=sl)
            want = call.run(prefix_lens=pl.clamp(0, P), suffix_lens=sl.clamp(0, S))
            assert torch.equal(out, want)

        check()


def test_every_public_op_is_covered():
    covered = {c.op for c in CASES}
    public = {n for n in fastdf.__all__ if n in REGISTRY}
    assert public <= covered, f"public ops without property checks: {sorted(public - covered)}"


def test_float_helpers_are_sane():
    assert math.isnan(NAN) and names_argument("scale must be finite", ["scale"])
    assert not names_argument("rescale must be finite", ["scale"])

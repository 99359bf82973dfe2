"""csrc/cascade.cu (merge_states_kernel) on the CPU against
fastdf.ops.cascade.merge_attention_states_reference.

Within tolerance, not bit-exact: the kernel computes expf/logf with the device's (here:
glibc's) implementations and nvcc contracts ``wa * va + wb * vb`` into an FMA, while the
reference uses torch's exp/logaddexp. lse to 2 ulp-ish in fp32; o to the output dtype's
rounding. Non-finite lse follow the reference exactly (NaN where it has NaN, -inf and
zeros where both states are empty).
"""

import pytest
import torch

from fastdf.ops.cascade import merge_attention_states_reference

TOL = {torch.float32: (2e-6, 2e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


def check(emu, o_a, lse_a, o_b, lse_b):
    o, lse = emu.merge(o_a, lse_a, o_b, lse_b)
    ro, rlse = merge_attention_states_reference(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(lse, rlse, rtol=2e-6, atol=2e-6, equal_nan=True)
    rtol, atol = TOL[o_a.dtype]
    torch.testing.assert_close(o.float(), ro.float(), rtol=rtol, atol=atol, equal_nan=True)
    return o, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead, d", [((5,), 1), ((2, 3), 33), ((1, 2, 3, 2), 64), ((3, 1, 2), 257), ((7,), 31)])
def test_shapes_and_head_dims(emu, dtype, lead, d):
    gen = torch.Generator().manual_seed(d)
    o_a = torch.randn(*lead, d, generator=gen).to(dtype)
    o_b = torch.randn(*lead, d, generator=gen).to(dtype)
    lse_a = torch.randn(*lead, generator=gen) * 4
    lse_b = torch.randn(*lead, generator=gen) * 4
    check(emu, o_a, lse_a, o_b, lse_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_states(emu, dtype):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(6, 4, 40, generator=gen).to(dtype)
    o_a = base[:, :, :33]  # padded rows
    o_b = torch.randn(4, 6, 33, generator=gen).to(dtype).transpose(0, 1)  # permuted leading dims
    lse_a = torch.randn(4, 6, generator=gen).t()
    lse_b = torch.randn(6, 4, generator=gen)
    check(emu, o_a, lse_a, o_b, lse_b)


def test_non_finite_lse(emu):
    inf, nan = float("inf"), float("nan")
    # Not (x, x) with large |x|: the reference computes its weights as exp(lse_a - lse) with lse =
    # x + log 2 rounded to ulp(x), so they are off by ~ulp(x) (at |x| >~ 1e7 they sum to 2),
    # while the kernel normalises by the sum of its weights (reported).
    pairs = [(-inf, -inf), (-inf, 0.5), (0.5, -inf), (nan, -inf), (-inf, nan), (nan, 1.0), (nan, nan), (80.0, -80.0),
             (1e30, -1e30), (-30.0, -30.0), (inf, 0.5), (0.5, inf), (inf, inf), (inf, -inf), (inf, nan)]
    lse_a = torch.tensor([a for a, _ in pairs])
    lse_b = torch.tensor([b for _, b in pairs])
    gen = torch.Generator().manual_seed(0)
    o_a = torch.randn(len(pairs), 9, generator=gen)
    o_b = torch.randn(len(pairs), 9, generator=gen)
    o, lse = check(emu, o_a, lse_a, o_b, lse_b)
    assert lse[0] == -inf and torch.equal(o[0], torch.zeros(9))  # both empty: zeros and -inf
    assert torch.equal(o[1], o_b[1]) and torch.equal(o[2], o_a[2])
    assert torch.isnan(lse[3:7]).all() and torch.isnan(o[3:7]).all()
    assert lse[10:14].tolist() == [inf] * 4


def test_empty_state_contributes_exactly_zero(emu):
    """An empty state's o is not read into the sum: NaN there must not poison the merge."""
    inf = float("inf")
    o_a = torch.full((3, 5), float("nan"))
    o_b = torch.randn(3, 5)
    o, lse = check(emu, o_a, torch.tensor([-inf, -inf, -inf]), o_b, torch.tensor([0.3, -inf, inf]))
    assert torch.equal(o[0], o_b[0]) and torch.equal(o[1], torch.zeros(5))


def test_regression_nan_lse_next_to_empty_state(emu):
    """fmaxf(NaN, -inf) is -inf, so a NaN lse merged with an empty state came out as an
    empty state (o = 0, lse = -inf); the reference (and any NaN-propagating merge) says NaN."""
    nan, inf = float("nan"), float("inf")
    o, lse = emu.merge(torch.ones(2, 4), torch.tensor([nan, -inf]), torch.ones(2, 4), torch.tensor([-inf, nan]))
    assert torch.isnan(lse).all()
    assert torch.isnan(o).all()

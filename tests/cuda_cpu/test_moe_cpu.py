"""csrc/moe.cu (route_histogram, route_scan, route_place, gather_rows, combine_rows) on the
CPU against fastdf.ops.moe's references.

Routing and gather are integer/copy operations: compared bit-exact (order, inverse, offs,
gathered rows). combine sums fp32 products in slot order; the emulation is built with
-ffp-contract=off, so here it is bit-exact with moe_combine_reference, while nvcc
contracts ``acc += w * v`` into an FMA on the GPU: there it is within one rounding per
slot (the tolerance the GPU tests use).
"""

import pytest
import torch

from cuda_cpu_harness import KernelError
from fastdf.ops.moe import moe_combine_reference, moe_gather_reference, moe_route_reference

CHUNK = 1024  # kRouteChunk


def check_route(emu, ids, E):
    got = emu.moe_route(ids, E)
    ref = moe_route_reference(ids, E)
    for name, a, b in zip(("order", "inverse", "offs"), got, ref):
        assert torch.equal(a, b), name
    return got


@pytest.mark.parametrize("E", [1, 2, 7, 64, 257])
@pytest.mark.parametrize("n_tokens, k", [(1, 1), (5, 2), (256, 4), (1025, 1), (600, 6)])
def test_route_random(emu, E, n_tokens, k):
    gen = torch.Generator().manual_seed(E * 1000 + n_tokens)
    ids = torch.randint(0, E, (n_tokens, k), generator=gen)
    check_route(emu, ids, E)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_route_out_of_range_skewed_and_empty_experts(emu, dtype):
    gen = torch.Generator().manual_seed(1)
    E = 16
    ids = torch.randint(0, 3, (1500, 2), generator=gen)  # experts 3..15 empty
    ids[::7, 0] = 5
    ids[::11, 1] = -1  # out of range: sort to the tail
    ids[::13, 0] = E
    ids[::17, 1] = 2**31 - 1 if dtype == torch.int32 else 2**40
    ids[3, 0] = -(2**31) if dtype == torch.int32 else -(2**40)
    order, inverse, offs = check_route(emu, ids.to(dtype), E)
    assert offs[-1] < ids.numel()  # the out-of-range pairs lie past offs[-1]


def test_route_all_pairs_to_one_expert(emu):
    ids = torch.full((3 * CHUNK + 5, 1), 3)
    _, _, offs = check_route(emu, ids, 8)
    assert offs.tolist() == [0, 0, 0, ids.numel()] + [ids.numel()] * 4


@pytest.mark.parametrize("n", [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK])
def test_route_chunk_boundaries(emu, n):
    gen = torch.Generator().manual_seed(n)
    check_route(emu, torch.randint(-1, 10, (n, 1), generator=gen), 9)


def test_route_no_pairs(emu):
    order, inverse, offs = emu.moe_route(torch.zeros(0, 2, dtype=torch.long), 5)
    assert order.numel() == 0 and inverse.shape == (0, 2) and offs.tolist() == [0] * 5


@pytest.mark.parametrize("E", [4096, 12287])
def test_route_most_experts(emu, sweep, E):
    """12287 experts: E + 1 bucket counters fill the 48 KiB of shared memory exactly."""
    gen = torch.Generator().manual_seed(E)
    n = 3000 if sweep else 1200
    check_route(emu, torch.randint(-5, E + 5, (n, 2), generator=gen), E)


def test_route_too_many_experts_is_refused(emu):
    with pytest.raises(KernelError, match="too many experts"):
        emu.moe_route(torch.zeros(4, 1, dtype=torch.long), 12288)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32])
def test_gather(emu, dtype):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(40, 37, generator=gen) * 100).to(dtype)
    rows = torch.randint(0, 40, (70,), generator=gen, dtype=torch.int32)
    assert torch.equal(emu.moe_gather(x, rows), moe_gather_reference(x, rows))


def test_gather_strided(emu):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 24, generator=gen).half()
    rows = torch.randint(0, 300, (50,), generator=gen, dtype=torch.int32)
    ref = moe_gather_reference(x, rows)
    assert torch.equal(emu.moe_gather(x, rows, x_stride=(1, 300)), ref)  # column-major source
    assert torch.equal(emu.moe_gather(x, rows, out_stride=(30, 1)), ref)  # padded output rows
    assert torch.equal(emu.moe_gather(x, rows, out_stride=(1, 50)), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_combine(emu, dtype, weighted):
    gen = torch.Generator().manual_seed(4)
    T, K, H = 33, 3, 300
    y = torch.randn(T * K, H, generator=gen).to(dtype)
    inverse = torch.randperm(T * K, generator=gen).view(T, K).int()
    w = torch.rand(T, K, generator=gen) if weighted else None
    got = emu.moe_combine(y, inverse, w)
    ref = moe_combine_reference(y, inverse, w)
    assert torch.equal(got, ref)  # -ffp-contract=off: the same roundings as the reference


def test_combine_strided_and_special_values(emu):
    gen = torch.Generator().manual_seed(5)
    T, K, H = 6, 2, 17
    y = torch.randn(H, T * K, generator=gen).t()  # column-major
    y[0, 3] = float("inf")
    y[5, 0] = float("nan")
    inverse = torch.arange(T * K).view(T, K).int()
    w = torch.rand(T, K, generator=gen)
    ref = moe_combine_reference(y, inverse, w)
    got = emu.moe_combine(y, inverse, w, y_stride=y.stride(), out_stride=(1, T))
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)

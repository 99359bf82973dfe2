"""csrc/sampling.cu executed on the CPU against fastdf.ops.sampling.sample_reference.

Token choice is compared bit-exact: the reference is the specification and the kernel's
cuts are thresholds on logits, so for a given uniform both pick the same token unless a
float sum lands within rounding of a boundary (probability ~1e-6 per row for the random
inputs here; the inputs are seeded, so a test cannot flake). Status codes are exact too.
"""

import pytest
import torch

from fastdf.ops.sampling import STATUS_NO_FINITE, STATUS_NON_FINITE, STATUS_OK, sample_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _per_row(value, rows, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.full((rows,), value, dtype=dtype)


def reference(x, u, *, indices=None, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    rows = x.shape[0]
    return sample_reference(x, u, _per_row(temperature, rows, torch.float32), _per_row(top_k, rows, torch.int64),
                            _per_row(top_p, rows, torch.float32), _per_row(min_p, rows, torch.float32), indices)


def run(emu, x, u, *, indices=None, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, cap=-1, stride=None):
    """The kernel with each knob scalar, or per row where a tensor is given."""
    tensor = lambda v: v if isinstance(v, torch.Tensor) else None  # noqa: E731
    scalar = lambda v, d: d if isinstance(v, torch.Tensor) else v  # noqa: E731
    return emu.sample(
        x, u, indices=indices, temperature=None if tensor(temperature) is None else temperature.float(),
        top_k=None if tensor(top_k) is None else top_k.long(), top_p=None if tensor(top_p) is None else top_p.float(),
        min_p=None if tensor(min_p) is None else min_p.float(), temperature_value=scalar(temperature, 1.0),
        top_k_value=scalar(top_k, 0), top_p_value=scalar(top_p, 1.0), min_p_value=scalar(min_p, 0.0),
        candidate_cap=cap, logits_stride=stride)


def check(emu, x, u, with_status=False, **kw):
    """The kernel's ids (and status) after asserting both equal the reference's."""
    ids, status = run(emu, x, u, **kw)
    ref_kw = {k: v for k, v in kw.items() if k not in ("cap", "stride")}
    ref_ids, ref_status = reference(x, u, **ref_kw)
    assert torch.equal(status, ref_status), (status, ref_status)
    assert torch.equal(ids, ref_ids), (ids, ref_ids)
    return (ids, status) if with_status else ids


def _logits(rows, vocab, dtype, gen, scale=3.0):
    return (torch.randn(rows, vocab, generator=gen) * scale).to(dtype)


MIXED = dict(  # one row per knob combination, all per-row tensors
    temperature=torch.tensor([1.0, 0.7, 1.3, 1.0]),
    top_k=torch.tensor([0, 5, 0, 50]),
    top_p=torch.tensor([1.0, 1.0, 0.8, 0.95]),
    min_p=torch.tensor([0.0, 0.0, 0.0, 0.1]),
)

VOCABS = [1, 2, 31, 32, 33, 2047, 2048, 2049, 4097, 6145, 32000]


@pytest.mark.parametrize("vocab", VOCABS)
def test_vocab_sizes_per_row_knobs(emu, sweep, vocab):
    gen = torch.Generator().manual_seed(vocab)
    dtypes = DTYPES if sweep else (DTYPES[vocab % 3],)
    for dtype in dtypes:
        x = _logits(4, vocab, dtype, gen)
        check(emu, x, torch.rand(4, generator=gen), **MIXED)


@pytest.mark.parametrize("dtype", DTYPES)
def test_largest_vocab(emu, sweep, dtype):
    if dtype != torch.float16 and not sweep:
        pytest.skip("FASTDF_CUDA_CPU_SWEEP=1 runs every dtype at V=152064")
    gen = torch.Generator().manual_seed(7)
    x = _logits(2, 152064, dtype, gen)
    check(emu, x, torch.rand(2, generator=gen), top_k=torch.tensor([0, 40]), top_p=torch.tensor([0.9, 1.0]))


@pytest.mark.parametrize("cap", [0, 1, 100, 2047, 2048, 2049, 4096, 6143, 6144, -1, 1 << 20])
def test_every_candidate_cap(emu, sweep, cap):
    gen = torch.Generator().manual_seed(cap & 0xFFFF)
    for dtype in DTYPES if sweep else (torch.float16, torch.float32):
        peaked = _logits(2, 6145, dtype, gen, scale=4.0)
        flat = torch.randint(-3, 4, (2, 6145), generator=gen).to(dtype)  # everything is a candidate: overflow
        for x in (peaked, flat):
            check(emu, x, torch.rand(2, generator=gen), top_k=torch.tensor([5, 0]), top_p=torch.tensor([0.9, 0.5]),
                  cap=cap)


def test_regression_compaction_race(emu):
    """sampling.cu compacted the candidate list on a vote taken before the barrier: a warp
    that read n_cand early could vote for compaction after the count had passed the cap,
    and the compaction then read never-written slots cand[cap..n-1] as token indices
    (garbage from shared memory: a fault or a wrong token). Issue 10's reproducer."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (1, 2049), generator=gen).to(torch.float16)
    for seed in range(6):  # several thread orders and shared-memory poisons
        emu.configure(seed)
        check(emu, x, torch.rand(1, generator=gen), top_k=5, top_p=0.9, cap=2048)


def test_regression_vector_load(emu):
    """Row.load read a uint4 through a T* (type punning: undefined behaviour, and g++ -O2
    drops the loaded values). Contiguous, 16-byte aligned rows take that path."""
    gen = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        x = _logits(3, 4100, dtype, gen)
        u = torch.rand(3, generator=gen)
        vec = check(emu, x, u)
        strided = check(emu, x, u, stride=(4100 + 1, 1))  # rows not 16-byte aligned: the element-wise path
        assert torch.equal(vec, strided)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 100])
@pytest.mark.parametrize("p", [1.0, 0.9, 0.3])
def test_ties_at_the_kth_value(emu, k, p):
    gen = torch.Generator().manual_seed(k * 10 + int(p * 10))
    x = torch.randint(-4, 5, (3, 300), generator=gen).float()
    x[1, :] = 2.0  # one big tie group
    ids = check(emu, x, torch.rand(3, generator=gen), top_k=k, top_p=p)
    assert x[1, ids[1]] == 2.0


def test_non_finite_rows(emu):
    x = torch.randn(6, 2049)
    x[0, ::2] = float("-inf")  # banned tokens: never drawn
    x[1, :] = float("-inf")  # nothing finite
    x[2, 77] = float("nan")
    x[3, 2048] = float("inf")
    x[4, :-1] = float("-inf")  # a single finite token at the end
    x[5, 3] = float("-inf")
    u = torch.rand(6)
    for dtype in DTYPES:
        xd = x.to(dtype)
        ids, status = check(emu, xd, u, top_k=torch.tensor([0, 3, 0, 0, 7, 2]), top_p=0.9, with_status=True)
        assert status.tolist() == [STATUS_OK, STATUS_NO_FINITE, STATUS_NON_FINITE, STATUS_NON_FINITE, STATUS_OK,
                                   STATUS_OK]
        assert ids[0] % 2 == 1 and ids[4] == 2048 and ids[1:4].tolist() == [-1, -1, -1]
        # greedy sees them too
        check(emu, xd, u, temperature=0.0)


@pytest.mark.parametrize("t", [1e-30, 1e-6, 0.05, 1.0, 10.0, 1e6, 1e30])
def test_temperatures(emu, t):
    gen = torch.Generator().manual_seed(3)
    x = _logits(3, 2100, torch.float32, gen)
    x[2] = torch.randint(-2, 3, (2100,), generator=gen).float()  # ties at the max
    check(emu, x, torch.rand(3, generator=gen), temperature=t, top_k=torch.tensor([0, 20, 3]),
          top_p=torch.tensor([0.9, 1.0, 0.5]), min_p=torch.tensor([0.0, 0.05, 0.0]))


def test_greedy_first_argmax(emu):
    x = torch.zeros(2, 5000)
    x[0, [10, 4000]] = 5.0
    x[1, 4999] = 1.0
    ids = check(emu, x, torch.rand(2), temperature=0.0)
    assert ids.tolist() == [10, 4999]


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_padded_rows(emu, dtype):
    gen = torch.Generator().manual_seed(5)
    x = _logits(3, 1500, dtype, gen)
    u = torch.rand(3, generator=gen)
    check(emu, x, u, top_k=10, top_p=0.9, stride=(1500 + 3, 1))  # padded, rows misaligned: the scalar path
    check(emu, x, u, top_k=10, top_p=0.9, stride=(1, 3))  # column-major: col_stride 3
    check(emu, x, u, top_k=10, top_p=0.9, stride=(1504 * 2, 2))


def test_indices_and_repeated_rows(emu):
    gen = torch.Generator().manual_seed(9)
    x = _logits(3, 3000, torch.float16, gen)
    indices = torch.tensor([2, 0, 2, 2, 1, 0])
    check(emu, x, torch.rand(6, generator=gen), indices=indices, **{k: v[:3] for k, v in MIXED.items()})


def test_scalar_and_per_row_knobs_agree(emu):
    gen = torch.Generator().manual_seed(11)
    x = _logits(3, 2500, torch.bfloat16, gen)
    u = torch.rand(3, generator=gen)
    a = check(emu, x, u, temperature=0.8, top_k=30, top_p=0.85, min_p=0.02)
    b = check(emu, x, u, temperature=torch.full((3,), 0.8), top_k=torch.full((3,), 30),
              top_p=torch.full((3,), 0.85), min_p=torch.full((3,), 0.02))
    assert torch.equal(a, b)


def test_same_result_under_every_thread_order(emu):
    """The mass histograms add floats with atomicAdd, so their rounding depends on the
    thread order (benches/notes/cuda_cpu.md: documented, not made deterministic). Away from
    a rounding tie the token must not depend on it."""
    gen = torch.Generator().manual_seed(13)
    x = _logits(4, 5000, torch.float32, gen, scale=1.0)  # flat-ish: the top-p cut sums many masses
    u = torch.rand(4, generator=gen)
    results = []
    for seed in range(4):
        emu.configure(seed, atomic_yield=128)
        results.append(run(emu, x, u, top_p=0.9, cap=0)[0])  # cap 0: the whole-row histograms
        results.append(run(emu, x, u, top_p=0.9)[0])
    assert all(torch.equal(results[0], r) for r in results)
    assert torch.equal(results[0], reference(x, u, top_p=0.9)[0])


def test_bad_launch_arguments_raise(emu):
    from cuda_cpu_harness import KernelError

    with pytest.raises(KernelError, match="empty logits"):
        emu.sample(torch.zeros(0, 5), torch.rand(1))


def test_random_sweep(emu, sweep):
    if not sweep:
        pytest.skip("FASTDF_CUDA_CPU_SWEEP=1 runs the random sweep")
    gen = torch.Generator().manual_seed(2024)
    for case in range(60):
        vocab = int(torch.randint(1, 9000, (1,), generator=gen))
        dtype = DTYPES[case % 3]
        rows = 3
        x = _logits(rows, vocab, dtype, gen, scale=float(torch.rand(1, generator=gen)) * 8)
        if case % 4 == 0:
            x = torch.randint(-3, 4, (rows, vocab), generator=gen).to(dtype)
        knobs = dict(
            temperature=torch.rand(rows, generator=gen) * 2 + 0.05,
            top_k=torch.randint(0, 60, (rows,), generator=gen),
            top_p=torch.rand(rows, generator=gen) * 0.5 + 0.5,
            min_p=torch.rand(rows, generator=gen) * 0.1,
        )
        cap = [-1, 0, 2048, 100][case % 4]
        emu.configure(case)
        check(emu, x, torch.rand(rows, generator=gen), cap=cap, **knobs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_pass_whole_and_partial_chunks(emu, dtype):
    """The first pass reads whole chunks (512 threads x 16 bytes) two at a time, then an odd
    one, then the partial tail: vocabularies of one full chunk plus a tail, exactly two
    (no tail) and three (odd) plus a tail. Row 0 has no cut, so the first pass's sum is the
    draw's total mass."""
    chunk = 512 * 16 // torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(chunk)
    for vocab in (2 * chunk - 1, 2 * chunk, 3 * chunk + 5):
        x = _logits(4, vocab, dtype, gen)
        check(emu, x, torch.rand(4, generator=gen), **MIXED)


def test_large_logits_and_tiny_temperatures(emu):
    """The first pass sums 2^(x s - m s) with s = log2(e) / T, m s rounded once: logits far
    from 0 give m s a rounding error of many ulps of the weights, which the pass takes out
    at the end; past |m s| = 2^24 (here 1e4 at T = 5e-4) a second pass sums from x - m.
    No cut on the first rows of each batch: the first pass's sum is the draw's total. A NaN
    or +inf is found on either path."""
    gen = torch.Generator().manual_seed(21)
    for offset, t in ((1e4, 1.0), (-3e4, 1.0), (1e4, 0.05), (1e4, 5e-4), (0.0, 1e-30), (2e5, 2.0)):
        x = _logits(4, 3000, torch.float32, gen) + offset
        knobs = dict(temperature=t, top_k=torch.tensor([0, 0, 20, 0]), top_p=torch.tensor([1.0, 1.0, 0.9, 0.7]))
        check(emu, x, torch.rand(4, generator=gen), **knobs)
        x[1, 2999] = float("nan")
        x[3, 5] = float("inf")
        _, status = check(emu, x, torch.rand(4, generator=gen), with_status=True, **knobs)
        assert status.tolist() == [STATUS_OK, STATUS_NON_FINITE, STATUS_OK, STATUS_NON_FINITE]

"""fastdf.sample: frequencies against the exact renormalised distribution (chi-square), the
tie rule, greedy rows, per-row knobs, shared rows, reproducibility and bad input."""

import itertools
import math

import pytest
import torch

import fastdf
from fastdf.ops import sampling as sampling_ops
from fastdf.testing import poisoned

ALPHA = 1e-6  # fixed seeds make these deterministic; a real bug fails by orders of magnitude


def exact_distribution(x, temperature, top_k, top_p, min_p):
    """The contract, written independently of the op: float64, a loop over distinct logits."""
    x = x.double()
    vocab = x.numel()
    if temperature == 0:
        probs = torch.zeros(vocab, dtype=torch.float64)
        probs[int(torch.argmax(x))] = 1.0
        return probs
    p = torch.softmax(x / temperature, -1)
    keep = torch.ones(vocab, dtype=torch.bool)
    if 0 < top_k < vocab:
        keep &= x >= torch.sort(x, descending=True).values[top_k - 1]
    if top_p < 1:
        # Mass of each distinct kept logit, then of every upper set {x >= v}, descending v.
        values, group = torch.unique(x[keep], return_inverse=True)
        mass = torch.zeros_like(values).index_add_(0, group, p[keep])
        upper = mass.flip(0).cumsum(0)
        first = int((upper >= top_p * p[keep].sum()).nonzero()[0, 0])
        keep &= x >= values.flip(0)[first]
    if min_p > 0:
        keep &= p >= min_p * p.max()
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


def chi_square_pvalue(counts, probs):
    """p-value of observed counts against probabilities; bins with expected < 5 are pooled."""
    counts = counts.double()
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    if obs.numel() < 2:
        return 1.0
    stat = ((obs - exp) ** 2 / exp).sum()
    df = torch.tensor(obs.numel() - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


def check_frequencies(logits, knobs_per_row, samples_per_row, *, seed=0, **sample_kwargs):
    """Draw samples_per_row tokens from every row (via indices) and test each row."""
    rows, vocab = logits.shape
    indices = torch.arange(rows, device=logits.device).repeat_interleave(samples_per_row)
    ids = fastdf.sample(logits, indices=indices, generator=torch.Generator(logits.device).manual_seed(seed),
                        **sample_kwargs).cpu()
    assert ids.shape == (rows * samples_per_row,) and ids.dtype == torch.int64
    for r, (t, k, p, mp) in enumerate(knobs_per_row):
        probs = exact_distribution(logits[r].float().cpu(), t, k, p, mp)
        got = ids[r * samples_per_row:(r + 1) * samples_per_row]
        outside = probs[got] == 0
        assert not outside.any(), f"row {r} (T={t}, k={k}, p={p}, min_p={mp}) drew tokens outside the kept set"
        counts = torch.bincount(got, minlength=vocab)
        pv = chi_square_pvalue(counts, probs)
        assert pv > ALPHA, f"row {r} (T={t}, k={k}, p={p}, min_p={mp}): chi-square p-value {pv:.2e}"


def _logits(rows, vocab, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(rows, vocab, generator=g)


KNOB_GRID = list(itertools.product([0.6, 1.0, 1.7], [0, 1, 4, 1000], [1.0, 0.9, 0.4], [0.0, 0.05, 0.3]))


@pytest.mark.op("sample")
def test_every_knob_combination_matches_exact_distribution(backend, device):
    """Per-row knob tensors: one row per combination of temperature, top_k, top_p, min_p."""
    grid = KNOB_GRID
    logits = _logits(len(grid), 37, seed=1).to(device)
    t, k, p, mp = (torch.tensor(c, device=device) for c in zip(*grid))
    check_frequencies(logits, grid, 3000, temperature=t.float(), top_k=k.long(), top_p=p.float(), min_p=mp.float())


@pytest.mark.op("sample")
@pytest.mark.parametrize("knobs", [(1.0, 0, 1.0, 0.0), (0.8, 7, 1.0, 0.0), (1.0, 0, 0.95, 0.0), (0.7, 50, 0.9, 0.02)])
def test_scalar_knobs_match_exact_distribution(backend, device, knobs):
    t, k, p, mp = knobs
    logits = _logits(3, 301, seed=2, scale=3.0).to(device)
    check_frequencies(logits, [knobs] * 3, 4000, temperature=t, top_k=k, top_p=p, min_p=mp)


def test_chi_square_detects_a_wrong_distribution():
    """The test statistic has power: the untruncated distribution fails a top-p check."""
    logits = _logits(1, 37, seed=3)
    ids = fastdf.sample(logits, indices=torch.zeros(3000, dtype=torch.int64),
                        generator=torch.Generator().manual_seed(0))
    probs = exact_distribution(logits[0], 1.0, 0, 0.5, 0.0)
    assert (probs[ids] == 0).any()
    softened = exact_distribution(logits[0], 1.3, 0, 1.0, 0.0)
    assert chi_square_pvalue(torch.bincount(ids, minlength=37), softened) < ALPHA


@pytest.mark.op("sample")
def test_ties_at_the_cut_are_kept_together(backend, device):
    """Equal logits at a top-k or top-p boundary are kept or dropped together."""
    row = torch.tensor([3.0, 2.0, -1.0, 2.0, 2.0, 0.5, 1.0])
    logits = row.repeat(3, 1).to(device)
    t = torch.tensor([1.0, 1.0, 1.0], device=device)
    k = torch.tensor([2, 0, 4], device=device)
    p = torch.tensor([1.0, 0.45, 1.0], device=device)
    # p: mass of {3} is e^3 / sum ~ 0.46 < ... check the exact sets instead of trusting numbers
    n = 4000
    indices = torch.arange(3, device=device).repeat_interleave(n)
    ids = fastdf.sample(logits, temperature=t, top_k=k, top_p=p, indices=indices,
                        generator=torch.Generator(device).manual_seed(0)).cpu().view(3, n)
    assert set(ids[0].tolist()) == {0, 1, 3, 4}  # k=2 keeps 3.0 and all three 2.0s
    assert set(ids[2].tolist()) == {0, 1, 3, 4}  # k=4 cuts inside nothing: the 4th largest is a 2.0
    mass_top = torch.softmax(row.double(), -1)[0].item()
    assert 0.45 > mass_top  # so top-p must go past 3.0 into the tied 2.0s
    assert set(ids[1].tolist()) == {0, 1, 3, 4}
    for r in range(3):
        probs = exact_distribution(row, 1.0, int(k[r]), float(p[r]), 0.0)
        assert chi_square_pvalue(torch.bincount(ids[r], minlength=7), probs) > ALPHA


@pytest.mark.op("sample")
def test_greedy_rows_and_first_argmax(backend, device):
    logits = _logits(6, 53, seed=4).to(device)
    logits[2, 10] = logits[2, 40] = logits[2].max() + 1  # tie: the first index wins
    t = torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0, 2.0], device=device)
    ids = fastdf.sample(logits, temperature=t, top_p=0.5, generator=torch.Generator(device).manual_seed(0))
    greedy = t == 0
    assert torch.equal(ids[greedy], logits.argmax(-1)[greedy])
    assert ids[2] == 10
    assert fastdf.sample(logits, temperature=0.0).tolist() == logits.argmax(-1).tolist()


@pytest.mark.op("sample")
def test_reproducible_with_a_generator(backend, device):
    logits = _logits(64, 211, seed=5).to(device)
    kw = dict(temperature=0.9, top_p=0.9, top_k=40)
    a = fastdf.sample(logits, generator=torch.Generator(device).manual_seed(7), **kw)
    b = fastdf.sample(logits, generator=torch.Generator(device).manual_seed(7), **kw)
    c = fastdf.sample(logits, generator=torch.Generator(device).manual_seed(8), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.op("sample")
def test_given_uniforms_are_the_draws(backend, device):
    """uniforms= replaces torch.rand: the generator's own uniforms give the generator's
    tokens, the reference draws the same ids from them (one per output, with indices too),
    and without the check out-of-range or NaN draws are clamped into [0, 1)."""
    logits = _logits(16, 97, seed=21).to(device)
    kw = dict(temperature=0.8, top_p=0.9, top_k=30)
    u = torch.rand(16, generator=torch.Generator(device).manual_seed(3), device=device)
    assert torch.equal(fastdf.sample(logits, uniforms=u, **kw), fastdf.sample(
        logits, generator=torch.Generator(device).manual_seed(3), **kw))
    rows = logits.shape[0]
    knobs = [torch.full((rows,), v, device=device) for v in (0.8, 30, 0.9, 0.0)]
    knobs[1] = knobs[1].long()
    want, _ = sampling_ops.sample_reference(logits, u, *knobs)
    assert torch.equal(fastdf.sample(logits, uniforms=u, **kw), want)
    idx = torch.tensor([3, 3, 3, 0, 15], device=device)
    u5 = torch.tensor([0.0, 0.5, 0.999, 0.25, 0.75], device=device)
    want, _ = sampling_ops.sample_reference(logits, u5, *knobs, indices=idx)
    assert torch.equal(fastdf.sample(logits, uniforms=u5, indices=idx, **kw), want)
    edge = torch.tensor([-0.5, 2.0, float("nan"), 0.0, 1.0], device=device)
    clamped = torch.tensor([0.0, sampling_ops._BELOW_ONE, 0.0, 0.0, sampling_ops._BELOW_ONE], device=device)
    assert torch.equal(fastdf.sample(logits, uniforms=edge, indices=idx, check_nan=False, **kw),
                       fastdf.sample(logits, uniforms=clamped, indices=idx, **kw))


@pytest.mark.op("sample")
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_low_precision_and_strided_logits(backend, device, dtype):
    """fp16/bf16 logits and a non-contiguous view (every other column of a wider buffer)."""
    wide = _logits(4, 2 * 97, seed=6, scale=2.5).to(device, dtype)
    logits = wide[:, ::2]
    assert not logits.is_contiguous()
    knobs = [(0.8, 10, 0.9, 0.0)] * 4
    check_frequencies(logits, knobs, 3000, temperature=0.8, top_k=10, top_p=0.9)


@pytest.mark.op("sample")
def test_minus_inf_bans_tokens_and_poisoned_outputs(backend, device):
    logits = _logits(5, 33, seed=7).to(device)
    logits[:, ::3] = float("-inf")
    with poisoned():
        ids = fastdf.sample(logits, indices=torch.arange(5, device=device).repeat(400),
                            generator=torch.Generator(device).manual_seed(1))
    assert (ids >= 0).all() and (ids % 3 != 0).all()


@pytest.mark.op("sample")
def test_bad_rows_with_check_nan_false_give_minus_one(backend, device):
    logits = _logits(4, 20, seed=8).to(device)
    logits[1, 3] = float("nan")
    logits[2, :] = float("-inf")
    logits[3, 5] = float("inf")
    ids = fastdf.sample(logits, check_nan=False, generator=torch.Generator(device).manual_seed(0))
    assert ids[1:].tolist() == [-1, -1, -1] and 0 <= ids[0] < 20
    with pytest.raises(ValueError, match=r"logits rows \[1, 3\] contain NaN or \+inf"):
        fastdf.sample(logits)
    with pytest.raises(ValueError, match=r"logits rows \[0\] have no finite value"):
        fastdf.sample(logits[2:3])


def test_shared_row_samples_are_independent():
    """indices: 4000 samples of one row follow that row's distribution."""
    logits = _logits(3, 40, seed=9)
    idx = torch.full((4000,), 1, dtype=torch.int64)
    ids = fastdf.sample(logits, indices=idx, temperature=1.2, generator=torch.Generator().manual_seed(2))
    probs = exact_distribution(logits[1], 1.2, 0, 1.0, 0.0)
    assert chi_square_pvalue(torch.bincount(ids, minlength=40), probs) > ALPHA


def test_reference_fallback_when_rounding_leaves_no_crossing():
    """u just below 1 still returns a kept token (the last one with weight)."""
    logits = torch.tensor([[0.0, 5.0, -30.0, 4.0, -200.0]])
    knob = lambda v, dt=torch.float32: torch.tensor([v], dtype=dt)  # noqa: E731
    ids, status = sampling_ops.sample_reference(logits, torch.tensor([1.0 - 2**-24]), knob(1.0),
                                                knob(2, torch.int64), knob(1.0), knob(0.0))
    assert ids.item() == 3 and status.item() == 0


def test_opcheck():
    logits = _logits(3, 16, seed=10)
    u = torch.rand(3)
    torch.library.opcheck(torch.ops.fastdf.sample, (logits, u, None, None, None, None, None, 0.8, 5, 0.9, 0.0))
    t = torch.tensor([0.0, 1.0, 0.5])
    idx = torch.tensor([0, 2, 2, 1])
    torch.library.opcheck(torch.ops.fastdf.sample, (logits, torch.rand(4), idx, t, None, None, None, 1.0, 0, 1.0, 0.1))


def test_compiles_fullgraph():
    logits = _logits(4, 32, seed=11)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x):
        return fastdf.sample(x * 2, temperature=0.0, check_nan=False) + 1

    assert torch.equal(step(logits), (logits * 2).argmax(-1) + 1)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(top_p=0.0), ValueError, "top_p must be > 0"),
        (dict(top_p=1.5), ValueError, "top_p must be <= 1"),
        (dict(temperature=-0.5), ValueError, "temperature must be >= 0"),
        (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
        (dict(top_k=-1), ValueError, "top_k must be >= 0"),
        (dict(top_k=2.5), TypeError, "top_k must be an int"),
        (dict(min_p=1.1), ValueError, "min_p must be <= 1"),
        (dict(temperature=torch.tensor([1.0, -1.0, 1.0])), ValueError, r"temperature\[1\] = -1.0 is outside"),
        (dict(top_p=torch.tensor([1.0, 0.0, 1.0])), ValueError, r"top_p\[1\] = 0.0 is outside \(0, 1\]"),
        (dict(top_k=torch.tensor([1, 2])), ValueError, r"top_k must have shape \(3,\)"),
        (dict(top_k=torch.tensor([1.0, 2.0, 3.0])), ValueError, "top_k must be an integer tensor"),
        (dict(indices=torch.tensor([0, 3])), ValueError, r"indices must lie in \[0, 3\)"),
        (dict(indices=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "indices must be one of int64"),
        (dict(generator=0), TypeError, "generator must be a torch.Generator"),
        (dict(uniforms=torch.rand(3), generator=torch.Generator()), ValueError, "generator or uniforms"),
        (dict(uniforms=torch.rand(3, dtype=torch.float64)), ValueError, "uniforms must be one of float32"),
        (dict(uniforms=torch.rand(2)), ValueError, r"uniforms must have shape \(3,\)"),
        (dict(uniforms=torch.tensor([0.5, 1.0, 0.5])), ValueError, r"uniforms must lie in \[0, 1\)"),
        (dict(uniforms=torch.tensor([0.5, float("nan"), 0.5])), ValueError, r"uniforms must lie in \[0, 1\)"),
        (dict(uniforms=[0.5, 0.5, 0.5]), TypeError, "uniforms"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastdf.sample(_logits(3, 10, seed=12), **kwargs)


def test_bad_logits():
    with pytest.raises(ValueError, match="logits must have 2 dims"):
        fastdf.sample(torch.randn(10))
    with pytest.raises(ValueError, match="logits must be one of"):
        fastdf.sample(torch.randint(0, 5, (2, 10)))
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        fastdf.sample([[0.0, 1.0]])
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        fastdf.sample(torch.randn(2, 0))
    logits = _logits(2, 10, seed=13)
    logits[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"logits rows \[1\] contain NaN"):
        fastdf.sample(logits, temperature=0.0)


# ---------------------------------------------------------------------------- CUDA-only


@pytest.mark.gpu
@pytest.mark.parametrize("cap", [None, 0, 3])
def test_cuda_candidate_and_whole_row_paths(cap):
    """The candidate path and the exact whole-row path (cap 0/3 forces it) agree with the
    exact distribution, with large vocabularies and LLM-like peaked logits."""
    old = sampling_ops.CUDA_CANDIDATE_CAP[0]
    sampling_ops.CUDA_CANDIDATE_CAP[0] = cap
    try:
        with fastdf.backend("cuda"):
            g = torch.Generator().manual_seed(14)
            logits = 3 * torch.randn(5, 32000, generator=g)
            logits[:, :20] += 12  # a peaked head over a long tail
            logits[4, :3000] += 12  # a wide head: more than 1024 tokens kept, fewer than 6144 candidates
            knobs = [(1.0, 0, 0.9, 0.0), (0.7, 30, 1.0, 0.0), (1.0, 5, 0.8, 0.05), (1.3, 0, 1.0, 0.1),
                     (1.0, 0, 0.99, 0.0)]
            t, k, p, mp = (torch.tensor(c) for c in zip(*knobs))
            # The whole-row path reads each row ~7 times per sample: fewer samples keep it quick.
            samples = 20000 if cap is None else 5000
            check_frequencies(logits.cuda(), knobs, samples, temperature=t.float().cuda(), top_k=k.long().cuda(),
                              top_p=p.float().cuda(), min_p=mp.float().cuda())
            flat = torch.randn(2, 151936, generator=g).cuda()  # flat: overflows the candidate list
            check_frequencies(flat, [(1.0, 0, 0.5, 0.0), (1.0, 2000, 0.9, 0.0)], 3000,
                              temperature=1.0, top_k=torch.tensor([0, 2000]).cuda(),
                              top_p=torch.tensor([0.5, 0.9]).cuda())
    finally:
        sampling_ops.CUDA_CANDIDATE_CAP[0] = old


@pytest.mark.gpu
def test_cuda_matches_torch_draw_for_draw():
    """Same uniforms (a CPU generator) on both backends: the same token in almost every row
    (they may differ only where float rounding moves a boundary)."""
    logits = (3 * torch.randn(512, 5000, generator=torch.Generator().manual_seed(15))).cuda()
    kw = dict(temperature=0.8, top_k=100, top_p=0.9, min_p=0.01)
    with fastdf.backend("cuda"):
        a = fastdf.sample(logits, generator=torch.Generator().manual_seed(3), **kw)
    with fastdf.backend("torch"):
        b = fastdf.sample(logits, generator=torch.Generator().manual_seed(3), **kw)
    assert (a == b).float().mean() > 0.99


def test_chi_square_helper_is_calibrated():
    """Sanity of the p-value: exact multinomial draws pass, and pooling works."""
    probs = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(16), dtype=torch.float64), -1)
    draws = torch.multinomial(probs, 20000, replacement=True, generator=torch.Generator().manual_seed(1))
    assert chi_square_pvalue(torch.bincount(draws, minlength=50), probs) > 1e-3
    assert math.isclose(chi_square_pvalue(torch.tensor([50, 50]), torch.tensor([0.5, 0.5], dtype=torch.float64)), 1.0)


# ---------------------------------------------------------------------------- hardening (issue 9)

NAN, INF = float("nan"), float("inf")


@pytest.mark.op("sample")
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=1e300), ValueError, "temperature = 1e\\+300 is not representable in float32"),
    (dict(temperature=NAN), ValueError, "temperature must be finite"),
    (dict(temperature=10**400), ValueError, "temperature must be finite"),
    (dict(temperature=True), TypeError, "temperature must be a number"),
    (dict(temperature="1"), TypeError, "temperature must be a number"),
    (dict(top_p=NAN), ValueError, "top_p must be finite"),
    (dict(min_p=NAN), ValueError, "min_p must be finite"),
    (dict(min_p=-INF), ValueError, "min_p must be finite"),
    (dict(top_k=True), TypeError, "top_k must be an int"),
    (dict(top_k=3.0), TypeError, "top_k must be an int"),
    (dict(temperature=torch.tensor([1.0, NAN, 1.0])), ValueError, r"temperature\[1\] = nan is not finite"),
    (dict(temperature=torch.tensor([1.0, 1.0, INF])), ValueError, r"temperature\[2\] = inf is not finite"),
    (dict(temperature=torch.tensor([-1.0, 1.0, 1.0])), ValueError, r"temperature\[0\] = -1.0 is outside"),
    (dict(temperature=torch.tensor([1.0, 1e300, 1.0], dtype=torch.float64)), ValueError,
     r"temperature\[1\] = 1e\+300 is not representable in float32"),
    (dict(top_p=torch.tensor([NAN, 1.0, 1.0])), ValueError, r"top_p\[0\] = nan is not finite"),
    (dict(min_p=torch.tensor([0.0, INF, 0.0])), ValueError, r"min_p\[1\] = inf is not finite"),
    (dict(top_k=torch.tensor([1, -2, 0])), ValueError, r"top_k must lie in \[0, inf\)"),
    (dict(top_k=torch.tensor([True, False, True])), ValueError, "top_k must be an integer tensor"),
    (dict(indices=torch.tensor([0.0, 1.0])), ValueError, "indices must be one of int64"),
    (dict(indices=torch.tensor([True, False])), ValueError, "indices must be one of int64"),
    (dict(indices=torch.tensor([0, -1])), ValueError, r"indices must lie in \[0, 3\)"),
])
def test_bad_knobs_on_every_backend(backend, device, kwargs, error, match):
    """Scalars and per-row tensors: NaN, inf, overflow in float32, out of range, wrong type."""
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        fastdf.sample(_logits(3, 10, seed=12).to(device), **kwargs)


@pytest.mark.op("sample")
def test_knob_and_index_views(backend, device):
    """Per-row knobs and indices as strided views draw exactly what contiguous copies draw."""
    logits = _logits(4, 50, seed=14).to(device)

    def spread(t, fill):
        big = torch.full((2 * t.numel(),), fill, dtype=t.dtype, device=device)
        big[::2] = t
        assert not big[::2].is_contiguous()
        return big[::2]

    knobs = dict(temperature=[0.7, 1.0, 1.3, 0.0], top_k=[5, 0, 20, 3], top_p=[0.9, 1.0, 0.5, 1.0],
                 min_p=[0.0, 0.1, 0.0, 0.0])
    knobs = {k: torch.tensor(v, device=device) for k, v in knobs.items()}
    indices = torch.tensor([3, 0, 0, 2, 1, 1, 1], device=device)
    views = {k: spread(v, -7 if k == "top_k" else NAN) for k, v in knobs.items()}
    for kw_view, kw in ((views, knobs), (dict(views, indices=spread(indices, 99)), dict(knobs, indices=indices))):
        a = fastdf.sample(logits, generator=torch.Generator(device).manual_seed(3), **kw_view)
        b = fastdf.sample(logits, generator=torch.Generator(device).manual_seed(3), **kw)
        assert torch.equal(a, b)


@pytest.mark.op("sample")
def test_empty_indices_and_rows(backend, device):
    """No samples asked for: an empty int64 result on every backend (not an error)."""
    logits = _logits(3, 10, seed=15).to(device)
    for got in (fastdf.sample(logits, indices=torch.zeros(0, dtype=torch.int64, device=device)),
                fastdf.sample(logits[:0]), fastdf.sample(logits[:0], temperature=torch.zeros(0, device=device))):
        assert got.shape == (0,) and got.dtype == torch.int64
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 0\)"):
        fastdf.sample(logits[:0], indices=torch.zeros(1, dtype=torch.int64, device=device))


def test_generator_on_another_device():
    """A generator on neither the CPU nor logits' device is refused, naming it."""

    class OtherDevice(torch.Generator):
        @property
        def device(self):
            return torch.device("cuda", 7)

    with pytest.raises(ValueError, match="generator is on cuda:7 but logits is on cpu"):
        fastdf.sample(_logits(2, 10, seed=16), generator=OtherDevice())


@pytest.mark.gpu
def test_cuda_generator_with_cpu_logits_is_refused():
    with pytest.raises(ValueError, match="generator is on cuda"):
        fastdf.sample(_logits(2, 10, seed=16), generator=torch.Generator("cuda").manual_seed(0))
    # A CPU generator with CUDA logits is fine (the draws are moved to the logits' device).
    ids = fastdf.sample(_logits(2, 10, seed=16).cuda(), generator=torch.Generator().manual_seed(0))
    assert ids.device.type == "cuda"

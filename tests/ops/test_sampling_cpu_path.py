"""The CPU torch backend's sorting-free sampler (issue 11) against the sorting reference:
the same token for the same uniform, draw for draw, through ties at every cut, banned
tokens, per-row knobs, shared rows, 16-bit/fp64 logits and the growth of the candidate set."""

import pytest
import torch

import fastdf
from fastdf.ops import sampling as sampling_ops


def _case(seed, rows, vocab, kind, dtype):
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        x = 3 * torch.randn(rows, vocab, generator=g)
    elif kind == "peaked":  # an LLM-like head: the top-p cut falls inside the first candidates
        x = 2.5 * torch.randn(rows, vocab, generator=g)
        x.scatter_add_(1, torch.randint(0, vocab, (rows, 5), generator=g), 12 + 4 * torch.rand(rows, 5, generator=g))
    elif kind == "ties":  # few distinct values: tie groups straddle every candidate boundary
        x = torch.randint(-3, 3, (rows, vocab), generator=g).float()
    else:  # banned tokens
        x = torch.randn(rows, vocab, generator=g)
        x[x < -0.8] = float("-inf")
        x[:, 0] = 0.0
    knobs = (torch.tensor([0.0, 0.5, 1.0, 2.0] * rows)[:rows],
             torch.randint(0, vocab + 2, (rows,), generator=g),
             torch.tensor([0.3, 0.9, 0.999, 1.0, 0.95] * rows)[:rows],
             torch.tensor([0.0, 0.0, 0.05] * rows)[:rows])
    return x.to(dtype), knobs, g


@pytest.mark.parametrize("candidates", [2, 64])
@pytest.mark.parametrize("kind", ["gauss", "peaked", "ties", "banned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_sort_free_draws_are_the_references(monkeypatch, candidates, kind, dtype):
    monkeypatch.setattr(sampling_ops, "TORCH_CANDIDATES", candidates)
    for seed, (rows, vocab) in enumerate([(5, 7), (4, 33), (3, 700), (2, 3000)]):
        x, knobs, g = _case(seed, rows, vocab, kind, dtype)
        for indices in (None, torch.randint(0, rows, (9,), generator=g)):
            u = torch.rand(rows if indices is None else 9, generator=g)
            u[0] = 1 - 2**-24  # the top of the last token's interval
            want = sampling_ops.sample_reference(x, u, *knobs, indices)
            got = sampling_ops._sample_sort_free(x, u, *knobs, indices)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (seed, rows, vocab)


def test_sort_free_path_is_what_the_cpu_runs_and_leaves_bad_rows_to_the_reference(monkeypatch):
    calls = []
    real = sampling_ops.sample_reference
    monkeypatch.setattr(sampling_ops, "sample_reference", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 50)
    fastdf.sample(x, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert calls == []
    x[1, 3] = float("nan")
    ids = fastdf.sample(x, top_p=0.9, check_nan=False)
    assert calls == [1] and ids[1] == -1


def test_nan_knob_tensor_without_checks_terminates():
    """check_nan=False lets a NaN top_p through (undefined result): it must not hang the
    candidate growth."""
    x = torch.randn(2, 300)
    ids = fastdf.sample(x, top_p=torch.tensor([float("nan"), 0.5]), check_nan=False)
    assert ids.shape == (2,)

"""Rank side of tests/distributed/test_prove.py (spawned by _spawn.run_ranks)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest

THEOREMS = ["theorem add_comm' (a b : Nat) : a + b = b + a := by", "lemma two : 1 + 1 = 2 := by",
            "theorem t3 : True := by bad_tactic", "  omega", "theorem t5 (x : Nat) : x = x := by"]
SAMPLE = dict(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=7, progress=False)


def parity_proof(theorem, text):
    """Verdicts that vary with the sampled text (the stand-in REPL fails 'sorry')."""
    return theorem + (" sorry" if len(text) % 2 else " trivial")


def setup(d: Path):
    from fastdf.prover import LeanREPLVerifier, ProofSampler
    from tests.prover.conftest import make_model, make_tokenizer

    tokenizer = make_tokenizer()
    sampler = ProofSampler(make_model("llama", len(tokenizer)), tokenizer)
    verifier = LeanREPLVerifier(d, command=[sys.executable, str(d / "standin_repl.py")], header="import Mathlib",
                                workers=1)
    return sampler, verifier


def summary(report):
    """What must agree: every completion, proof, verdict and score."""
    return ([(t.theorem, [(c.token_ids, c.finish_reason, c.text) for c in t.completions], t.proofs,
              [(r.ok, r.status) for r in t.results], t.num_correct, t.pass_at) for t in report.theorems],
            report.pass_at)


def all_checks(rank, world, d):
    import torch.distributed as dist

    from fastdf.prover import cli, prove

    d = Path(d)
    want = pickle.loads((d / "single.pkl").read_bytes())
    sampler, verifier = setup(d)
    with verifier:
        # prove: sharded round-robin, merged in input order on every rank, same as one process.
        report = prove(sampler, verifier, THEOREMS, 3, ks=[1, 3], proof=parity_proof, **SAMPLE)
        assert summary(report) == want["prove"]
        # ProofSampler.sample(distributed=True): the same completions on every rank.
        out = sampler.sample(THEOREMS, num_samples=2, distributed=True, **SAMPLE)
        assert [[c.token_ids for c in per] for per in out] == want["sample"]

        # A failure on one rank raises on every rank (statuses first: nobody hangs).
        class Broken:
            def verify(self, proofs):
                if rank == 1:
                    raise OSError("REPL pool gone")
                return verifier.verify(proofs)

        with pytest.raises(OSError if rank == 1 else RuntimeError, match="REPL pool gone"):
            prove(sampler, Broken(), THEOREMS, 2, **SAMPLE)
        with pytest.raises(ValueError if rank == 0 else RuntimeError, match="k must be >= 1|failed on rank 0"):
            prove(sampler, verifier, THEOREMS, 0 if rank == 0 else 2, **SAMPLE)
        with pytest.raises(ValueError, match="ranks were given different arguments"):
            prove(sampler, verifier, THEOREMS[:4 + rank], 2, **SAMPLE)
    dist.barrier()
    # The CLI inside the existing group: rank 0 writes; same file as one process.
    assert cli.main(json.loads((d / "cli_args.json").read_text()) + ["--output", str(d / "two_ranks.jsonl")]) == 0

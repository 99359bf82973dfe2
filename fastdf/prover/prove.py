"""The sample-then-check loop: k proofs per theorem, checked, pass@k reported."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from .check import Verifier, VerifyResult, pass_at_k
from .sampler import Completion


@dataclasses.dataclass
class TheoremResult:
    """One theorem's k attempts: the completions, the proofs checked, their verdicts, how
    many passed and pass@j for the requested j."""

    theorem: str
    completions: list[Completion]
    proofs: list[str]
    results: list[VerifyResult]
    num_correct: int
    pass_at: dict[int, float]


@dataclasses.dataclass
class ProveReport:
    theorems: list[TheoremResult]
    pass_at: dict[int, float]  # mean over theorems

    def __str__(self):
        lines = [f"{len(self.theorems)} theorems; " + ", ".join(f"pass@{j} = {v:.3f}" for j, v in self.pass_at.items())]
        for t in self.theorems:
            head = t.theorem.strip().splitlines()[0][:60] if t.theorem.strip() else "<empty>"
            lines.append(f"  {t.num_correct}/{len(t.proofs)} correct  {head}")
        return "\n".join(lines)


def prove(sampler, verifier: Verifier, theorems: Sequence[str], k: int, *,
          prompt: Callable[[str], str] | None = None, proof: Callable[[str, str], str] | None = None,
          ks: Sequence[int] | None = None, **sample_kwargs) -> ProveReport:
    """Sample ``k`` completions per theorem with ``sampler`` (a :class:`ProofSampler`),
    check them with ``verifier`` and report pass@j per theorem and on average.

    Args:
        theorems: formal statements (e.g. ``"theorem foo : 1 + 1 = 2 := by"``).
        prompt: theorem -> text the model continues (default: the theorem itself; put a
            few-shot prefix here, as TheoremLlama does).
        proof: (theorem, completion text) -> Lean source checked (default: the
            concatenation).
        ks: the j in pass@j (default 1 and k).
        **sample_kwargs: passed to ``sampler.sample`` (temperature, top_p, stop, seed, ...).

    Identical proofs of one theorem are checked once.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    ks = sorted(set(ks or (1, k)))
    if any(not 1 <= j <= k for j in ks):
        raise ValueError(f"every j in ks must be in [1, k={k}], got {ks}")
    prompt = prompt or (lambda theorem: theorem)
    proof = proof or (lambda theorem, text: theorem + text)
    theorems = list(theorems)
    completions = sampler.sample([prompt(t) for t in theorems], num_samples=k, **sample_kwargs)
    sources = [[proof(t, c.text) for c in per] for t, per in zip(theorems, completions)]
    unique = list(dict.fromkeys(s for per in sources for s in per))
    verdicts = dict(zip(unique, verifier.verify(unique)))
    out = []
    for t, per, srcs in zip(theorems, completions, sources):
        results = [verdicts[s] for s in srcs]
        c = sum(r.ok for r in results)
        out.append(TheoremResult(t, per, srcs, results, c, {j: pass_at_k(k, c, j) for j in ks}))
    mean = {j: sum(r.pass_at[j] for r in out) / max(1, len(out)) for j in ks}
    return ProveReport(out, mean)

"""The sample-then-check loop: k proofs per theorem, checked, pass@k reported."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from ..ops import _checks
from . import _dist
from .check import Verifier, VerifyResult, pass_at_k
from .sampler import Completion, prompt_seed


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

    Inside an initialised ``torch.distributed`` process group (more than one rank) the
    theorems are sharded round-robin over the ranks: each rank samples its shard with its
    own model replica and checks it with its own ``verifier`` (its own REPL pool), and
    every rank returns the merged report, in input order. Every rank must make the same
    call (same theorems and arguments; checked). With ``seed``, theorem ``i`` samples from
    its own stream (:func:`~fastdf.prover.prompt_seed` ``(seed, i)``), so the proofs do not
    depend on the number of ranks or on which theorems share a batch. ``seed`` may also
    be a list with one int per theorem (each theorem's stream seed, used as is). A failure
    on any rank (an exception, bad arguments) raises on every rank; a rank that dies
    outright is caught by the process group's timeout (or torchrun) instead.
    """
    ranks = _dist.world()
    if ranks is None:
        theorems, ks, prompt, proof, seed = _check(k, ks, theorems, prompt, proof, sample_kwargs)
        out = _prove_local(sampler, verifier, theorems, k, prompt, proof, ks, sample_kwargs)
    else:
        rank, size = ranks

        def run():  # inside the status exchange: bad arguments on one rank raise on all
            nonlocal theorems, ks
            theorems, ks, prompt_fn, proof_fn, seed = _check(k, ks, theorems, prompt, proof, sample_kwargs)
            mine = _dist.shard(len(theorems), rank, size)
            if seed is not None and not isinstance(seed, (list, tuple)):
                seed = [prompt_seed(seed, i) for i in range(len(theorems))]
            local_kwargs = dict(sample_kwargs)
            if seed is not None:
                local_kwargs["seed"] = [seed[i] for i in mine]
            local = _prove_local(sampler, verifier, [theorems[i] for i in mine], k, prompt_fn, proof_fn, ks,
                                 local_kwargs)
            return (theorems, k, ks, seed), local

        parts = _dist.run_and_gather(run, "fastdf.prover.prove")
        out = _dist.merge(parts, len(theorems))
    mean = {j: sum(r.pass_at[j] for r in out) / max(1, len(out)) for j in ks}
    return ProveReport(out, mean)


def _check(k, ks, theorems, prompt, proof, sample_kwargs):
    """Validate prove's arguments; returns (theorems, ks, prompt, proof, seed) normalised."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if ks is not None:
        if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence):
            raise TypeError(f"ks must be a list of ints, got {type(ks).__name__}")
        if any(isinstance(j, bool) or not isinstance(j, int) for j in ks):
            raise TypeError(f"ks must be a list of ints, got {list(ks)!r}")
    ks = sorted(set(ks or (1, k)))
    if any(not 1 <= j <= k for j in ks):
        raise ValueError(f"every j in ks must be in [1, k={k}], got {ks}")
    if isinstance(theorems, (str, bytes)):
        raise TypeError("theorems must be a list of strings, got a single string (wrap it in a list)")
    theorems = list(theorems)
    bad = next((i for i, t in enumerate(theorems) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"theorems must be strings; theorems[{bad}] is a {type(theorems[bad]).__name__}")
    for name, fn in (("prompt", prompt), ("proof", proof)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
    prompt = prompt or (lambda theorem: theorem)
    proof = proof or (lambda theorem, text: theorem + text)
    seed = sample_kwargs.get("seed")
    if isinstance(seed, (list, tuple)) and len(seed) != len(theorems):
        raise ValueError(f"seed must be an int or one int per theorem: got {len(seed)} seeds for {len(theorems)} "
                         "theorems")
    if seed is not None and not isinstance(seed, (list, tuple)):
        _checks.number("seed", seed, low=-2**63, high=2**64, high_open=True, integer=True)
    return theorems, ks, prompt, proof, seed


def _prove_local(sampler, verifier, theorems, k, prompt, proof, ks, sample_kwargs) -> list[TheoremResult]:
    """Sample, check and score ``theorems`` in this process."""
    if not theorems:
        return []
    completions = sampler.sample([prompt(t) for t in theorems], num_samples=k, **sample_kwargs)
    if len(completions) != len(theorems):
        raise RuntimeError(f"the sampler returned completions for {len(completions)} prompts, not {len(theorems)}")
    sources = [[proof(t, c.text) for c in per] for t, per in zip(theorems, completions)]
    bad = [s for per in sources for s in per if not isinstance(s, str)]
    if bad:
        raise TypeError(f"proof must return a string (the Lean source to check), got {type(bad[0]).__name__}")
    unique = list(dict.fromkeys(s for per in sources for s in per))
    checked = verifier.verify(unique)
    if len(checked) != len(unique):  # zip would silently pair proofs with other proofs' verdicts
        raise RuntimeError(f"the verifier returned {len(checked)} results for {len(unique)} proofs")
    verdicts = dict(zip(unique, checked))
    out = []
    for t, per, srcs in zip(theorems, completions, sources):
        results = [verdicts[s] for s in srcs]
        c = sum(r.ok for r in results)
        out.append(TheoremResult(t, per, srcs, results, c, {j: pass_at_k(k, c, j) for j in ks}))
    return out

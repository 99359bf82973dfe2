"""Batched proof sampling: k proofs per theorem with the prompt prefilled once, checked by
a Lean REPL pool, scored by pass@k (DESIGN.md §1, §4).

- :class:`ProofSampler` samples many completions per prompt from an HF Llama / Qwen2 /
  Mistral model: one prefill per distinct prompt, the prompt's K/V stored and read once per
  decode step for all samples (``fastdf.shared_prefix_attention``), sorting-free sampling
  (``fastdf.sample``).
- :func:`generate` is the same loop as a transformers ``custom_generate``.
- :func:`pass_at_k`, :class:`Verifier`, :class:`LeanREPLVerifier`, :func:`prove`.
"""

from .check import DEFAULT_HEADER, LeanREPLVerifier, Verifier, VerifyResult, pass_at_k
from .generate import generate
from .prove import ProveReport, TheoremResult, prove
from .sampler import Completion, ProofSampler, apply_repetition_penalty, prompt_seed

__all__ = [
    "Completion", "DEFAULT_HEADER", "LeanREPLVerifier", "ProofSampler", "ProveReport", "TheoremResult", "Verifier",
    "VerifyResult", "apply_repetition_penalty", "generate", "pass_at_k", "prompt_seed", "prove",
]

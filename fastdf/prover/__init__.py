"""Batched proof sampling: k proofs per theorem with the prompt prefilled once
(DESIGN.md §1, §4; issue #6)."""

_PENDING = "it arrives with the batched proof sampling capability (issue #6)"


class ProofSampler:
    """Samples many completions per prompt from an HF causal LM. Not built yet."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"fastdf.prover.ProofSampler is not built yet: {_PENDING}")


def pass_at_k(n, c, k):
    """Unbiased pass@k estimator 1 - C(n-c, k) / C(n, k). Not built yet."""
    raise NotImplementedError(f"fastdf.prover.pass_at_k is not built yet: {_PENDING}")

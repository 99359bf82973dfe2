"""Mixture-of-experts layer in HF layout (DESIGN.md §4, issue #5)."""


def moe_experts(*args, **kwargs):
    """Routed SiLU-gated experts in HF layout (DESIGN.md §4). Not built yet."""
    raise NotImplementedError(
        "fastdf.moe_experts is not built yet: it arrives with the ESFT capability (issue #5, fused MoE experts)"
    )

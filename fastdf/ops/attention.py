"""Frame-causal flash attention for Diffusion Forcing (DESIGN.md §4, issue #3)."""


def df_attention(*args, **kwargs):
    """Frame-causal attention with KV cache, windows and sinks (DESIGN.md §4). Not built yet."""
    raise NotImplementedError(
        "fastdf.df_attention is not built yet: it arrives with the Diffusion Forcing attention capability (issue #3, frame-causal flash attention)"
    )

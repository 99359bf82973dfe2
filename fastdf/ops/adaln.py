"""Per-frame AdaLN modulation and gated residuals (DESIGN.md §4, issue #3)."""


def adaln_modulate(*args, **kwargs):
    """N(x) * (1 + scale[frame]) + shift[frame] (DESIGN.md §4). Not built yet."""
    raise NotImplementedError(
        "fastdf.adaln_modulate is not built yet: it arrives with the Diffusion Forcing attention capability (issue #3, fused per-frame AdaLN)"
    )


def gated_residual(*args, **kwargs):
    """x + gate[frame] * y (DESIGN.md §4). Not built yet."""
    raise NotImplementedError(
        "fastdf.gated_residual is not built yet: it arrives with the Diffusion Forcing attention capability (issue #3, fused per-frame AdaLN)"
    )

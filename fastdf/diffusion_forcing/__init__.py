"""Diffusion Forcing toolkit: noise schedules, training levels, scheduling matrices and a
KV-cached sampler (DESIGN.md §1, §4; issue #4)."""


def scheduling_matrix(kind, horizon, steps, *, uncertainty=None):
    """int64 [M, horizon] noise levels per sampling row and frame (DESIGN.md §4). Not built yet."""
    raise NotImplementedError(
        "fastdf.diffusion_forcing.scheduling_matrix is not built yet: it arrives with the "
        "Diffusion Forcing toolkit capability (issue #4)"
    )

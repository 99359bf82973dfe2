"""Grouped GEMM over ragged expert groups (DESIGN.md §4, issue #5)."""


def grouped_mm(*args, **kwargs):
    """Ragged grouped matrix product whose backward skips frozen experts (DESIGN.md §4). Not built yet."""
    raise NotImplementedError(
        "fastdf.grouped_mm is not built yet: it arrives with the ESFT capability (issue #5, grouped GEMM that skips frozen experts)"
    )

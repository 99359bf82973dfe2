"""Sorting-free top-k / top-p / min-p sampling (DESIGN.md §4, issue #6)."""


def sample(*args, **kwargs):
    """Sample token ids from logits with temperature, top-k, top-p, min-p (DESIGN.md §4). Not built yet."""
    raise NotImplementedError(
        "fastdf.sample is not built yet: it arrives with the batched proof sampling capability (issue #6, sorting-free sampling)"
    )

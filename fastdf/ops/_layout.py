"""Index arithmetic shared by kernels over "rows" of strided tensors.

Kernels that treat all but the last dim as a flat list of rows take up to four leading
dims with a stride each; this collapses the caller's leading dims to that form without
copying whenever the strides allow (they do for every view of a contiguous tensor).
"""

from __future__ import annotations

import torch

MAX_LEAD = 4


def collapse_rows(shape, strides_per_tensor, max_dims=MAX_LEAD):
    """Merge adjacent leading dims that every tensor walks contiguously.

    ``shape`` are the leading sizes shared by all tensors; ``strides_per_tensor`` each
    tensor's strides over them. Returns ``(sizes, strides)`` padded at the front to
    ``max_dims`` (size 1, stride 0), or None when more than ``max_dims`` dims remain.
    """
    dims = [(size, [s[i] for s in strides_per_tensor]) for i, size in enumerate(shape) if size != 1]
    merged = []
    for size, strides in dims:
        if merged:
            prev_size, prev_strides = merged[-1]
            if all(p == c * size for p, c in zip(prev_strides, strides)):
                merged[-1] = (prev_size * size, strides)
                continue
        merged.append((size, strides))
    if len(merged) > max_dims:
        return None
    pad = max_dims - len(merged)
    sizes = [1] * pad + [size for size, _ in merged]
    strides = [[0] * pad + [st[i] for _, st in merged] for i in range(len(strides_per_tensor))]
    return sizes, strides


def row_layout(row_tensors: list[torch.Tensor], vec_tensors: list[torch.Tensor]):
    """Layout of rows for tensors shaped ``[*lead, D]`` (``vec_tensors``) and ``[*lead]``
    (``row_tensors``). Returns ``(sizes[4], lead strides per tensor, vec first, rows after)``
    or None if the leading dims cannot be expressed in four strided dims."""
    lead = vec_tensors[0].shape[:-1]
    strides = [t.stride()[:-1] for t in vec_tensors] + [t.stride() for t in row_tensors]
    return collapse_rows(lead, strides)

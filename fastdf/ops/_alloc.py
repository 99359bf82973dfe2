"""Output allocation for kernel launches.

Kernels write into buffers from ``empty``; under ``fastdf.testing.poisoned()`` those are
filled with NaN (integers with -1) first, so a test sees any element a kernel forgot to write.
"""

from __future__ import annotations

import torch

POISON = [False]


def empty(shape, *, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON[0]:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def empty_like(t: torch.Tensor, *, dtype=None) -> torch.Tensor:
    return empty(t.shape, dtype=dtype or t.dtype, device=t.device)

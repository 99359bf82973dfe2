"""Suite ``cascade``: merging partial attention states (decode-time shapes).

Baselines: ``torch-eager`` is the merge as users write it (FlashInfer's docs, vLLM's
torch fallback): logaddexp and two exp weights, NaN where a state is empty;
``torch-eager-inf-safe`` is fastdf's readable reference, which also handles empty (-inf)
and +inf states, as fastdf does.
"""

import torch

import fastdf
from fastdf.ops.cascade import merge_attention_states_reference

from ..core import Case, suite


def eager_merge(o_a, lse_a, o_b, lse_b):
    """The merge as a user writes it (no empty-state handling)."""
    lse = torch.logaddexp(lse_a, lse_b)
    o = o_a * torch.exp(lse_a - lse).unsqueeze(-1) + o_b * torch.exp(lse_b - lse).unsqueeze(-1)
    return o, lse


def _shapes(device, quick):
    if device.type == "cpu":
        # one launch-bound decode step and one where the bytes dominate (4 MiB per o)
        return [(2, 16, 8, 64)] if quick else [(2, 16, 8, 64), (4, 64, 32, 128)]
    if quick:
        return [(8, 128, 32, 128)]
    return [(8, 128, 32, 128), (4, 64, 32, 256), (64, 64, 8, 128)]


@suite("cascade", help="merge_attention_states vs eager torch (G prompts x N samples x H heads x D)")
def cases(device, quick):
    out = []
    for dtype in ([torch.float32] if device.type == "cpu" else [torch.bfloat16]):
        for g, n, h, d in _shapes(device, quick):
            rows = g * n * h
            elem = torch.tensor([], dtype=dtype).element_size()
            nbytes = 3 * rows * d * elem + 3 * rows * 4  # read 2 o + 2 lse, write 1 o + 1 lse

            def setup(device, g=g, n=n, h=h, d=d, dtype=dtype):
                o_a, o_b = (torch.randn(g, n, h, d, device=device, dtype=dtype) for _ in range(2))
                lse_a, lse_b = (torch.randn(g, n, h, device=device) for _ in range(2))
                args = (o_a, lse_a, o_b, lse_b)
                return {
                    "fastdf": lambda: fastdf.merge_attention_states(*args),
                    "torch-eager": lambda: eager_merge(*args),
                    "torch-eager-inf-safe": lambda: merge_attention_states_reference(*args),
                }

            out.append(Case(f"G{g} N{n} H{h} D{d} {str(dtype)[6:]}", setup, bytes=nbytes))
    return out

"""fastdf ops: argument checks, backend dispatch, autograd and torch.library registration
for every public op, one module per op family. Pure-torch references live beside them.

Layering: fastdf.kernels (Triton) and fastdf._C (CUDA) -> fastdf.ops -> fastdf.nn ->
fastdf.integrations -> workflows (diffusion_forcing, esft, prover).
"""

from ._backend import (
    BACKENDS,
    REGISTRY,
    BackendUnavailableError,
    Op,
    available_backends,
    backend,
    requested_backend,
    unavailable_reason,
)
from .adaln import adaln_modulate, gated_residual
from .attention import df_attention
from .cascade import merge_attention_states, shared_prefix_attention
from .grouped_mm import grouped_mm
from .moe import moe_experts
from .sampling import sample

__all__ = [
    "BACKENDS", "REGISTRY", "BackendUnavailableError", "Op", "available_backends", "backend",
    "requested_backend", "unavailable_reason",
    "adaln_modulate", "gated_residual", "df_attention", "merge_attention_states",
    "shared_prefix_attention", "grouped_mm", "moe_experts", "sample",
]

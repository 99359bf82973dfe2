"""fastdf: Triton and CUDA kernels for Diffusion Forcing, ESFT and batched proof sampling.

Ops (DESIGN.md §4) live on ``fastdf`` directly; the workflows are subpackages:
``fastdf.diffusion_forcing``, ``fastdf.esft``, ``fastdf.prover``; modules in ``fastdf.nn``, reference
models in ``fastdf.models``.
Pick an implementation with ``FASTDF_BACKEND`` or ``with fastdf.backend("triton"): ...``.
"""

from ._version import __version__
from ._kernels_path import install as _install_kernels

_install_kernels()

from .ops import (  # noqa: E402
    BackendUnavailableError,
    adaln_modulate,
    available_backends,
    backend,
    df_attention,
    gated_residual,
    grouped_mm,
    merge_attention_states,
    moe_experts,
    sample,
    shared_prefix_attention,
)

_SUBPACKAGES = ("nn", "models", "diffusion_forcing", "esft", "prover", "integrations", "bench", "testing")


def __getattr__(name):
    # Workflows import transformers and friends: load them on first use only.
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'fastdf' has no attribute {name!r}")


__all__ = [
    "__version__", "BackendUnavailableError", "adaln_modulate", "available_backends", "backend",
    "df_attention", "gated_residual", "grouped_mm", "merge_attention_states", "moe_experts", "sample",
    "shared_prefix_attention",
]

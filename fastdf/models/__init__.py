"""Reference models built from ``fastdf.nn`` blocks.

- :class:`DFTransformer`: a frame-causal diffusion transformer (patchify, per-frame noise-level
  embedding, ``DFBlock``s, final AdaLN, unpatchify) that implements the Diffusion Forcing
  model protocol (:mod:`fastdf.diffusion_forcing.protocol`), so
  :class:`~fastdf.diffusion_forcing.Sampler` and :func:`~fastdf.diffusion_forcing.training_step`
  drive it directly.

Layering: models sit above ``fastdf.nn`` and below the workflows' examples; the sampler does
not import them (it only speaks the protocol).
"""

from .transformer import DFTransformer, DFTransformerCache

__all__ = ["DFTransformer", "DFTransformerCache"]

"""fastdf as a drop-in backend for diffusers' SkyReels-V2 Diffusion Forcing transformer.

::

    import fastdf.integrations.diffusers as fdd
    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(
        "Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers", torch_dtype=torch.bfloat16)
    fdd.apply(pipe.transformer)          # in place; fdd.remove(pipe.transformer) undoes it

``apply`` switches a ``SkyReelsV2Transformer3DModel`` (diffusers 0.42.1) to fastdf:

- self-attention (every block's ``attn1``) through :func:`fastdf.df_attention` with
  ``frame_size = tokens per latent frame x num_frame_per_block`` (frame-block causal; plain
  bidirectional attention when ``num_frame_per_block == 1``), keeping the QK-norm, the
  rotary embedding and the projections. Installed with diffusers' public
  ``set_attn_processor``; the cross-attention (text, and image through
  ``added_kv_proj_dim``) keeps diffusers' processor;
- the AdaLN modulation of every block and of the output norm read per frame through
  :func:`fastdf.adaln_modulate` / :func:`fastdf.gated_residual` with the model's fp32
  semantics (norm and modulation in fp32, cast back; residuals in fp32);
- no ``[L, L]`` mask and no per-token ``[B, 6, L, C]`` modulation table is built.

The forward of the transformer and of its blocks is replaced per instance through
diffusers' ``HookRegistry`` (a ``ModelHook`` with ``new_forward`` named ``"fastdf"``), so
hooks added afterwards (group offloading, caches) wrap the fastdf forward, and ``remove``
restores the stock forwards and processors. ``num_frame_per_block`` is read at every call
(the pipelines change it with ``causal_block_size``). ``copy.deepcopy`` of an applied
transformer (or of a pipeline holding one) raises TypeError: the hooked forward is a
closure over the original module, so a copy would compute with the original's weights;
copy first, then apply.

Served: ``enable_diffusion_forcing`` True/False, ``inject_sample_info`` (fps), image
conditioning, batches, fp32/fp16/bf16 (and fp64 on the torch backend), autograd,
``gradient_checkpointing``, LoRA scale through ``attention_kwargs``. One difference where
the stock model fails: with fps, diffusion forcing and several fps values in a batch the
stock forward raises; here row b uses ``fps[b]``.

Refused with ValueError, nothing changed: a model that is not the stock class (a subclass
overriding a forward, blocks or norms replaced), diffusers hooks already on the transformer
or its blocks (a ``new_forward`` would bypass them: apply fastdf first), a self-attention
processor other than diffusers' ``SkyReelsV2AttnProcessor`` (custom processors, context
parallelism) and a model already applied.
At call time, inputs the stock forward cannot serve either (timestep shapes that do not
match the latent frames, frames not a multiple of ``num_frame_per_block``, a missing fps)
raise ValueError naming the argument.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

try:
    import diffusers as _diffusers
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.hooks import StateManager
    from diffusers.models.normalization import FP32LayerNorm
    from diffusers.models.transformers.transformer_skyreels_v2 import (
        SkyReelsV2Attention,
        SkyReelsV2AttnProcessor,
        SkyReelsV2Transformer3DModel,
        SkyReelsV2TransformerBlock,
    )
    from diffusers.utils import apply_lora_scale
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError("fastdf.integrations.diffusers needs diffusers: pip install 'fastdf[diffusers]' "
                      "(tested with diffusers==0.42.1)") from exc

from . import _skyreels
from ._skyreels import FastdfSkyReelsAttnProcessor, FrameLayout

__all__ = ["apply", "remove", "is_applied", "cache_stats", "FastdfSkyReelsAttnProcessor", "FrameLayout", "HOOK_NAME"]

HOOK_NAME = "fastdf"
TESTED_DIFFUSERS = "0.42"
_STATE = "_fastdf_state"

if not _diffusers.__version__.startswith(TESTED_DIFFUSERS + "."):
    warnings.warn(f"fastdf.integrations.diffusers mirrors the SkyReels-V2 forward of diffusers {TESTED_DIFFUSERS}.x; "
                  f"diffusers {_diffusers.__version__} is installed. Compare outputs with the stock model before "
                  "relying on it.", stacklevel=2)

_lora_forward = apply_lora_scale("attention_kwargs")(_skyreels.transformer_forward)


class _TransformerHook(ModelHook):
    """Replaces ``SkyReelsV2Transformer3DModel.forward`` (no mask, per-frame tables)."""

    def new_forward(self, module, *args, **kwargs):
        return _lora_forward(module, *args, **kwargs)


class _CachedTransformerHook(ModelHook):
    """``apply(..., cache=True)``: the fastdf forward plus one :class:`_skyreels.BlockCache` per
    cache context (diffusers' ``StateManager``; ``cache_context`` sets the name). Outside a
    cache context, or under autograd, a call is exactly the uncached forward."""

    _is_stateful = True

    def __init__(self):
        super().__init__()
        self.state_manager = StateManager(_skyreels.BlockCache)
        self.stats = {"calls": 0, "tokens_total": 0, "tokens_computed": 0}

    def new_forward(self, module, *args, **kwargs):
        cache = self.state_manager.get_state() if self.state_manager._context is not None else None
        # apply_lora_scale pops the LoRA scale before the forward sees it: key on it here.
        scale = (kwargs.get("attention_kwargs") or {}).get("scale", 1.0)
        return _lora_forward(module, *args, _cache=cache, _stats=self.stats, _cache_extra=scale, **kwargs)

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class _BlockHook(ModelHook):
    """Replaces ``SkyReelsV2TransformerBlock.forward`` (per-frame AdaLN, fastdf attention)."""

    def new_forward(self, module, *args, **kwargs):
        return _skyreels.block_forward(module, *args, **kwargs)


@dataclasses.dataclass
class _State:
    processors: dict  # attn1 processor name -> the processor apply replaced
    new_registries: list  # modules whose HookRegistry apply created (dropped again by remove)


def _hooks(module) -> list[str]:
    registry = getattr(module, "_diffusers_hook", None)
    return list(registry.hooks) if registry is not None else []


def _refusal(model) -> str | None:
    """Why apply cannot serve this model exactly (None if it can)."""
    if type(model).forward is not SkyReelsV2Transformer3DModel.forward:
        return f"{type(model).__name__} overrides SkyReelsV2Transformer3DModel.forward"
    if getattr(model, _STATE, None) is not None:
        return "fastdf is already applied to this transformer (call remove first)"
    modules = [("transformer", model)] + [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    for name, module in modules:
        if _hooks(module):
            return (f"{name} has diffusers hooks {_hooks(module)}; fastdf replaces the forward and would bypass them. "
                    "Apply fastdf first, then enable caching/offloading")
        if "forward" in module.__dict__:
            return f"{name}.forward was replaced on the instance"
    if not isinstance(model.norm_out, FP32LayerNorm):
        return f"norm_out is a {type(model.norm_out).__name__}, not diffusers' FP32LayerNorm"
    for i, block in enumerate(model.blocks):
        if type(block) is not SkyReelsV2TransformerBlock:
            return f"blocks.{i} is a {type(block).__name__}, not SkyReelsV2TransformerBlock"
        for norm in ("norm1", "norm3"):
            if not isinstance(getattr(block, norm), FP32LayerNorm):
                return f"blocks.{i}.{norm} is a {type(getattr(block, norm)).__name__}, not FP32LayerNorm"
        attn = block.attn1
        if type(attn) is not SkyReelsV2Attention or attn.is_cross_attention or attn.add_k_proj is not None:
            return f"blocks.{i}.attn1 is not a SkyReelsV2Attention self-attention"
        processor = attn.processor
        if type(processor) is not SkyReelsV2AttnProcessor:
            return (f"blocks.{i}.attn1 uses {type(processor).__name__}; fastdf replaces diffusers' "
                    "SkyReelsV2AttnProcessor only")
        if getattr(processor, "_parallel_config", None) is not None:
            return f"blocks.{i}.attn1 runs context-parallel attention, which fastdf does not serve"
    return None


def _refuse_deepcopy(memo):
    raise TypeError("copy.deepcopy of a SkyReels-V2 transformer (or block) with fastdf applied would run the "
                    "original module: diffusers' hooks replace forward with a closure over it. Deep-copy the model "
                    "before fastdf.integrations.diffusers.apply, or remove() fastdf first")


def is_applied(transformer) -> bool:
    """Whether :func:`apply` is in effect on ``transformer``."""
    return getattr(transformer, _STATE, None) is not None


def cache_stats(transformer) -> dict:
    """Counters of an ``apply(..., cache=True)`` transformer since ``apply``: ``calls``,
    ``tokens_total`` (tokens the calls covered) and ``tokens_computed`` (tokens the blocks
    actually ran on). Empty dict when fastdf is applied without the cache.

    Raises:
        ValueError: fastdf is not applied to ``transformer``.
    """
    if not is_applied(transformer):
        raise ValueError("transformer: fastdf is not applied to it")
    hook = transformer._diffusers_hook.get_hook(HOOK_NAME)
    return dict(hook.stats) if isinstance(hook, _CachedTransformerHook) else {}


def apply(transformer, *, cache: bool = False):
    """Switch ``transformer`` (a diffusers ``SkyReelsV2Transformer3DModel``) to fastdf, in
    place, and return it. See the module docstring for what changes and what is refused.

    Args:
        transformer: the model (e.g. ``pipe.transformer``).
        cache: reuse of unchanged leading frame blocks across calls. Within one
            ``transformer.cache_context(name)`` (the pipelines use "cond" / "uncond"), a call
            whose leading frame blocks have exactly (``torch.equal``) the latents and per-frame
            timesteps of the previous call in that context, with the same text/image
            embeddings, fps, LoRA scale, batch, spatial size, dtype and ``num_frame_per_block``,
            reuses those blocks' per-layer K/V and output tokens and runs the blocks on the
            remaining frames only (``df_attention`` with ``Tq < Tk``). The first differing
            block and everything after it are recomputed. Only with ``num_frame_per_block > 1``
            (frame-block causal) and outside autograd; otherwise, and outside a cache context,
            calls are exactly the uncached forward. Comparing costs one elementwise pass over
            the latents and timesteps and one host read per call; an embedding tensor that is
            the very object of the previous call, with an unchanged version counter (autograd's
            in-place check), is not read again, so in-place writes that bypass that counter
            (``.data``, NumPy views) must be followed by a hooks reset. Memory: one call's K/V
            (all layers, rewritten in place by the next call) and output per context, freed
            when the hooks' state is reset (the pipelines do it at the
            end of ``__call__`` through ``maybe_free_model_hooks``;
            ``transformer._diffusers_hook.reset_stateful_hooks()`` does it by hand) and by
            :func:`remove`. The weights must not change between calls within a context
            (reset the hooks after changing them).

    Raises:
        TypeError: ``transformer`` is not a ``SkyReelsV2Transformer3DModel`` or ``cache`` is
            not a bool.
        ValueError: the model or configuration cannot be served exactly (the model is left
            unchanged).
    """
    if not isinstance(transformer, SkyReelsV2Transformer3DModel):
        raise TypeError("transformer must be a diffusers SkyReelsV2Transformer3DModel, got "
                        f"{type(transformer).__name__}")
    if not isinstance(cache, bool):
        raise TypeError(f"cache must be a bool, got {type(cache).__name__}")
    reason = _refusal(transformer)
    if reason is not None:
        raise ValueError(f"transformer: {reason}")

    processors = transformer.attn_processors
    saved = {name: p for name, p in processors.items() if name.endswith(".attn1.processor")}
    new_registries = [m for m in (transformer, *transformer.blocks) if not hasattr(m, "_diffusers_hook")]
    transformer.set_attn_processor(
        {name: FastdfSkyReelsAttnProcessor() if name in saved else p for name, p in processors.items()})
    for block in transformer.blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(), HOOK_NAME)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(_CachedTransformerHook() if cache else _TransformerHook(), HOOK_NAME)
    registry.invalidate_child_registries_cache()
    for module in (transformer, *transformer.blocks):
        # copy.deepcopy looks __deepcopy__ up on the instance: a copy would silently compute
        # with the original's weights and cache, so it is refused instead
        module.__dict__["__deepcopy__"] = _refuse_deepcopy
    setattr(transformer, _STATE, _State(processors=saved, new_registries=new_registries))
    return transformer


def remove(transformer) -> None:
    """Undo :func:`apply`: the stock forwards and self-attention processors come back (hooks
    registered after ``apply`` stay, now wrapping the stock forwards).

    Raises:
        TypeError: ``transformer`` is not a ``SkyReelsV2Transformer3DModel``.
        ValueError: fastdf is not applied to it.
    """
    if not isinstance(transformer, SkyReelsV2Transformer3DModel):
        raise TypeError("transformer must be a diffusers SkyReelsV2Transformer3DModel, got "
                        f"{type(transformer).__name__}")
    state = getattr(transformer, _STATE, None)
    if state is None:
        raise ValueError("transformer: fastdf is not applied to it")

    hook = transformer._diffusers_hook.get_hook(HOOK_NAME)
    if isinstance(hook, _CachedTransformerHook):
        hook.reset_state(transformer)  # free the cached K/V now, not when the hook is collected
    transformer._diffusers_hook.remove_hook(HOOK_NAME, recurse=True)
    for module in (transformer, *transformer.blocks):
        # remove_hook leaves the stock bound method as an instance attribute; drop it so the
        # module is exactly as before (only when no later hook is wrapping it).
        bound = module.__dict__.get("forward")
        if (not _hooks(module) and bound is not None and getattr(bound, "__self__", None) is module
                and getattr(bound, "__func__", None) is type(module).forward):
            del module.__dict__["forward"]
    for module in state.new_registries:
        if hasattr(module, "_diffusers_hook") and not _hooks(module):
            del module._diffusers_hook
    if hasattr(transformer, "_diffusers_hook"):
        transformer._diffusers_hook.invalidate_child_registries_cache()

    processors = transformer.attn_processors
    transformer.set_attn_processor({
        name: state.processors[name] if isinstance(p, FastdfSkyReelsAttnProcessor) and name in state.processors else p
        for name, p in processors.items()
    })
    for module in (transformer, *transformer.blocks):
        if module.__dict__.get("__deepcopy__") is _refuse_deepcopy:
            del module.__dict__["__deepcopy__"]
    delattr(transformer, _STATE)

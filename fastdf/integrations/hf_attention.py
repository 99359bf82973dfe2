"""``attn_implementation="fastdf"`` for HF transformers models.

Importing this module registers ``"fastdf"`` in ``transformers.AttentionInterface`` (the
attention function) and in ``transformers.masking_utils.AttentionMaskInterface`` (the mask
builder HF calls once per forward). Then::

    import fastdf.integrations.hf_attention  # noqa: F401  (registers "fastdf")
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="fastdf")

runs every attention layer through ``fastdf.df_attention`` (token-causal, ``frame_size=1``;
GQA/MQA without repeating K/V; the CPU path is the torch reference, CUDA tensors take the
Triton kernels).

Masks. HF hands the mask builder a 2-D padding mask; instead of a [B, 1, Tq, Tk] tensor
the builder returns a small :class:`FastdfMask` (or None when plain causality says it
all). What it can express:

- no padding, causal or bidirectional (``config.is_causal = False``);
- left padding (batched generation): keys before the first real token of each row are
  invisible (``fastdf.ops.attention.df_attention_padded``); padding query rows give zeros;
- right padding with causal attention (training batches): real tokens never see the later
  padding keys, so nothing is needed; the outputs *at* padding positions are unspecified
  (they see their padding keys), as with every unpadding attention;
- static caches (keys longer than the tokens seen): the unused tail is sliced off.

Anything else raises ValueError naming the problem: holes in the padding mask, padding on
both sides with bidirectional attention, sliding-window/chunked/packed-sequence or custom
mask functions, prepared 4-D masks, attention dropout, softcapping, attention sinks.
"""

from __future__ import annotations

import dataclasses

import torch

from ..ops.attention import df_attention, df_attention_padded

NAME = "fastdf"


@dataclasses.dataclass
class FastdfMask:
    """What the fastdf mask builder hands the attention layers: causality, per-row key
    starts (left padding; None if there is none) and how many keys are in use (None: all)."""

    causal: bool
    key_start: torch.Tensor | None = None
    kv_length: int | None = None


def _padding_starts(padding: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """Per-row index of the first real key, after checking the real keys are contiguous."""
    padding = padding.bool()
    B, T = padding.shape
    count = padding.sum(-1)
    start = torch.where(count > 0, padding.int().argmax(-1), T)
    pos = torch.arange(T, device=padding.device)
    contiguous = (pos >= start[:, None]) & (pos < (start + count)[:, None])
    if not bool((contiguous == padding).all()):
        raise ValueError("fastdf attention: the attention_mask has holes (padding between real tokens); "
                         "it expresses left or right padding only. Use attn_implementation='sdpa' for this batch.")
    if not causal and bool(((start + count) < T).any()):
        raise ValueError("fastdf attention: right padding with bidirectional attention would let real tokens see "
                         "padding; pad on the left or use attn_implementation='sdpa'.")
    if not bool((start > 0).any()):
        return None
    return start.to(torch.int32)


def fastdf_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> FastdfMask | None:
    """The mask builder registered in AttentionMaskInterface (see the module docstring)."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function is causal_mask_function or mask_function is None:
        causal = True
    elif mask_function is bidirectional_mask_function:
        causal = False
    else:
        name = getattr(mask_function, "__qualname__", repr(mask_function))
        raise ValueError(f"fastdf attention expresses plain causal or bidirectional masks (with padding), not this "
                         f"model's mask function {name} (sliding window, chunked, packed sequences or custom "
                         f"overlays); use attn_implementation='sdpa' for this model")
    if isinstance(kv_offset, torch.Tensor) or kv_offset:
        raise ValueError(f"fastdf attention needs keys that start at position 0 (got kv_offset={kv_offset}, "
                         f"a sliding-window cache)")
    used = int(q_offset) + q_length if causal else kv_length
    kv_used = None if used == kv_length else used
    key_start = None
    if attention_mask is not None:
        padding = attention_mask[:, :used]
        if padding.shape[-1] < used:
            padding = torch.nn.functional.pad(padding, (0, used - padding.shape[-1]), value=True)
        key_start = _padding_starts(padding, causal)
    if causal and key_start is None and kv_used is None:
        return None
    return FastdfMask(causal=causal, key_start=key_start, kv_length=kv_used)


def fastdf_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs):
    """The attention function registered in AttentionInterface: q ``[B, Hq, Tq, D]``, k/v
    ``[B, Hkv, Tk, D]`` -> ``([B, Tq, Hq, D], None)`` like HF's sdpa_attention_forward."""
    if dropout:
        raise ValueError(f"fastdf attention has no attention dropout (got dropout={dropout}); set the config's "
                         f"attention_dropout to 0")
    for unsupported in ("softcap", "sliding_window", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"fastdf attention does not support {unsupported} (this model passes one); use "
                             f"attn_implementation='sdpa'")
    if kwargs.get("output_attentions"):
        raise ValueError("fastdf attention never materialises attention weights; use attn_implementation='eager' "
                         "for output_attentions=True")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    key_start = None
    if isinstance(attention_mask, FastdfMask):
        causal = attention_mask.causal
        key_start = attention_mask.key_start
        if attention_mask.kv_length is not None:
            key, value = key[:, :, :attention_mask.kv_length], value[:, :, :attention_mask.kv_length]
    elif attention_mask is not None:
        raise ValueError(f"fastdf attention got a prepared mask of type {type(attention_mask).__name__} "
                         f"(shape {tuple(getattr(attention_mask, 'shape', ()))}); it takes the masks its own builder "
                         f"makes from 2-D padding masks (import fastdf.integrations.hf_attention before building "
                         f"the model), or use attn_implementation='sdpa' for custom 4-D masks")
    if not causal and query.shape[2] > key.shape[2]:
        raise ValueError("fastdf attention needs at most as many queries as keys")
    if key_start is None:
        out = df_attention(query, key, value, causal=bool(causal), scale=scaling)
    else:
        out = df_attention_padded(query, key, value, key_start.to(query.device), causal=bool(causal), scale=scaling)
    return out.transpose(1, 2), None


def register(name: str = NAME):
    """Register the attention function and the mask builder under ``name`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fastdf_attention_forward)
    AttentionMaskInterface.register(name, fastdf_mask)


register()

"""``attn_implementation="fastdf"`` for HF transformers models.

Importing this module registers ``"fastdf"`` in ``transformers.AttentionInterface`` (the
attention function) and in ``transformers.masking_utils.AttentionMaskInterface`` (the mask
builder HF calls once per forward). Then::

    import fastdf.integrations.hf_attention  # noqa: F401  (registers "fastdf")
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="fastdf")

runs every attention layer through ``fastdf.df_attention`` (token-causal, ``frame_size=1``;
GQA/MQA without repeating K/V; the CPU path is the torch reference, CUDA tensors take the
Triton kernels). It is meant as a drop-in for ``"sdpa"``:

- any 2-D padding mask (left, right, both sides, holes; causal or bidirectional) becomes
  df_attention's ``key_padding_mask``; query rows without any real key give zeros;
- sliding windows (Mistral, Qwen2 ``use_sliding_window``): ``window_frames=W`` with
  ``frame_size=1``, the window size taken from the layer's ``sliding_window`` argument (as
  HF's flash-attention backends do), with dynamic and static sliding-window caches;
- static (compilable) caches: only the keys written so far are used;
- ``output_attentions=True``: warns once and returns ``None`` weights, as sdpa does;
- prepared 4-D masks (bool or additive float): a causal/padding(/window) mask in disguise
  runs the kernel; anything else (packed sequences, custom overlays, per-head masks)
  computes through a float32 torch reference with that exact mask, after a one-time
  warning (correct, slow; no refusal).

Refused with a clear error: attention dropout > 0 (training), logit softcapping, attention
sinks (``s_aux``), position biases.

What the builder returns. HF's ``create_causal_mask`` passes only a Tensor or a BlockMask
of four dims through unchanged (``generate`` with a compilable cache builds the mask once
and feeds it back into ``forward``), so the builder returns a real 4-D tensor: the key mask
``[B, 1, 1, L]``, nonzero = a real key, dtype uint8 for causal and int8 for bidirectional
attention. SDPA and eager take only bool or float masks, so no other producer makes
such a tensor. For one query (decoding) L is the cache's key length and the mask also
holds the sliding window, so a compiled decode step never reads the cache position on the
host; for several queries L is the number of keys in use (a static cache's unused tail is
sliced off) and the window comes from the layer. Without padding and without an unused
tail the builder returns None (plain causal attention).
"""

from __future__ import annotations

import warnings

import torch

from ..ops.attention import df_attention, visible

NAME = "fastdf"
CAUSAL_KEYS = torch.uint8
BIDIRECTIONAL_KEYS = torch.int8
_WARNED = set()


def _warn_once(key: str, message: str):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def _closure(fn) -> dict:
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, fn.__closure__)}


def _mask_kind(mask_function):
    """("causal", None), ("causal", W) for HF's sliding-window causal function,
    ("bidirectional", None), or None for anything else (read from HF's closures: the
    functions are built by masking_utils, so their shape is known)."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function is None or mask_function is causal_mask_function:
        return "causal", None
    if mask_function is bidirectional_mask_function:
        return "bidirectional", None
    if getattr(mask_function, "__qualname__", "") == "and_masks.<locals>.and_mask":
        parts = _closure(mask_function).get("mask_functions", ())
        if len(parts) == 2 and parts[1] is causal_mask_function and \
                getattr(parts[0], "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask":
            window = _closure(parts[0]).get("sliding_window")
            if isinstance(window, int) and window >= 1:
                return "causal", window
    return None


def fastdf_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """The mask builder registered in AttentionMaskInterface (see the module docstring):
    None, a key mask ``[B, 1, 1, L]`` (uint8: causal, int8: bidirectional), or for mask
    functions it cannot express, the exact boolean mask sdpa would get."""
    from transformers.masking_utils import prepare_padding_mask, sdpa_mask

    kind = _mask_kind(mask_function)
    if kind is None:  # packed sequences, block overlays, custom functions: the exact mask
        kwargs.pop("allow_is_causal_skip", None)
        kwargs.pop("allow_is_bidirectional_skip", None)
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)
    kind, window = kind
    device = kwargs.get("device") or (attention_mask.device if attention_mask is not None else None)
    pad = None
    if attention_mask is not None:
        # HF's own rule: keys beyond the 2-D mask are padding (a static cache's tail)
        pad = prepare_padding_mask(attention_mask.bool(), kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
    if kind == "bidirectional":
        if pad is None:
            pad = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
        return pad.to(BIDIRECTIONAL_KEYS)[:, None, None, :]
    # Keys are positions kv_offset .. kv_offset + kv_length - 1; the queries end at `used`.
    used = q_offset + q_length - kv_offset
    if q_length == 1:
        pos = torch.arange(kv_length, device=device)
        keys = pos < used
        if window is not None:
            keys = keys & (pos >= used - window)
        keys = keys[None, :] if pad is None else pad & keys[None, :]
        if pad is None and not isinstance(used, torch.Tensor) and used == kv_length:
            return None  # the layer's own window, at the last key, is then the same
        return keys.expand(batch_size, kv_length).to(CAUSAL_KEYS)[:, None, None, :]
    used = int(used)  # a host read for a static cache's prefill only (never on a compiled decode step)
    if pad is None:
        if used == kv_length:
            return None
        pad = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    return pad[:, :used].to(CAUSAL_KEYS)[:, None, None, :]


def _prepared_mask_visibility(mask: torch.Tensor):
    """Visibility (bool) of a prepared bool or additive float mask, or None when the float
    mask carries biases beyond 0 / "masked" (then only the exact computation will do)."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return None
    vis = mask > torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | ~vis).all()):
        return None
    return vis


def _in_disguise(vis: torch.Tensor, B: int, Tq: int, Tk: int, causal: bool, window):
    """(causal, key_padding_mask) when ``vis`` ([B or 1, 1, Tq, Tk]) is exactly df_attention's
    rule with a key padding mask, else None. One pass over the mask, one host sync."""
    if vis.dim() != 4 or vis.shape[1] != 1 or vis.shape[2] != Tq or vis.shape[3] != Tk or vis.shape[0] not in (1, B):
        return None
    rows = vis[:, 0]
    kpm = rows.any(-2)  # a key some query sees is real; one nobody sees may as well be padding
    q_pos = torch.arange(Tk - Tq, Tk, device=vis.device)[:, None]
    k_pos = torch.arange(Tk, device=vis.device)[None, :]
    candidates = [(True, window)] if causal else []
    candidates.append((False, None))
    for c, w in candidates:
        rule = visible(q_pos, k_pos, causal=c, window_frames=w if c else None)
        if torch.equal(rows, rule[None] & kpm[:, None, :]):
            return c, kpm.expand(B, Tk)
    return None


def _attention_with_mask(query, key, value, mask, scale):
    """The exact slow path: float32 softmax(q k^T * scale + mask) v with any broadcastable
    4-D bool or additive mask; rows without a visible key give zeros (as df_attention)."""
    B, Hq, Tq, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    q = query.float().reshape(B, Hkv, G, Tq, D)
    scores = (q * scale) @ key.float()[:, :, None].transpose(-1, -2)  # [B, Hkv, G, Tq, Tk]
    m = mask if mask.shape[1] == 1 else mask.reshape(mask.shape[0], Hkv, G, *mask.shape[2:])
    m = m[:, :, None] if mask.shape[1] == 1 else m
    if m.dtype == torch.bool:
        scores = scores.masked_fill(~m, float("-inf"))
    else:
        scores = scores + m.float()
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    out = p @ value.float()[:, :, None]
    return out.reshape(B, Hq, Tq, value.shape[-1]).to(query.dtype)


def fastdf_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs):
    """The attention function registered in AttentionInterface: q ``[B, Hq, Tq, D]``, k
    ``[B, Hkv, Tk, D]``, v ``[B, Hkv, Tk, Dv]`` (Dv = D but for latent attention) ->
    ``([B, Tq, Hq, Dv], None)`` like HF's sdpa_attention_forward."""
    if dropout:
        raise ValueError(f"fastdf attention has no attention dropout (got dropout={dropout}); set the config's "
                         f"attention_dropout to 0")
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"fastdf attention does not support {unsupported} (this model passes one); use "
                             f"attn_implementation='sdpa' or 'eager'")
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions", "fastdf attention never materialises attention weights: "
                   "output_attentions=True returns None weights (as sdpa); use attn_implementation='eager' for them")
    window = kwargs.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"fastdf attention: sliding_window must be a positive int, got {window!r}")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    B, _, Tq, _ = query.shape
    kpm = None
    if attention_mask is None:
        pass
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dtype in (CAUSAL_KEYS, BIDIRECTIONAL_KEYS) \
            and attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1):
        causal = attention_mask.dtype == CAUSAL_KEYS
        used = attention_mask.shape[-1]
        if used < key.shape[2]:  # a static cache's unused tail
            key, value = key[:, :, :used], value[:, :, :used]
        if causal and Tq == 1:
            window = None  # the builder folded it into the mask, at the true query position
        kpm = attention_mask[:, 0, 0, :].view(torch.bool).expand(B, -1)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        vis = _prepared_mask_visibility(attention_mask)
        found = None if vis is None else _in_disguise(vis, B, Tq, key.shape[2], causal, window)
        if found is None:
            _warn_once("prepared-mask", "fastdf attention got a prepared 4-D mask it cannot express as a causal, "
                       "window or padding mask; computing through the float32 torch reference with that exact "
                       "mask (correct but slow)")
            return _attention_with_mask(query, key, value, attention_mask, scale).transpose(1, 2), None
        causal, kpm = found
        if not causal:
            window = None
    else:
        raise ValueError(f"fastdf attention got a mask of type {type(attention_mask).__name__} "
                         f"(shape {tuple(getattr(attention_mask, 'shape', ()))}); it takes None, 4-D tensors and "
                         f"the masks its own builder makes (import fastdf.integrations.hf_attention first)")
    if Tq > key.shape[2]:
        raise ValueError(f"fastdf attention needs at most as many queries ({Tq}) as keys ({key.shape[2]})")
    value_dim = value.shape[-1]
    if value_dim != query.shape[-1]:
        # Multi-head latent attention (DeepSeek-V2/V3): value heads narrower (or wider) than
        # q/k's. Zero columns change neither q . k nor the weights' products, so one head
        # dim for all three, the output cut back (what HF's flash-attention path does; the
        # scale was taken from q's own head dim above)
        query, key, value = _same_head_dim(query, key, value)
    out = df_attention(query, key, value, causal=causal, window_frames=window if causal else None, scale=scale,
                       key_padding_mask=kpm)
    if out.shape[-1] != value_dim:
        out = out[..., :value_dim]
    return out.transpose(1, 2), None


def _same_head_dim(*ts):
    """``ts`` zero-padded on the last dim to the widest one's (differentiable)."""
    width = max(t.shape[-1] for t in ts)
    return tuple(t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in ts)


def register(name: str = NAME):
    """Register the attention function and the mask builder under ``name`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fastdf_attention_forward)
    AttentionMaskInterface.register(name, fastdf_mask)


register()

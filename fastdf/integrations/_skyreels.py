"""The fastdf forward passes of diffusers' SkyReels-V2 transformer (diffusers 0.42.1).

Private to :mod:`fastdf.integrations.diffusers`, which installs them. Each function keeps
the stock computation (``diffusers/models/transformers/transformer_skyreels_v2.py``)
operation for operation, except for the two places the stock model spends memory it does
not need:

- self-attention: the stock forward builds a dense boolean ``[L, L]`` block-causal mask
  (``num_frame_per_block > 1``) and hands it to SDPA; here a :class:`FrameLayout` travels in
  the ``attention_mask`` slot instead and the attention runs through
  :func:`fastdf.df_attention` with ``frame_size = tokens per frame x num_frame_per_block``;
- AdaLN: with ``enable_diffusion_forcing`` the stock forward repeats the per-frame
  ``[B, F, 6, C]`` modulation table to every token (an fp32 ``[B, 6, L, C]`` tensor); here
  the blocks receive the per-frame table and read it through
  :func:`fastdf.adaln_modulate` / :func:`fastdf.gated_residual`.

With ``apply(..., cache=True)`` the forward also takes a :class:`BlockCache` (one per
cache context): leading frame blocks whose inputs equal the previous call's keep their
per-layer K/V and output tokens, and the blocks run on the remaining tokens only (the
processor receives a :class:`CachedFrameLayout` carrying the reused K/V; the rotary
embedding and the per-frame tables are sliced to the new tokens' absolute positions).
Exact by frame-block causality: nothing after a block reaches its K/V or its output.

The fp32 semantics of the stock model are kept: the norm and the modulation run in fp32
on ``hidden_states.float()`` and are cast back to the stream's dtype; the gated residuals
are computed in fp32 (``x.float() + y * gate``) and cast back.
"""

from __future__ import annotations

import dataclasses

import torch

from ..ops.adaln import adaln_modulate, gated_residual
from ..ops.attention import df_attention


@dataclasses.dataclass(frozen=True)
class FrameLayout:
    """What the fastdf self-attention processor receives in place of the ``[L, L]`` mask:
    keys of frame block ``j // frame_size`` are visible to queries of block
    ``>= j // frame_size`` (``frame_size`` = tokens per latent frame x frames per block)."""

    frame_size: int


@dataclasses.dataclass(frozen=True, eq=False)
class CachedFrameLayout(FrameLayout):
    """A :class:`FrameLayout` for one block of a cached call (``apply(..., cache=True)``):
    the queries are the newest tokens, at positions ``prefix ..``. ``buffers`` is the layer's
    ``(k, v)`` ``[B, capacity, H, D]`` from the previous call (post QK-norm and rotary; or
    None), whose first ``prefix`` tokens are reused; the processor writes this call's new
    keys/values after them (in place: the cache owns the buffers, and tokens after the
    prefix are stale anyway), allocating larger buffers when the call has more tokens than
    ``capacity``, and appends the buffers to ``store``."""

    prefix: int = 0
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    store: list | None = None

    def kv_buffers(self, key: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's buffers with room for ``total`` tokens (``key`` gives batch, heads,
        head dim, dtype and device); a larger allocation keeps the reused prefix."""
        if self.buffers is not None and self.buffers[0].shape[1] >= total:
            return self.buffers
        shape = (key.shape[0], total, *key.shape[2:])
        k_buf = torch.empty(shape, dtype=key.dtype, device=key.device)
        v_buf = torch.empty(shape, dtype=key.dtype, device=key.device)
        if self.prefix:
            k_buf[:, :self.prefix] = self.buffers[0][:, :self.prefix]
            v_buf[:, :self.prefix] = self.buffers[1][:, :self.prefix]
        return k_buf, v_buf


class FastdfSkyReelsAttnProcessor:
    """Self-attention processor for ``SkyReelsV2Attention`` (the blocks' ``attn1``) that runs
    :func:`fastdf.df_attention`.

    Same steps as diffusers' ``SkyReelsV2AttnProcessor`` (Q/K/V projections, fused or not;
    RMS QK-norm across heads; the interleaved rotary embedding; output projection); only
    the attention itself differs. ``attention_mask`` is ``None`` (every token sees every
    token, ``num_frame_per_block == 1``) or a :class:`FrameLayout` (frame-block causal);
    a dense mask tensor is refused: install it with ``fastdf.integrations.diffusers.apply``,
    which also replaces the forward that would build that mask.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: FrameLayout | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attn.add_k_proj is not None or attn.is_cross_attention:
            raise ValueError("FastdfSkyReelsAttnProcessor serves the self-attention (attn1) only; "
                             "keep diffusers' processor on the cross-attention (attn2)")
        if attention_mask is not None and not isinstance(attention_mask, FrameLayout):
            raise ValueError("attention_mask: FastdfSkyReelsAttnProcessor takes no dense mask (got "
                             f"{type(attention_mask).__name__}); use fastdf.integrations.diffusers.apply(transformer), "
                             "which also replaces the forward that builds the [L, L] mask")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if isinstance(attention_mask, CachedFrameLayout):
            # The new tokens' K/V go straight into the cache's buffers after the reused
            # prefix (rotary written there), so no prefix copy and one K/V set per layer.
            prefix, total = attention_mask.prefix, attention_mask.prefix + key.shape[1]
            k_buf, v_buf = attention_mask.kv_buffers(key, total)
            if rotary_emb is not None:
                query = apply_rotary_emb(query, *rotary_emb)
                apply_rotary_emb(key, *rotary_emb, out=k_buf[:, prefix:total])
            else:
                k_buf[:, prefix:total] = key
            v_buf[:, prefix:total] = value
            attention_mask.store.append((k_buf, v_buf))
            key, value = k_buf[:, :total], v_buf[:, :total]
        elif rotary_emb is not None:
            query = apply_rotary_emb(query, *rotary_emb)
            key = apply_rotary_emb(key, *rotary_emb)

        # [B, L, H, D] storage viewed as [B, H, L, D]: df_attention reads the strides as they are
        # (with a cache Tq < Tk: the queries are the newest tokens, as df_attention places them).
        if attention_mask is None:
            out = df_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=False)
        else:
            out = df_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                               frame_size=attention_mask.frame_size, causal=True)
        hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(query)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The stock processor's rotary embedding (interleaved pairs), unchanged: same dtype
    promotion (products in the frequencies' dtype, stored in the input's). ``out`` (the
    input's shape and dtype) receives the result instead of a new tensor."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    if out is None:
        out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def _modulate(norm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(norm(x.float()) * (1 + scale) + shift).type_as(x)`` with per-frame tables, where
    ``norm`` is the block's FP32LayerNorm (its eps and affine, if any, in fp32)."""
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return adaln_modulate(x.float(), shift, scale, norm="layer", weight=weight, bias=bias, eps=norm.eps).type_as(x)


def _tables(scale_shift_table: torch.Tensor, temb: torch.Tensor, batch: int, *, upcast: bool) -> list[torch.Tensor]:
    """``scale_shift_table`` ``[1, n, C]`` plus the per-frame ``temb`` ``[b, n, F, C]`` (or
    per-sample ``[b, n, C]``), with the stock dtype rule (the blocks add ``temb.float()``,
    the output norm adds ``temb`` as it is), as n contiguous ``[batch, F, C]`` tables
    (b == 1 broadcasts over the batch as in the stock forward). Frame-sized: nothing here
    has a token dimension."""
    if temb.dim() == 3:
        temb = temb.unsqueeze(2)
    e = scale_shift_table.unsqueeze(2) + (temb.float() if upcast else temb)
    e = e.expand(batch, -1, -1, -1).transpose(0, 1).contiguous()
    return list(e.unbind(0))


def block_forward(block, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                  rotary_emb, attention_mask: FrameLayout | None) -> torch.Tensor:
    """``SkyReelsV2TransformerBlock.forward`` with a per-frame ``temb`` ``[b, 6, F, C]``
    (``enable_diffusion_forcing``; the stock block takes it per token, ``F = L``) or a
    per-sample ``[b, 6, C]``, and a :class:`FrameLayout` (or None) instead of a mask."""
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = _tables(
        block.scale_shift_table, temb, hidden_states.shape[0], upcast=True)

    # 1. Self-attention
    norm_hidden_states = _modulate(block.norm1, hidden_states, shift_msa, scale_msa)
    attn_output = block.attn1(norm_hidden_states, None, attention_mask, rotary_emb)
    hidden_states = gated_residual(hidden_states, attn_output, gate_msa)

    # 2. Cross-attention (unchanged: diffusers' processor, no mask)
    norm_hidden_states = block.norm2(hidden_states.float()).type_as(hidden_states)
    attn_output = block.attn2(norm_hidden_states, encoder_hidden_states, None, None)
    hidden_states = hidden_states + attn_output

    # 3. Feed-forward
    norm_hidden_states = _modulate(block.norm3, hidden_states, c_shift_msa, c_scale_msa)
    ff_output = block.ffn(norm_hidden_states)
    return gated_residual(hidden_states, ff_output, c_gate_msa)


def _check_call(model, hidden_states, timestep, encoder_hidden_states_image, enable_diffusion_forcing, fps):
    """Inputs the stock forward would mis-handle or fail on deep inside: refused up front."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        raise ValueError("hidden_states must be a [B, C, F, H, W] tensor, got "
                         + (f"shape {tuple(hidden_states.shape)}" if isinstance(hidden_states, torch.Tensor)
                            else type(hidden_states).__name__))
    if not isinstance(timestep, torch.Tensor):
        raise TypeError(f"timestep must be a torch.Tensor, got {type(timestep).__name__}")
    batch, _, num_frames = hidden_states.shape[:3]
    frames = num_frames // model.config.patch_size[0]
    if enable_diffusion_forcing:
        if timestep.dim() != 2 or timestep.shape[1] != frames or timestep.shape[0] not in (1, batch):
            raise ValueError(f"timestep must have shape [{batch}, {frames}] (one timestep per latent frame) with "
                             f"enable_diffusion_forcing=True, got {tuple(timestep.shape)}")
    elif timestep.dim() != 1 or timestep.shape[0] not in (1, batch):
        raise ValueError(f"timestep must have shape [{batch}] with enable_diffusion_forcing=False, got "
                         f"{tuple(timestep.shape)} (per-frame timesteps need enable_diffusion_forcing=True)")
    block = model.config.num_frame_per_block
    if block > 1 and frames % block:
        raise ValueError(f"hidden_states has {frames} latent frames, not a multiple of num_frame_per_block={block} "
                         "(the stock forward fails on this too)")
    if encoder_hidden_states_image is not None and model.condition_embedder.image_embedder is None:
        raise ValueError("encoder_hidden_states_image was given but the model has no image embedder (image_dim=None)")
    if model.config.inject_sample_info:
        if fps is None:
            raise ValueError("fps is required: the model was built with inject_sample_info=True")
        classes = torch.as_tensor(fps)
        if classes.dim() != 1 or classes.numel() not in (1, batch) or classes.is_floating_point():
            raise ValueError(f"fps must be a list or 1-D integer tensor of 1 or {batch} fps classes, got {fps!r}")
        if bool(((classes < 0) | (classes >= model.fps_embedding.num_embeddings)).any()):
            raise ValueError(f"fps classes must be in [0, {model.fps_embedding.num_embeddings}) "
                             f"(the pipeline maps 16 fps to 0, anything else to 1), got {fps!r}")


class BlockCache:
    """One cache context's memory of its previous call (``apply(..., cache=True)``): the
    inputs that decide reuse, every layer's key/value buffers ``[B, >= L, H, D]`` and the
    output tokens ``[B, L, C_out]`` of that call. Bounded by one call's K/V (the buffers
    are rewritten in place, never duplicated) and output."""

    def __init__(self):
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.key = None  # everything but the latents and per-frame timesteps (tensors as snapshots)
        self.seen = None  # per key entry: (the caller's tensor, its version) when it last matched
        self.latents = None  # [B, C, F, H, W] of the previous call
        self.timestep = None  # [b, F] per-frame timesteps of the previous call
        self.kv = None  # per layer (k, v) buffers
        self.out = None  # [B, L, C_out] output tokens before unpatchify


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _snapshot(x):
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def _version(t: torch.Tensor):
    """Autograd's in-place write counter of ``t`` (None for inference tensors, which have none)."""
    return None if t.is_inference() else t._version


def _key_matches(cache: BlockCache, key: tuple) -> bool:
    """Whether ``key`` equals the previous call's. Fast path per tensor: the very tensor that
    matched last time, not written in place since (same version counter: the check autograd
    uses for saved tensors), is equal without reading it; otherwise ``torch.equal`` against
    the snapshot. The pipelines pass the same prompt embeddings every step, so after the
    first step nothing is read."""
    if cache.key is None or len(cache.key) != len(key):
        return False
    for i, (old, new) in enumerate(zip(cache.key, key)):
        if isinstance(new, torch.Tensor):
            seen = cache.seen[i]
            if seen is not None and seen[0] is new and seen[1] is not None and seen[1] == _version(new):
                continue
            if not _same(old, new):
                return False
            cache.seen[i] = (new, _version(new))
        elif not _same(old, new):
            return False
    return True


def _remember_key(cache: BlockCache, key: tuple) -> None:
    cache.key = tuple(_snapshot(x) for x in key)
    cache.seen = [(x, _version(x)) if isinstance(x, torch.Tensor) else None for x in key]


def _reusable_blocks(cache: BlockCache, hidden_states, timestep, frames_per_block: int, p_t: int) -> int:
    """How many leading frame blocks of this call have exactly the latents and timesteps
    they had in the previous call (same block index, so same positions; the rest of the key
    already matched): their K/V and outputs are reused. One elementwise comparison and one
    host read for all blocks (``!=`` is ``torch.equal``'s equality: NaN differs, -0 == 0)."""
    n = min(hidden_states.shape[2], cache.latents.shape[2]) // (frames_per_block * p_t)
    if n == 0:
        return 0
    frames = n * frames_per_block * p_t
    changed = cache.latents[:, :, :frames].ne(hidden_states[:, :, :frames]).any(dim=(0, 1, 3, 4)).view(n, -1).any(1)
    if timestep.dim() == 2:
        ts = n * frames_per_block
        changed = changed | cache.timestep[:, :ts].ne(timestep[:, :ts]).any(0).view(n, frames_per_block).any(1)
    return next((b for b, c in enumerate(changed.tolist()) if c), n)


def transformer_forward(model, hidden_states: torch.Tensor, timestep: torch.Tensor,
                        encoder_hidden_states: torch.Tensor, encoder_hidden_states_image: torch.Tensor | None = None,
                        enable_diffusion_forcing: bool = False, fps=None, return_dict: bool = True,
                        attention_kwargs=None, *, _cache: BlockCache | None = None, _stats: dict | None = None,
                        _cache_extra=None):
    """``SkyReelsV2Transformer3DModel.forward`` without the ``[L, L]`` mask and without the
    per-token modulation table (see the module docstring); same arguments and outputs.

    One difference where the stock forward fails: with ``inject_sample_info`` and
    ``enable_diffusion_forcing``, a batch of several fps values raises inside the stock
    forward (``repeat`` over frames mixes batch rows); here row b gets ``fps[b]``."""
    enable_diffusion_forcing = bool(enable_diffusion_forcing)
    _check_call(model, hidden_states, timestep, encoder_hidden_states_image, enable_diffusion_forcing, fps)
    batch_size, num_channels, num_frames, height, width = hidden_states.shape
    p_t, p_h, p_w = model.config.patch_size
    post_patch_num_frames = num_frames // p_t
    post_patch_height = height // p_h
    post_patch_width = width // p_w
    block_frames = model.config.num_frame_per_block
    layout = FrameLayout(post_patch_height * post_patch_width * block_frames) if block_frames > 1 else None
    tokens_per_frame = post_patch_height * post_patch_width
    total_tokens = post_patch_num_frames * tokens_per_frame

    # Reuse needs frame-block causality (num_frame_per_block > 1: later blocks never change
    # earlier ones) and no autograd (cached tensors carry no graph).
    cache = _cache if layout is not None and not torch.is_grad_enabled() else None
    reused_frames = 0
    if cache is not None:
        key = (hidden_states.shape[:2], hidden_states.shape[3:], hidden_states.dtype, hidden_states.device,
               block_frames, enable_diffusion_forcing, timestep.shape[0], timestep.dtype,
               None if enable_diffusion_forcing else timestep, encoder_hidden_states, encoder_hidden_states_image,
               None if fps is None else tuple(torch.as_tensor(fps).tolist()), _cache_extra)
        key_matches = cache.latents is not None and _key_matches(cache, key)
        if key_matches:
            reused_frames = block_frames * _reusable_blocks(
                cache, hidden_states, timestep if enable_diffusion_forcing else timestep[:, None], block_frames, p_t)
    prefix = reused_frames * tokens_per_frame
    if _stats is not None:
        _stats["calls"] += 1
        _stats["tokens_total"] += total_tokens
        _stats["tokens_computed"] += total_tokens - prefix

    rotary_emb = model.rope(hidden_states)
    raw_latents, raw_timestep = hidden_states, (timestep if enable_diffusion_forcing else timestep[:, None])

    hidden_states = model.patch_embedding(hidden_states)
    hidden_states = hidden_states.flatten(2).transpose(1, 2)

    temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = model.condition_embedder(
        timestep, encoder_hidden_states, encoder_hidden_states_image
    )
    timestep_proj = timestep_proj.unflatten(-1, (6, -1))  # [b, 6, C], or [b, F, 6, C] per frame

    if encoder_hidden_states_image is not None:
        encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

    if model.config.inject_sample_info:
        fps = torch.as_tensor(fps, dtype=torch.long, device=hidden_states.device)
        fps_proj = model.fps_projection(model.fps_embedding(fps)).unflatten(1, (6, -1))  # [b, 6, C]
        # Per frame: the same per-sample vector on every frame of its row (stock: repeat, batch 1 only).
        timestep_proj = timestep_proj + (fps_proj.unsqueeze(1) if enable_diffusion_forcing else fps_proj)

    if enable_diffusion_forcing:
        timestep_proj = timestep_proj.transpose(1, 2)  # [b, 6, F, C]: per frame, not per token

    if cache is not None:
        output_tokens = _cached_blocks(model, cache, None if key_matches else key, hidden_states, encoder_hidden_states, timestep,
                                       timestep_proj, temb, rotary_emb, layout.frame_size, prefix, reused_frames,
                                       enable_diffusion_forcing, raw_latents, raw_timestep)
        return _unpatchify(output_tokens, batch_size, post_patch_num_frames, post_patch_height, post_patch_width,
                           (p_t, p_h, p_w), return_dict)

    if torch.is_grad_enabled() and model.gradient_checkpointing:
        for block in model.blocks:
            hidden_states = model._gradient_checkpointing_func(
                block, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, layout)
    else:
        for block in model.blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, layout)

    # temb: [b, C] (one timestep per sample) or [b, F, C] (per frame)
    shift, scale = _tables(model.scale_shift_table, temb.unsqueeze(1), hidden_states.shape[0], upcast=False)
    shift = shift.to(hidden_states.device)
    scale = scale.to(hidden_states.device)
    hidden_states = _modulate(model.norm_out, hidden_states, shift, scale)

    hidden_states = model.proj_out(hidden_states)
    return _unpatchify(hidden_states, batch_size, post_patch_num_frames, post_patch_height, post_patch_width,
                       (p_t, p_h, p_w), return_dict)


def _output_norm(model, hidden_states, temb):
    shift, scale = _tables(model.scale_shift_table, temb.unsqueeze(1), hidden_states.shape[0], upcast=False)
    shift = shift.to(hidden_states.device)
    scale = scale.to(hidden_states.device)
    return model.proj_out(_modulate(model.norm_out, hidden_states, shift, scale))


def _cached_blocks(model, cache, key, hidden_states, encoder_hidden_states, timestep, timestep_proj, temb,
                   rotary_emb, frame_size, prefix, reused_frames, enable_diffusion_forcing, raw_latents,
                   raw_timestep):
    """The blocks and output head on the tokens after ``prefix`` only: the leading tokens'
    per-layer K/V and output tokens come from ``cache`` (same inputs, and by frame-block
    causality nothing after them reaches them); then ``cache`` remembers this call."""
    total = hidden_states.shape[1]
    new = hidden_states
    if prefix:  # (no-op slices skipped: at small sizes every op is host time)
        new = hidden_states[:, prefix:]
        if enable_diffusion_forcing:
            timestep_proj = timestep_proj[:, :, reused_frames:]  # [b, 6, F, C]: per frame
            temb = temb[:, reused_frames:]  # [b, F, C]
        rotary_emb = tuple(r[:, prefix:] for r in rotary_emb)  # [1, L, 1, D]: absolute positions
    if prefix < total:
        # The buffers are reused whenever the shapes allow (the key matched: same batch,
        # spatial size and dtype), even with nothing to reuse: no per-call allocation.
        old = cache.kv if key is None and cache.kv is not None else [None] * len(model.blocks)
        kv = []
        cache.kv = cache.latents = None  # being overwritten: nothing reusable if this call fails midway
        for block, buffers in zip(model.blocks, old):
            layout = CachedFrameLayout(frame_size, prefix=prefix, buffers=buffers, store=kv)
            new = block(new, encoder_hidden_states, timestep_proj, rotary_emb, layout)
        out = _output_norm(model, new, temb)
        if prefix:
            out = torch.cat([cache.out[:, :prefix], out], dim=1)
    else:  # every block reused
        kv = cache.kv
        out = cache.out[:, :total]
    if key is not None:  # the key changed (or first call): remember the new one
        _remember_key(cache, key)
    cache.latents = raw_latents.detach().clone()
    cache.timestep = raw_timestep.detach().clone()
    cache.kv = kv
    cache.out = out
    return out


def _unpatchify(hidden_states, batch_size, post_patch_num_frames, post_patch_height, post_patch_width, patch,
                return_dict):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    p_t, p_h, p_w = patch
    hidden_states = hidden_states.reshape(
        batch_size, post_patch_num_frames, post_patch_height, post_patch_width, p_t, p_h, p_w, -1
    )
    hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
    output = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)

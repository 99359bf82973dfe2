"""``DFTransformer``: the reference frame-causal denoiser of the Diffusion Forcing toolkit."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..ops import _checks
from ..ops.adaln import adaln_modulate
from ..nn import DFBlock, KVCache
from ..nn.attention import MAX_SIZE

NORMS = ("layer", "rms")


def level_features(levels: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features ``[..., dim]`` (float32) of integer noise levels (DiT's timestep
    embedding: ``cos`` then ``sin`` of ``level * max_period ** (-i / (dim / 2))``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=levels.device, dtype=torch.float32) / half)
    args = levels.to(torch.float32)[..., None] * freqs
    out = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return torch.nn.functional.pad(out, (0, dim % 2))


def _sincos_1d(positions: Tensor, dim: int) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([args.sin(), args.cos()], 1)


def _token_positions(grid: tuple[int, ...], dim: int) -> Tensor | None:
    """Fixed sin-cos embedding ``[tokens, dim]`` of each token's place inside its frame: 2-D for
    a grid of patches (half the channels per axis, as DiT), 1-D for a row of tokens, none
    for a single token."""
    if math.prod(grid) == 1:
        return None
    if len(grid) == 1:
        return _sincos_1d(torch.arange(grid[0]), dim).float()
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.cat([_sincos_1d(ys.flatten(), dim // 2), _sincos_1d(xs.flatten(), dim // 2)], 1).float()


class DFTransformerCache:
    """The :class:`~fastdf.diffusion_forcing.protocol.DFCache` of a :class:`DFTransformer`:
    one :class:`~fastdf.nn.KVCache` per block, all holding the same frames.

    ``frames`` counts every frame ever committed (the next frame's position). With a window
    (``window_frames``, ``sink_frames``) each layer keeps only the sinks and the
    ``window_frames - 1`` most recent frames (what later queries can still see).
    """

    def __init__(self, layers: list[KVCache], batch: int, window_frames: int | None, sink_frames: int):
        self.layers, self.batch = layers, batch
        self.window_frames, self.sink_frames = window_frames, sink_frames

    @property
    def frames(self) -> int:
        return self.layers[0].frames

    @property
    def cached_frames(self) -> int:
        """Frames held now (after eviction)."""
        return self.layers[0].cached_frames

    def __repr__(self):
        return (f"DFTransformerCache(frames={self.frames}, cached_frames={self.cached_frames}, batch={self.batch}, "
                f"window_frames={self.window_frames}, sink_frames={self.sink_frames})")


class DFTransformer(nn.Module):
    """Frame-causal diffusion transformer with per-frame noise levels (Diffusion Forcing).

    Pipeline: frames -> tokens (2-D patches of ``patch_size`` for image frames
    ``(C, H, W)``; each row of ``(tokens, D)`` frames; one token for vector frames ``(D,)``) ->
    linear embedding + fixed sin-cos position of the token inside its frame -> ``depth``
    :class:`~fastdf.nn.DFBlock` s (per-frame AdaLN-Zero conditioned on the frame's noise level,
    frame-causal ``fastdf.df_attention`` with rotary embeddings over *frame* positions) ->
    final per-frame AdaLN -> linear -> frames. Conditioning per frame: sinusoidal features of
    the training level -> MLP -> ``[B, F, dim]``, plus ``cond_proj(cond)`` when the model
    was built with ``cond_dim``.

    Args:
        frame_shape: one frame's shape: ``(D,)``, ``(tokens, D)`` or ``(C, H, W)``.
        dim, depth, num_heads, num_kv_heads, mlp_ratio, qk_norm, norm, eps: the blocks'.
        patch_size: side of the square patches of image frames (H and W must be multiples).
        rope_theta: rotary base over frame positions (None: no rotary; then only the order
            of frames and the mask tell frames apart).
        cond_dim: width of an optional user conditioning (``cond=`` in forward).
        level_dim: width of the sinusoidal level features.

    **The model protocol** (:class:`fastdf.diffusion_forcing.DFModel`; write your own causal
    model to it and :class:`~fastdf.diffusion_forcing.Sampler` drives it the same way)::

        pred = model(x, levels, *, cache=None, commit=0, window_frames=None, sink_frames=0)
        cache = model.new_cache(batch, max_frames, *, window_frames=None, sink_frames=0)

    - ``x`` ``[B, F, *frame_shape]`` noisy frames, ``levels`` int64 ``[B, F]`` their training
      noise levels (0 clean); ``pred`` is shaped like ``x`` (eps, v or x0: whatever it was
      trained on).
    - Frame-causal: frame i's tokens attend to every cached frame and to frames ``0 .. i`` of
      ``x``. ``window_frames``/``sink_frames`` add ``df_attention``'s window: a query frame at
      position p sees key frames j with ``p - j < window_frames`` or ``j < sink_frames``.
    - Positions: frame i of ``x`` sits at ``cache.frames + i`` (``i`` without a cache).
    - ``cache`` (from ``new_cache``): ``x`` follows the committed frames; ``commit=n`` appends
      the keys/values of x's first n frames, as computed in this call (``cache.frames += n``);
      ``commit=0`` stores nothing (frames still being denoised). A cache made with a window
      evicts frames no later query can see (keeps the sinks and the ``window_frames - 1``
      most recent) and must be called with that same window; ``cache.frames`` keeps counting
      every committed frame, so positions stay absolute for the cache's whole life.
    - Exactness: committing a prefix (in one call or several), then calling on the rest,
      equals one cache-free call on the whole sequence with the same window, to rounding
      (``dforce.check_model`` verifies it, with and without a window).

    Under the sampler's ``cache_policy="window"`` (phase-1 protocol) the model is called with
    no window and a fresh cache per window (positions restart at 0); under ``"rolling"`` with
    the sampler's window and one cache for the whole rollout.
    """

    def __init__(self, frame_shape: Sequence[int], *, dim: int = 256, depth: int = 6, num_heads: int = 4,
                 num_kv_heads: int | None = None, patch_size: int = 1, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 rope_theta: float | None = 10000.0, cond_dim: int | None = None, level_dim: int = 256,
                 norm: str = "layer", eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        frame_shape = tuple(frame_shape) if isinstance(frame_shape, (tuple, list, torch.Size)) else frame_shape
        if not isinstance(frame_shape, tuple) or not 1 <= len(frame_shape) <= 3 or not all(
                isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_SIZE for s in frame_shape):
            raise ValueError(f"frame_shape must be (D,), (tokens, D) or (C, H, W) of ints in 1..{MAX_SIZE}, "
                             f"got {frame_shape!r}")
        if math.prod(frame_shape) > MAX_SIZE:
            raise ValueError(f"frame_shape {frame_shape} has more than {MAX_SIZE} elements per frame")
        for name, value in (("dim", dim), ("depth", depth), ("num_heads", num_heads), ("patch_size", patch_size),
                            ("level_dim", level_dim)):
            _checks.number(name, value, low=1, high=MAX_SIZE, integer=True)
        if num_kv_heads is not None:
            _checks.number("num_kv_heads", num_kv_heads, low=1, high=MAX_SIZE, integer=True)
        if cond_dim is not None:
            _checks.number("cond_dim", cond_dim, low=1, high=MAX_SIZE, integer=True)
        if rope_theta is not None:
            _checks.finite_float("rope_theta", rope_theta, low=1, low_open=True)
        _checks.finite_float("mlp_ratio", mlp_ratio, low=0, low_open=True)
        _checks.finite_float("eps", eps, low=0, low_open=True)
        if len(frame_shape) == 3:
            C, H, W = frame_shape
            if H % patch_size or W % patch_size:
                raise ValueError(f"patch_size ({patch_size}) must divide the frame's H and W, got frame_shape {frame_shape}")
            grid = (H // patch_size, W // patch_size)
            patch_dim = C * patch_size * patch_size
        else:
            if patch_size != 1:
                raise ValueError(f"patch_size applies to image frames (C, H, W); got {patch_size} for frame_shape "
                                 f"{frame_shape}")
            grid = (1,) if len(frame_shape) == 1 else (frame_shape[0],)
            patch_dim = frame_shape[-1]
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        if len(grid) == 2 and dim % 4:
            raise ValueError(f"dim must be a multiple of 4 for the 2-D patch positions, got {dim}")
        if not isinstance(norm, str):
            raise TypeError(f"norm must be a str (one of {', '.join(NORMS)}), got {type(norm).__name__}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
        kw = dict(device=device, dtype=dtype)
        self.frame_shape = frame_shape
        self.patch_size, self.grid = patch_size, grid
        self.tokens_per_frame = math.prod(grid)
        self.dim, self.level_dim, self.cond_dim, self.norm, self.eps = dim, level_dim, cond_dim, norm, eps
        self.rope_theta = rope_theta
        self.embed = nn.Linear(patch_dim, dim, **kw)
        pos = _token_positions(grid, dim)
        self.register_buffer("token_pos", None if pos is None else pos.to(device=device, dtype=dtype), persistent=False)
        self.level_mlp = nn.Sequential(nn.Linear(level_dim, dim, **kw), nn.SiLU(), nn.Linear(dim, dim, **kw))
        self.cond_proj = nn.Linear(cond_dim, dim, **kw) if cond_dim is not None else None
        self.blocks = nn.ModuleList(
            DFBlock(dim, num_heads, num_kv_heads=num_kv_heads, mlp_ratio=mlp_ratio, frame_size=self.tokens_per_frame,
                    qk_norm=qk_norm, rope_theta=rope_theta, norm=norm, eps=eps, **kw)
            for _ in range(depth))
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, **kw))
        self.head = nn.Linear(dim, patch_dim, **kw)
        self._init_weights()

    def _init_weights(self):
        # DiT: xavier linears, N(0, 0.02) level MLP, zero final modulation and head (a new
        # model predicts 0); the blocks' AdaLN-Zero modulations stay as DFBlock zeroed them.
        keep = {id(block.modulation[1]) for block in self.blocks}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in keep:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in (self.level_mlp[0], self.level_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in (self.final_modulation[1], self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------ frames <-> tokens

    def patchify(self, x: Tensor) -> Tensor:
        """``[B, F, *frame_shape]`` -> tokens ``[B, F * tokens_per_frame, patch_dim]``."""
        _checks.tensor("x", x, ndim=2 + len(self.frame_shape))
        _checks.shape("x", x, (None, None, *self.frame_shape), what="([B, F, *frame_shape])")
        B, F = x.shape[:2]
        if len(self.frame_shape) == 3:
            C, H, W = self.frame_shape
            p = self.patch_size
            x = x.reshape(B, F, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(B, F * self.tokens_per_frame, -1)

    def unpatchify(self, tokens: Tensor, B: int, F: int) -> Tensor:
        """Inverse of :meth:`patchify`."""
        _checks.tensor("tokens", tokens, ndim=3)
        _checks.number("B", B, low=0, integer=True)
        _checks.number("F", F, low=0, integer=True)
        _checks.shape("tokens", tokens, (B, F * self.tokens_per_frame, self.head.out_features),
                      what="([B, F * tokens_per_frame, patch_dim])")
        if len(self.frame_shape) == 3:
            C, H, W = self.frame_shape
            p = self.patch_size
            x = tokens.reshape(B, F, H // p, W // p, C, p, p).permute(0, 1, 4, 2, 5, 3, 6)
            return x.reshape(B, F, C, H, W)
        return tokens.reshape(B, F, *self.frame_shape)

    # ------------------------------------------------------------------ the protocol

    def new_cache(self, batch: int, max_frames: int, *, window_frames: int | None = None,
                  sink_frames: int = 0) -> DFTransformerCache:
        """An empty cache for ``batch`` rows. ``max_frames``: frames that will be committed to it
        (with a window, the layers hold only ``sink_frames + window_frames - 1`` of them)."""
        _checks.number("batch", batch, low=1, integer=True)
        _checks.number("max_frames", max_frames, low=1, integer=True)
        self._check_window(window_frames, sink_frames)
        if window_frames is None and max_frames > MAX_SIZE // self.tokens_per_frame:
            # Without a window every committed frame stays: the layers preallocate all of them.
            raise ValueError(f"max_frames must be <= {MAX_SIZE // self.tokens_per_frame} without a window "
                             f"({self.tokens_per_frame} tokens per frame, at most {MAX_SIZE} tokens), got {max_frames}")
        capacity = max_frames if window_frames is None else None
        layers = [KVCache(frame_size=self.tokens_per_frame, window_frames=window_frames,
                          sink_frames=sink_frames if window_frames is not None else 0, capacity_frames=capacity)
                  for _ in self.blocks]
        return DFTransformerCache(layers, batch, window_frames, sink_frames if window_frames is not None else 0)

    @staticmethod
    def _check_window(window_frames, sink_frames):
        if window_frames is not None:
            _checks.number("window_frames", window_frames, low=1, integer=True)
        _checks.number("sink_frames", sink_frames, low=0, integer=True)
        if sink_frames and window_frames is None:
            raise ValueError(f"sink_frames ({sink_frames}) needs window_frames (sinks are the frames a window keeps)")

    def _check(self, x, levels, cache, commit, cond, window_frames, sink_frames):
        _checks.tensor("x", x)
        if x.dim() != 2 + len(self.frame_shape) or tuple(x.shape[2:]) != self.frame_shape:
            raise ValueError(f"x must be [B, F, *frame_shape] with frame_shape {self.frame_shape}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {str(x.dtype).removeprefix('torch.')}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x must hold at least one row and one frame (B >= 1, F >= 1), got shape {tuple(x.shape)}")
        _checks.tensor("levels", levels)
        if levels.dtype.is_floating_point or levels.is_complex() or levels.dtype == torch.bool:
            raise TypeError(f"levels must be an integer tensor of noise levels, got {levels.dtype}")
        _checks.shape("levels", levels, tuple(x.shape[:2]), what="(one level per frame of x: [B, F])")
        if levels.device != x.device:
            raise ValueError(f"levels is on {levels.device} but x is on {x.device}")
        _checks.number("commit", commit, low=0, high=x.shape[1], integer=True)
        self._check_window(window_frames, sink_frames)
        if cache is None:
            if commit:
                raise ValueError("commit needs a cache (make one with model.new_cache(batch, max_frames))")
        else:
            if not isinstance(cache, DFTransformerCache) or len(cache.layers) != len(self.blocks):
                raise TypeError(f"cache must come from this model's new_cache(), got {type(cache).__name__}")
            if cache.batch != x.shape[0]:
                raise ValueError(f"x has batch {x.shape[0]} but the cache was made for batch {cache.batch}")
            if (cache.window_frames, cache.sink_frames) != (window_frames, sink_frames if window_frames else 0):
                raise ValueError(f"window_frames/sink_frames ({window_frames}, {sink_frames}) differ from the cache's "
                                 f"({cache.window_frames}, {cache.sink_frames}); pass the window the cache was made with")
        if cond is not None:
            if self.cond_proj is None:
                raise ValueError("cond given but the model was built without cond_dim")
            _checks.tensor("cond", cond, ndim=(2, 3))
            if not cond.is_floating_point():
                raise TypeError(f"cond must be a floating-point tensor, got {str(cond.dtype).removeprefix('torch.')}")
            if cond.device != x.device:
                raise ValueError(f"cond is on {cond.device} but x is on {x.device}")
            want = (x.shape[0], self.cond_dim) if cond.dim() == 2 else (x.shape[0], x.shape[1], self.cond_dim)
            _checks.shape("cond", cond, want, what="([B, cond_dim] or [B, F, cond_dim])")

    def forward(self, x: Tensor, levels: Tensor, *, cache: DFTransformerCache | None = None, commit: int = 0,
                cond: Tensor | None = None, window_frames: int | None = None, sink_frames: int = 0) -> Tensor:
        """Predictions for ``x`` ``[B, F, *frame_shape]`` at ``levels`` ``[B, F]`` (see the class
        docstring for the protocol). ``cond``: ``[B, cond_dim]`` or ``[B, F, cond_dim]``.

        Every argument is checked before anything runs, and a call that raises leaves
        ``cache`` as it was: the layers commit only once every block has run. B = 0 or F = 0
        is a ValueError, as everywhere in the Diffusion Forcing toolkit."""
        self._check(x, levels, cache, commit, cond, window_frames, sink_frames)
        B, F = x.shape[:2]
        S, C = self.tokens_per_frame, self.dim
        wdtype = self.embed.weight.dtype
        h = self.embed(self.patchify(x).to(wdtype))
        if self.token_pos is not None:
            h = (h.view(B, F, S, C) + self.token_pos.to(h.dtype)).view(B, F * S, C)
        c = self.level_mlp(level_features(levels, self.level_dim).to(wdtype))
        if cond is not None:
            extra = self.cond_proj(cond.to(wdtype))
            c = c + (extra[:, None] if extra.dim() == 2 else extra)
        positions = None
        if self.rope_theta is not None:
            start = cache.frames if cache is not None else 0
            positions = torch.arange(start, start + F, device=x.device).repeat_interleave(S)
        window = None if window_frames is None else (window_frames, sink_frames)
        try:
            # Each layer's K/V stay pending (commit_frames=0) until every block has run, so a
            # failure half-way cannot leave the layers holding different frames.
            for i, block in enumerate(self.blocks):
                h = block(h, c, cache=None if cache is None else cache.layers[i], commit_frames=0,
                          positions=positions, window=window)
            shift, scale = self.final_modulation(c).chunk(2, -1)
            h = adaln_modulate(h, shift, scale, norm=self.norm, eps=self.eps)
            out = self.unpatchify(self.head(h), B, F).to(x.dtype)
        except BaseException:
            if cache is not None:
                for layer in cache.layers:
                    layer.discard()
            raise
        if cache is not None:
            for layer in cache.layers:
                layer.commit(commit)
        return out

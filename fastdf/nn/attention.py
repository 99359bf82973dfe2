"""Frame-causal attention module and its KV cache (for Diffusion Forcing rollouts).

``DFAttention`` = qkv projection -> optional QK-norm (RMSNorm over the head dim) -> optional
rotary embedding (1-D, at absolute token positions) -> ``fastdf.df_attention`` -> output
projection. ``KVCache`` holds one layer's keys and values of *final* frames (clean or
context frames) so a sampler can run the frames it is still denoising against them.

The rollout protocol (what a KV-cached Diffusion Forcing sampler does per layer)::

    cache = attn.new_cache()                    # one per layer; frame_size/window/sinks from attn
    y = attn(x_noisy, cache=cache)              # c noisy frames vs the cache: nothing is stored,
                                                # call again next denoising step (recomputed)
    y = attn(x_final, cache=cache, commit_frames=1)   # the first frame of x is final now:
                                                # its K/V are appended after attending
    cache.frames                                # frames committed so far (= the absolute index of
                                                # the next frame; RoPE positions follow from it)

``DFBlock`` (fastdf/nn/dit.py) passes ``cache`` and ``commit_frames`` straight through.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import _checks
from ..ops.attention import df_attention

# Sizes a module is built with (widths, heads, tokens per frame) must fit the int32 the
# kernels index with; windows may be larger (a window longer than the sequence is no window).
MAX_SIZE = 2**31 - 1
# With a window, a cache preallocates room for the sinks and two windows of frames (so it
# compacts at most once every window); longer windows grow the buffer on demand instead.
PREALLOC_WINDOW_FRAMES = 1024


def _int(name, value, low, high=None):
    return _checks.number(name, value, low=low, high=high, integer=True)


def _flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _window(window_frames, sink_frames, *, name="window_frames"):
    """Validate a (window_frames, sink_frames) pair: None or an int >= 1, and an int >= 0."""
    if window_frames is not None:
        _int(name, window_frames, 1)
    _int("sink_frames", sink_frames, 0)


# ---------------------------------------------------------------------------- rotary


def rotary_cos_sin(positions: Tensor, dim: int, theta: float = 10000.0, dtype=torch.float32):
    """cos/sin tables ``[T, dim]`` for rotary embeddings at ``positions`` ``[T]`` (the
    rotate-half convention of Llama/HF: frequency i pairs lanes i and i + dim/2)."""
    _checks.tensor("positions", positions, ndim=1)
    if positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be a real tensor, got {str(positions.dtype).removeprefix('torch.')}")
    _int("dim", dim, 2)
    if dim % 2:
        raise ValueError(f"dim must be even (lanes i and i + dim/2 rotate together), got {dim}")
    _checks.finite_float("theta", theta, low=1, low_open=True)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` by tables ``[T, D]`` (computed in fp32, returned in x's dtype)."""
    _checks.tensor("x", x, ndim=4)
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.tensor(name, t, ndim=2)
        _checks.shape(name, t, (x.shape[1], x.shape[3]), what="([T, D] with x's T and D)")
    if x.shape[-1] % 2:
        raise ValueError(f"x's head dim must be even for rotary embeddings, got {x.shape[-1]}")
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), -1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


# ---------------------------------------------------------------------------- cache


class KVCache:
    """Keys and values of the final frames of one attention layer, for rollouts.

    Args:
        frame_size: tokens per frame (the attention's). Only whole frames are stored.
        window_frames: the attention's window (None: keep every frame).
        sink_frames: the attention's sink frames (the first frames ever committed stay).
        capacity_frames: frames to preallocate room for (grows by doubling if exceeded).

    Every method validates its arguments before it changes anything (a failed call leaves
    the cache as it was). A window longer than any sequence is legal and never evicts.

    What is kept: with a window of W frames, a query frame sees itself and the W - 1
    frames before it (plus the sinks), so after each commit the cache keeps the sink
    frames and the W - 1 most recent frames, and drops the rest.

    How positions map (the one subtle point). ``df_attention`` reads keys as a list in
    position order whose last ``Tq`` entries are the queries. The cache hands it
    ``[sink frames][W - 1 most recent frames][the new query frames]``: evicted frames are
    simply absent, so frame indices in this list are *compacted*. That is exact: sinks are
    frames ``0 .. sink_frames - 1`` of the list (always visible, as in the full sequence),
    and the kept recent frames are contiguous with the query frames, so every query-key
    frame distance in the list equals the true distance and the window rule
    ``frame(p) - frame(j) < W`` gives the same answer. RoPE is applied before caching at
    true absolute positions (``frames * frame_size + t``), so it never sees the compaction.

    Memory: one buffer per K and V, ``[B, capacity, Hkv, D]``, that stays in place. Query
    frames are written once into the free room after the stored frames (scratch, not
    committed) and attention reads one strided view of it: no concatenation. Committing
    just advances the end. Evicting advances the start past the dropped frames and moves
    the (few) sink frames forward next to the kept ones, so the stored frames stay one
    contiguous range; when the room runs out the stored frames (sinks + W - 1) are moved
    back to the front once, which with a capacity of at least twice the window happens
    at most once every W appended frames. ``stats`` counts these copies.
    """

    def __init__(self, *, frame_size: int = 1, window_frames: int | None = None, sink_frames: int = 0,
                 capacity_frames: int | None = None):
        _int("frame_size", frame_size, 1, MAX_SIZE)
        _window(window_frames, sink_frames)
        if capacity_frames is not None:
            _int("capacity_frames", capacity_frames, 0, MAX_SIZE // frame_size)
        self.frame_size = frame_size
        self.window_frames = window_frames
        self.sink_frames = sink_frames if window_frames is not None else 0
        self.capacity_frames = capacity_frames
        self._k = self._v = None  # [B, capacity tokens, Hkv, D]
        self._start = 0  # buffer token index of the first stored token
        self._len = 0  # stored tokens
        self._pending = None  # (k, v, written) of the last extend(): the query frames
        self.frames = 0
        self.stats = {"sink_moves": 0, "compactions": 0, "grows": 0}

    # -- what is stored

    @property
    def cached_frames(self) -> int:
        """Frames held now (sinks + the most recent ones)."""
        return self._len // self.frame_size

    @property
    def next_position(self) -> int:
        """Absolute token position of the next frame's first token (for RoPE)."""
        return self.frames * self.frame_size

    @property
    def keys(self) -> Tensor | None:
        """Stored keys ``[B, Hkv, cached tokens, D]`` (a view), or None before the first frame."""
        return None if self._k is None else self._k[:, self._start:self._start + self._len].transpose(1, 2)

    @property
    def values(self) -> Tensor | None:
        return None if self._v is None else self._v[:, self._start:self._start + self._len].transpose(1, 2)

    def mask_kwargs(self) -> dict:
        """The df_attention mask arguments for keys returned by :meth:`extend`."""
        return dict(frame_size=self.frame_size, window_frames=self.window_frames, sink_frames=self.sink_frames)

    def reset(self):
        """Forget every frame (the buffers are kept for reuse)."""
        self._start = self._len = self.frames = 0
        self._pending = None

    # -- the protocol

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Keys/values ``[B, Hkv, cached + Tn, D]`` for attention of the new frames ``k, v``
        ``[B, Hkv, Tn, D]`` (whole frames) against the cache. Nothing is committed; a
        following :meth:`commit` may keep the leading frames of these.

        Without autograd the new frames are written into the buffer's free room and a view
        is returned; when k or v need gradients (guidance through the model) the result is
        a differentiable concatenation instead."""
        self._check_new(k, v)
        tn = k.shape[2]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            self._pending = (k, v, False)
            if self._len == 0:
                return k, v
            return torch.cat((self.keys, k), 2), torch.cat((self.values, v), 2)
        self._reserve(k, tn)
        end = self._start + self._len
        self._k[:, end:end + tn].copy_(k.transpose(1, 2))
        self._v[:, end:end + tn].copy_(v.transpose(1, 2))
        self._pending = (k, v, True)
        view = slice(self._start, end + tn)
        return self._k[:, view].transpose(1, 2), self._v[:, view].transpose(1, 2)

    def commit(self, num_frames: int):
        """Keep the first ``num_frames`` frames of the last :meth:`extend` (they are final),
        then drop frames no later query can see. ``num_frames`` is an int from 0 to the
        frames that extend() passed; anything else raises before the cache changes."""
        _int("num_frames", num_frames, 0)
        if num_frames == 0:
            return
        if self._pending is None:
            raise ValueError(f"num_frames={num_frames} but nothing is pending: call extend() (or the attention with "
                             f"this cache) first; each extend() can be committed once")
        k, v, written = self._pending
        tokens = num_frames * self.frame_size
        if not 0 < tokens <= k.shape[2]:
            raise ValueError(f"num_frames must be between 0 and the {k.shape[2] // self.frame_size} frames passed, "
                             f"got {num_frames}")
        if not written:
            with torch.no_grad():
                self._reserve(k, tokens)
                end = self._start + self._len
                self._k[:, end:end + tokens].copy_(k[:, :, :tokens].transpose(1, 2))
                self._v[:, end:end + tokens].copy_(v[:, :, :tokens].transpose(1, 2))
        self._pending = None
        self._len += tokens
        self.frames += num_frames
        self._evict()

    def append(self, k: Tensor, v: Tensor):
        """Commit whole frames ``k, v`` ``[B, Hkv, T, D]`` directly (no attention)."""
        with torch.no_grad():
            self.extend(k, v)
        self.commit(k.shape[2] // self.frame_size)

    def discard(self):
        """Forget the last :meth:`extend` without committing it (what a caller does when the
        attention after an extend fails, so no stale frames can be committed later)."""
        self._pending = None

    # -- internals

    def _check_new(self, k, v):
        _checks.tensor("k", k)
        _checks.tensor("v", v)
        if k.dim() != 4 or v.shape != k.shape:
            raise ValueError(f"k and v must both be [B, Hkv, T, D], got {tuple(k.shape)} and {tuple(v.shape)}")
        if not k.is_floating_point():
            raise TypeError(f"k must be a floating-point tensor, got {str(k.dtype).removeprefix('torch.')}")
        _checks.same_dtype(k=k, v=v)
        _checks.same_device(k=k, v=v)
        if k.shape[2] % self.frame_size:
            raise ValueError(f"the cache takes whole frames: {k.shape[2]} tokens is not a multiple of frame_size "
                             f"{self.frame_size}")
        if self._k is not None and self._len:
            B, _, H, D = self._k.shape
            if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D) or k.dtype != self._k.dtype or k.device != self._k.device:
                raise ValueError(f"new keys {tuple(k.shape)} {k.dtype} on {k.device} do not match the cache's "
                                 f"[{B}, {H}, *, {D}] {self._k.dtype} on {self._k.device}; reset() it first")

    def _reserve(self, like: Tensor, tokens: int):
        """Room for ``tokens`` more after the stored ones (allocating, compacting or growing)."""
        B, H, _, D = like.shape
        need = self._len + tokens
        fresh = (self._k is None or self._k.shape[0] != B or self._k.shape[2] != H or self._k.shape[3] != D
                 or self._k.dtype != like.dtype or self._k.device != like.device)
        if fresh:
            if self._len:
                raise ValueError("the cache holds frames of another shape/dtype/device; reset() it first")
            fs = self.frame_size
            want = self.capacity_frames or 0
            if self.window_frames is not None:
                want = max(want, min(self.sink_frames, PREALLOC_WINDOW_FRAMES)
                           + 2 * min(self.window_frames, PREALLOC_WINDOW_FRAMES))
            cap = max(want * fs, 2 * need)
            self._k = like.new_empty((B, cap, H, D))
            self._v = like.new_empty((B, cap, H, D))
            self._start = 0
            return
        cap = self._k.shape[1]
        if self._start + need <= cap:
            return
        stored = slice(self._start, self._start + self._len)
        if need <= cap and self._start > 0:
            self._k[:, :self._len] = self._k[:, stored].clone()
            self._v[:, :self._len] = self._v[:, stored].clone()
            self.stats["compactions"] += 1
        else:
            new_cap = max(2 * cap, need)
            k, v = self._k.new_empty((B, new_cap, H, D)), self._v.new_empty((B, new_cap, H, D))
            k[:, :self._len] = self._k[:, stored]
            v[:, :self._len] = self._v[:, stored]
            self._k, self._v = k, v
            self.stats["grows"] += 1
        self._start = 0

    def _evict(self):
        if self.window_frames is None:
            return
        fs = self.frame_size
        sinks = min(self.sink_frames, self.frames)
        excess = self.cached_frames - sinks - (self.window_frames - 1)
        if excess <= 0:
            return
        drop = excess * fs
        if sinks:
            # Move the sink frames forward over the dropped ones (clone: the ranges may overlap).
            src = slice(self._start, self._start + sinks * fs)
            dst = slice(self._start + drop, self._start + drop + sinks * fs)
            self._k[:, dst] = self._k[:, src].clone()
            self._v[:, dst] = self._v[:, src].clone()
            self.stats["sink_moves"] += 1
        self._start += drop
        self._len -= drop


# ---------------------------------------------------------------------------- module


class DFAttention(nn.Module):
    """Multi-head frame-causal attention: a drop-in for a qkv-projection/SDPA/projection
    block with a frame-causal (windowed, sink) mask.

    Args:
        dim: model width C.
        num_heads: query heads Hq. ``num_kv_heads``: K/V heads (GQA/MQA; default Hq).
        head_dim: D (default ``dim // num_heads``).
        frame_size, window_frames, sink_frames, causal: the mask (see ``fastdf.df_attention``).
        qk_norm: RMSNorm (with weight, eps ``norm_eps``) over D on queries and keys.
        rope_theta: rotary embedding base (None: no rotary). 1-D, at absolute token positions.
        qkv_bias, out_bias: biases of the projections.

    Parameters (state_dict keys): ``qkv`` (Linear C -> (Hq + 2 Hkv) D, rows ordered
    [q heads | k heads | v heads]), ``q_norm``/``k_norm`` (``nn.RMSNorm(D)``, if qk_norm),
    ``proj`` (Linear Hq D -> C).

    ``forward(x, *, cache=None, commit_frames=0, positions=None)``: x ``[B, T, C]`` ->
    ``[B, T, C]``. Without a cache, x is the whole sequence (positions ``0 .. T-1``). With a
    :class:`KVCache`, x holds whole frames that come right after the cache's frames
    (positions from ``cache.next_position``); they attend to the cached frames and each
    other; then the first ``commit_frames`` of them are appended to the cache. ``positions``
    (``[T]`` int) overrides the rotary positions. ``window`` (``(window_frames, sink_frames)``)
    overrides the module's window and sinks for this call, e.g. a rolling sampler's window
    on a model trained without one; a cache must then have been made with the same pair
    (``KVCache(frame_size=..., window_frames=..., sink_frames=...)``).
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 frame_size: int = 1, window_frames: int | None = None, sink_frames: int = 0, causal: bool = True,
                 qk_norm: bool = False, rope_theta: float | None = None, norm_eps: float = 1e-6,
                 qkv_bias: bool = True, out_bias: bool = True, device=None, dtype=None):
        super().__init__()
        _int("dim", dim, 1, MAX_SIZE)
        _int("num_heads", num_heads, 1, MAX_SIZE)
        num_kv_heads = num_heads if num_kv_heads is None else _int("num_kv_heads", num_kv_heads, 1, MAX_SIZE)
        if head_dim is None:
            if dim < num_heads:
                raise ValueError(f"dim ({dim}) must be >= num_heads ({num_heads}) for the default head_dim "
                                 f"dim // num_heads; pass head_dim")
            head_dim = dim // num_heads
        _int("head_dim", head_dim, 1, MAX_SIZE)
        _int("frame_size", frame_size, 1, MAX_SIZE)
        _window(window_frames, sink_frames)
        _flag("causal", causal)
        _flag("qk_norm", qk_norm)
        _flag("qkv_bias", qkv_bias)
        _flag("out_bias", out_bias)
        if not causal and (window_frames is not None or sink_frames):
            raise ValueError("window_frames/sink_frames need causal=True (without causality every key is visible)")
        if rope_theta is not None:
            _checks.finite_float("rope_theta", rope_theta, low=1, low_open=True)
        _checks.finite_float("norm_eps", norm_eps, low=0, low_open=True)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.frame_size, self.window_frames, self.sink_frames, self.causal = frame_size, window_frames, sink_frames, causal
        self.rope_theta = rope_theta
        kw = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias, **kw)
        if qk_norm:
            self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps, **kw)
            self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps, **kw)
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=out_bias, **kw)

    def new_cache(self, capacity_frames: int | None = None) -> KVCache:
        """An empty :class:`KVCache` with this layer's frame size, window and sinks."""
        return KVCache(frame_size=self.frame_size, window_frames=self.window_frames, sink_frames=self.sink_frames,
                       capacity_frames=capacity_frames)

    def project(self, x: Tensor, positions: Tensor | None = None, start: int = 0):
        """q ``[B, Hq, T, D]`` and k, v ``[B, Hkv, T, D]`` (views of one projection) after
        QK-norm and rotary."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)
        q = qkv[..., :H * D].view(B, T, H, D)
        k = qkv[..., H * D:(H + Hkv) * D].view(B, T, Hkv, D)
        v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            if positions is None:
                positions = torch.arange(start, start + T, device=x.device)
            cos, sin = rotary_cos_sin(positions, D, self.rope_theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Under autocast the norms may return fp32 while v stays in the low precision.
        q, k = q.to(v.dtype), k.to(v.dtype)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _check_call(self, x, cache, commit_frames, positions, window):
        _checks.tensor("x", x, ndim=3)
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {str(x.dtype).removeprefix('torch.')}")
        if x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"x must be [B, T, {self.qkv.in_features}] (the attention's dim), got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x must hold at least one row and one token (B >= 1, T >= 1), got {tuple(x.shape)}")
        if window is None:
            window_frames, sink_frames = self.window_frames, self.sink_frames
        else:
            if not isinstance(window, (tuple, list)) or len(window) != 2:
                raise TypeError(f"window must be a (window_frames, sink_frames) pair, got {window!r}")
            window_frames, sink_frames = window
            _window(window_frames, sink_frames, name="window[0] (window_frames)")
            if sink_frames and window_frames is None:
                raise ValueError(f"window has sink_frames={sink_frames} but no window_frames")
            if not self.causal and window_frames is not None:
                raise ValueError("window needs causal attention (this DFAttention has causal=False)")
        if positions is not None:
            _checks.tensor("positions", positions, ndim=1)
            _checks.shape("positions", positions, (x.shape[1],), what="(one position per token of x)")
            if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
                got = str(positions.dtype).removeprefix("torch.")
                raise TypeError(f"positions must be an integer tensor, got {got}")
            if positions.device != x.device:
                raise ValueError(f"positions is on {positions.device} but x is on {x.device}")
        _int("commit_frames", commit_frames, 0)
        if cache is None:
            if commit_frames:
                raise ValueError("commit_frames needs a cache")
        else:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache (attn.new_cache()), got {type(cache).__name__}")
            if (cache.frame_size, cache.window_frames, cache.sink_frames) != (
                    self.frame_size, window_frames, sink_frames if window_frames is not None else 0):
                raise ValueError("the cache's frame_size/window_frames/sink_frames differ from this attention's; "
                                 "make it with attn.new_cache() (or with the window passed to this call)")
            if not self.causal:
                raise ValueError("a KV cache needs causal attention")
            if x.shape[1] % self.frame_size:
                raise ValueError(f"the cache takes whole frames: {x.shape[1]} tokens is not a multiple of frame_size "
                                 f"{self.frame_size}")
            if commit_frames * self.frame_size > x.shape[1]:
                raise ValueError(f"commit_frames must be between 0 and the {x.shape[1] // self.frame_size} frames "
                                 f"passed, got {commit_frames}")
        return window_frames, sink_frames

    def _mask(self, tk: int, window_frames, sink_frames) -> dict:
        """df_attention's mask for ``tk`` keys. Sizes beyond the keys change nothing, so they
        are clamped: a window covering every key frame is no window, a frame longer than the
        keys is one frame of ``tk`` tokens, and sinks past the last key frame are all of them.
        The mask is identical and the op never sees a number too large for its schema."""
        frame_size = min(self.frame_size, max(tk, 1))
        key_frames = -(-tk // frame_size)
        if window_frames is not None and window_frames >= key_frames:
            window_frames, sink_frames = None, 0
        elif window_frames is not None:
            sink_frames = min(sink_frames, key_frames)
        return dict(frame_size=frame_size, causal=self.causal, window_frames=window_frames, sink_frames=sink_frames)

    def forward(self, x: Tensor, *, cache: KVCache | None = None, commit_frames: int = 0,
                positions: Tensor | None = None, window: tuple[int | None, int] | None = None) -> Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]`` (see the class docstring). Every argument is
        checked before the cache is touched; if the attention itself fails, the cache is left
        as it was (nothing from this call can be committed later). B = 0 or T = 0 is a
        ValueError, as everywhere in the Diffusion Forcing toolkit."""
        window_frames, sink_frames = self._check_call(x, cache, commit_frames, positions, window)
        B, T, _ = x.shape
        if cache is None:
            q, k, v = self.project(x, positions)
            out = df_attention(q, k, v, **self._mask(k.shape[2], window_frames, sink_frames))
        else:
            q, k, v = self.project(x, positions, start=cache.next_position)
            k, v = cache.extend(k, v)
            try:
                out = df_attention(q, k, v, **self._mask(k.shape[2], window_frames, sink_frames))
            except BaseException:
                cache.discard()
                raise
            cache.commit(commit_frames)
        return self.proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

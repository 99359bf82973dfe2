"""The interface a causal denoiser implements to be trained by :func:`training_step` and
rolled out by :class:`~fastdf.diffusion_forcing.Sampler`, and a checker for it.

Two objects: the model (:class:`DFModel`) and the per-rollout K/V cache it creates
(:class:`DFCache`). ``fastdf.models.DFTransformer`` implements them; so can your own model.
Run :func:`check_model` on it to verify the contract numerically.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from ..ops import _checks

# The longest sequence check_model builds (it needs sink_frames + window_frames + 3 frames
# to see eviction).
MAX_CHECK_FRAMES = 4096


@runtime_checkable
class DFCache(Protocol):
    """Keys/values of the frames committed so far in one window, created by
    :meth:`DFModel.new_cache` and filled only by ``model(..., cache=c, commit=n)``.

    ``frames``: how many frames are committed (0 when new). The committed frames are the
    oldest frames of the window, in order; the first one sits at frame position 0. The
    sampler never commits more frames than the ``max_frames`` the cache was created with,
    never removes frames (when its window slides it starts a new cache instead), and never
    shares one cache between two windows, so an implementation needs no eviction.

    Rolling extension (``Sampler(cache_policy="rolling")``): a cache made with
    ``new_cache(batch, max_frames, window_frames=W, sink_frames=S)`` lives for the whole
    rollout; ``frames`` counts every frame ever committed (the next frame's absolute
    position), while the implementation may drop frames no later query can see (all but the
    first S and the W - 1 most recent).
    """

    @property
    def frames(self) -> int: ...


@runtime_checkable
class DFModel(Protocol):
    """A frame-causal denoiser with per-frame noise levels.

    ``model(x, levels, *, cache=None, commit=0) -> pred``

    - ``x``: ``[B, F, *frame_shape]`` noisy frames in temporal order (``frame_shape`` is the
      model's business: ``(D,)`` vectors, ``(C, H, W)`` images, ``(tokens, D)``, ...).
    - ``levels``: int64 ``[B, F]``, each frame's training noise level (0 clean .. the noise
      schedule's ``steps``; see :class:`~fastdf.diffusion_forcing.NoiseSchedule`). Context
      frames arrive at the sampler's ``context_noise`` level, masked history at ``steps``.
    - returns ``pred``: ``[B, F, *frame_shape]``, the model's output for every frame of ``x``
      in the parameterisation it was trained for (``"eps"``, ``"v"`` or ``"x0"``; the
      sampler and :func:`training_step` are told which).
    - Frame-causal: a token of frame i attends to every token of the cached frames and of
      x's frames ``0 .. i`` (its own frame included), nothing later. This is
      ``fastdf.df_attention(q, k, v, frame_size=tokens_per_frame, causal=True)`` with q the
      new tokens and k/v the cached tokens followed by the new ones (queries are the newest).
    - Positions: frame i of ``x`` is at frame position ``cache.frames + i`` (``i`` without a
      cache). Positions count from the start of the cache, never from the start of the
      rollout: every call sees its window as a sequence starting at 0, exactly as in training.
    - ``cache=None``: ``x`` is the whole sequence (the training call and the no-cache rollout).
    - ``cache=c``: ``x`` follows c's committed frames. ``commit=n`` (``0 <= n <= F``) then
      appends the keys/values of x's first ``n`` frames, as computed in this very call, to
      ``c`` (so ``c.frames`` grows by n). Causality makes them independent of x's later frames.
      ``commit=0`` leaves ``c`` untouched. ``commit > 0`` without a cache is an error.

    Consistency (what :func:`check_model` verifies): for any split of a sequence into ``a``
    then ``b``, committing ``a`` (in one call or several) and then calling the model on ``b``
    with that cache gives the same predictions for ``b`` as one cache-free call on ``a + b``
    (to floating-point rounding), and the outputs for the committed frames equal the
    cache-free call's outputs for them.

    ``model.new_cache(batch, max_frames) -> DFCache``: an empty cache for ``batch`` rows that
    will hold at most ``max_frames`` frames (preallocate if you like); device and dtype are
    the model's.

    Optional attribute ``frame_shape`` (a tuple): when present, the sampler and
    :func:`training_step` check the data's frames against it and name the argument on a
    mismatch.

    **Rolling extension** (only needed for ``Sampler(cache_policy="rolling")``, the
    Self-Forcing / CausVid streaming policy; models without it keep working under the
    default ``"window"`` policy). Both methods also take ``window_frames=W`` and
    ``sink_frames=S``:

    - ``model(x, levels, *, cache=None, commit=0, window_frames=W, sink_frames=S)`` applies
      ``df_attention``'s window in every attention layer: a query frame at position p sees key
      frame j iff ``j <= p`` and (``p - j < W`` or ``j < S``), positions as above.
    - ``model.new_cache(batch, max_frames, *, window_frames=W, sink_frames=S)``: a cache the
      sampler keeps for the whole rollout (``max_frames`` frames committed over its life);
      positions therefore stay absolute (frame i of ``x`` at ``cache.frames + i``, where
      ``cache.frames`` counts every frame ever committed). Eviction is the model's business
      and invisible: with the window it may keep only the first S and the W - 1 most recent
      frames' keys/values. Calls with such a cache pass the same W and S.
    - Consistency: as above, with the window in both the cached and the cache-free call, over
      sequences longer than ``S + W`` (so eviction happens): committing frames one at a time
      and calling on the rest equals one cache-free windowed call on the whole sequence.
      ``check_model(..., window_frames=W, sink_frames=S)`` verifies it.
    """

    def __call__(self, x: torch.Tensor, levels: torch.Tensor, *, cache: DFCache | None = None,
                 commit: int = 0) -> torch.Tensor: ...

    def new_cache(self, batch: int, max_frames: int) -> DFCache: ...


def check_model(model, frame_shape: Sequence[int], *, steps: int, batch: int = 2, frames: int = 5,
                dtype: torch.dtype = torch.float32, device=None, atol: float = 1e-5, rtol: float = 1e-4,
                seed: int = 0, window_frames: int | None = None, sink_frames: int = 0) -> None:
    """Verify numerically that ``model`` honours :class:`DFModel` (raises AssertionError
    saying which rule failed): output shape, frame causality, and cache consistency
    (commit in one call, commit in pieces, ``commit=0`` leaves the cache alone).

    With ``window_frames`` it also checks the rolling extension with that window and
    ``sink_frames``: a cache made with the window, committed one frame at a time over
    ``max(frames, sink_frames + window_frames + 3)`` frames (so frames get evicted), gives the
    cache-free windowed call's outputs, and ``cache.frames`` counts every committed frame.
    That sequence is built in memory, so ``sink_frames + window_frames`` is at most
    ``MAX_CHECK_FRAMES`` (4096)."""
    if not isinstance(model, DFModel):
        raise TypeError(f"model must be callable and have new_cache(batch, max_frames), got {type(model).__name__}")
    _checks.number("frames", frames, low=4, high=MAX_CHECK_FRAMES, integer=True)
    _checks.number("batch", batch, low=1, integer=True)
    _checks.number("steps", steps, low=1, integer=True)
    _checks.number("seed", seed, low=0, high=2**63 - 1, integer=True)
    _checks.finite_float("atol", atol, low=0, dtype=torch.float64)
    _checks.finite_float("rtol", rtol, low=0, dtype=torch.float64)
    if window_frames is not None:
        _checks.number("window_frames", window_frames, low=1, integer=True)
    _checks.number("sink_frames", sink_frames, low=0, integer=True)
    if window_frames is not None and sink_frames + window_frames > MAX_CHECK_FRAMES:
        raise ValueError(f"window_frames + sink_frames must be <= {MAX_CHECK_FRAMES}: the eviction check runs a "
                         f"sequence longer than both, got {window_frames} + {sink_frames}")
    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    x = torch.randn((batch, frames, *frame_shape), generator=g, device=device, dtype=dtype)
    levels = torch.randint(0, steps + 1, (batch, frames), generator=g, device=device)

    def close(actual, expected, what):
        if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
            got = tuple(actual.shape) if isinstance(actual, torch.Tensor) else type(actual).__name__
            raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {got}")
        if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
            err = (actual - expected).abs().max().item()
            raise AssertionError(f"{what}: differs from the cache-free call on the whole sequence (max error {err:.3g})")

    def frames_in(cache, want, what):
        if cache.frames != want:
            raise AssertionError(f"{what}: cache.frames is {cache.frames}, expected {want}")

    with torch.no_grad():
        full = model(x, levels)
        if not isinstance(full, torch.Tensor) or full.shape != x.shape:
            raise AssertionError(f"model(x, levels) must return x's shape {tuple(x.shape)}")
        changed = x.clone()
        changed[:, -1] = torch.randn(changed[:, -1].shape, generator=g, device=device, dtype=dtype)
        close(model(changed, levels)[:, :-1], full[:, :-1], "causality: changing the last frame changed earlier ones")

        a = max(1, frames // 3)  # three pieces: [0, a), [a, b), [b, frames), each non-empty
        b = a + max(1, (frames - a) // 2)
        cache = model.new_cache(batch, frames)
        frames_in(cache, 0, "new_cache")
        close(model(x[:, :a], levels[:, :a], cache=cache, commit=a), full[:, :a], "commit call output")
        frames_in(cache, a, f"after commit={a}")
        close(model(x[:, a:], levels[:, a:], cache=cache), full[:, a:], "cached call after one commit")
        frames_in(cache, a, "commit=0 must leave the cache alone")
        out = model(x[:, a:b + 1], levels[:, a:b + 1], cache=cache, commit=b - a)
        close(out, full[:, a:b + 1], "partial commit call output")
        frames_in(cache, b, f"after commit={b - a} of {b + 1 - a} frames")
        close(model(x[:, b:], levels[:, b:], cache=cache), full[:, b:], "cached call after commits in pieces")

        if window_frames is None:
            return
        mask = dict(window_frames=window_frames, sink_frames=sink_frames)
        n = max(frames, sink_frames + window_frames + 3)
        x = torch.randn((batch, n, *frame_shape), generator=g, device=device, dtype=dtype)
        levels = torch.randint(0, steps + 1, (batch, n), generator=g, device=device)
        full = model(x, levels, **mask)
        if not isinstance(full, torch.Tensor) or full.shape != x.shape:
            raise AssertionError(f"model(x, levels, window_frames=..., sink_frames=...) must return x's shape "
                                 f"{tuple(x.shape)}")
        cache = model.new_cache(batch, n, **mask)
        frames_in(cache, 0, "new_cache with a window")
        a = sink_frames + 1
        close(model(x[:, :a], levels[:, :a], cache=cache, commit=a, **mask), full[:, :a],
              "windowed commit call output")
        for f in range(a, n - 1):  # two frames per call, the first committed: eviction from frame S + W on
            close(model(x[:, f:f + 2], levels[:, f:f + 2], cache=cache, commit=1, **mask), full[:, f:f + 2],
                  f"windowed cached call at frame {f} (positions absolute, evicted frames invisible)")
            frames_in(cache, f + 1, f"windowed cache after committing frame {f}")

"""Sliding-window Diffusion Forcing rollouts with a per-window K/V cache."""

from __future__ import annotations

import inspect
import math
import types

import torch
from tqdm.auto import tqdm

from ..ops import _checks
from . import guidance as _guidance
from .matrix import MAX_ENTRIES, scheduling_matrix, to_training_levels
from .protocol import DFModel
from .schedule import NoiseSchedule, _check_method, _check_prediction, _choice, check_generator

CACHE_POLICIES = ("window", "rolling")


def _takes(fn, names) -> bool:
    """Whether ``fn`` accepts the keyword arguments ``names`` (True when it cannot be told)."""
    if isinstance(fn, torch.nn.Module):
        fn = fn.forward
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD for p in params.values()) or all(n in params for n in names)


def _flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


class Sampler:
    """Roll a :class:`~fastdf.diffusion_forcing.protocol.DFModel` out for any number of frames.

    Frames are generated in *chunks* of ``horizon`` frames (the last chunk may be shorter);
    a chunk is denoised jointly along the scheduling matrix ``scheduling`` (``"pyramid"``,
    ``"trapezoid"``, ``"full_sequence"``, ``"autoregressive"``; ``uncertainty`` for the first
    two, default 1.0) with ``sampling_steps`` levels, mapped onto the schedule's training
    levels by :func:`to_training_levels`.

    The window. The model sees at most ``window_frames`` frames per call: the chunk, preceded
    by its *history*. With ``a`` frames before the chunk (context + generated) and ``h`` the
    chunk's size, the history is all ``a`` frames when ``a <= window_frames - h``, otherwise the
    first ``sink_frames`` frames (sinks, kept forever) followed by the latest
    ``window_frames - h - sink_frames``. Each call presents its window as a sequence starting
    at position 0, as in training, which is what lets rollouts run past the training horizon.

    Context. A frame at level 0 (a history frame, or a chunk frame that finished) is presented
    as context: re-noised once, when it becomes clean, to the training level ``context_noise``
    (the paper's stabilisation level; 0 presents it clean) and given that level. Only frames
    whose level changes in a sampling row are updated (``method`` ``"ddim"`` with ``eta``, or
    ``"ddpm"``); the others are left bit-for-bit.

    ``cache_policy="window"`` (the default; what the paper's sampler computes).
    ``kv_cache=True``: context frames are committed to a :class:`DFCache` once per window
    (their K/V computed once; while the window does not slide the cache carries over to the
    next chunk), and each step runs only the uncommitted frames up to the last one being
    updated (noisier frames after it cannot affect it). ``kv_cache=False``: every step runs the
    model on the whole window (the official code's recompute), giving the same frames to
    floating-point rounding. When the window slides, every history frame loses a predecessor
    and so its K/V change (positions restart at 0): a new cache is filled in the next call.

    ``cache_policy="rolling"`` (the Self-Forcing / CausVid streaming policy; needs the
    protocol's rolling extension). The model sees the *whole* history through its attention
    window instead: every attention layer applies ``df_attention``'s window of
    ``window_frames`` frames plus the first ``sink_frames`` frames of the sequence, at
    absolute positions (frame t of context + generated frames sits at position t).
    ``kv_cache=True``: one cache for the whole rollout (``model.new_cache(..., window_frames=,
    sink_frames=)``); each frame's K/V are computed once in its life, in the first call after
    it becomes context, and the cache evicts what no later query can see. ``kv_cache=False``:
    every step runs the model on the full history plus the chunk with the same window masks
    (the cost grows with the rollout: the honest no-cache baseline), giving the same frames
    to floating-point rounding. ``context`` may be longer than the window. The history stays
    at its presented values forever (through the layers a frame's features depend on frames
    further back than the window, so results differ from the ``"window"`` policy).
    Under history guidance the masked branch replaces every context frame (including chunk
    frames once they are clean) by pure noise at the top level, drawn once per frame.

    ``prediction``: the model's parameterisation (``"eps"``, ``"v"``, ``"x0"``).
    After a rollout, ``stats`` counts ``calls``, ``frames`` (frames passed to the model,
    summed over calls, per batch row) and ``caches`` (caches created).
    """

    def __init__(self, model: DFModel, schedule: NoiseSchedule, sampling_steps: int, scheduling: str = "pyramid",
                 uncertainty: float | None = None, *, window_frames: int, horizon: int | None = None,
                 sink_frames: int = 0, context_noise: int = 0, kv_cache: bool = True, prediction: str = "v",
                 method: str = "ddim", eta: float = 0.0, cache_policy: str = "window"):
        if not callable(model):
            raise TypeError(f"model must be callable (see fastdf.diffusion_forcing.protocol.DFModel), got {type(model).__name__}")
        if kv_cache and not callable(getattr(model, "new_cache", None)):
            raise TypeError("model has no new_cache(batch, max_frames); pass kv_cache=False or implement DFModel")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        _choice("cache_policy", cache_policy, CACHE_POLICIES)
        _flag("kv_cache", kv_cache)
        if cache_policy == "rolling":
            window_kw = ("window_frames", "sink_frames")
            if not _takes(model, window_kw) or (kv_cache and not _takes(model.new_cache, window_kw)):
                raise TypeError("cache_policy='rolling' needs a model whose __call__ and new_cache take window_frames= "
                                "and sink_frames= (the rolling extension of fastdf.diffusion_forcing.DFModel)")
        _checks.number("sampling_steps", sampling_steps, low=1, high=schedule.steps, integer=True)
        _checks.number("window_frames", window_frames, low=1, integer=True)
        _checks.number("sink_frames", sink_frames, low=0, high=window_frames - 1, integer=True)
        default_horizon = horizon is None
        if default_horizon:
            horizon = max(1, (window_frames - sink_frames) // 2)
        _checks.number("horizon", horizon, low=1, high=window_frames - sink_frames, integer=True)
        _checks.number("context_noise", context_noise, low=0, high=schedule.steps, integer=True)
        _check_prediction(prediction)
        _check_method(method)
        eta = _checks.finite_float("eta", eta, low=0, high=1)
        if uncertainty is None and scheduling in ("pyramid", "trapezoid"):
            uncertainty = 1.0
        try:
            scheduling_matrix(scheduling, horizon, sampling_steps, uncertainty=uncertainty)  # validates
        except ValueError as err:
            if not default_horizon or "horizon" not in str(err):
                raise
            raise ValueError(f"the default horizon (window_frames - sink_frames) // 2 = {horizon} is too large for a "
                             f"scheduling matrix; pass horizon= or a smaller window_frames ({err})") from None
        self.model, self.schedule, self.sampling_steps = model, schedule, sampling_steps
        self.scheduling, self.uncertainty = scheduling, uncertainty
        self.window_frames, self.horizon, self.sink_frames = window_frames, horizon, sink_frames
        self.context_noise, self.kv_cache, self.prediction = context_noise, bool(kv_cache), prediction
        self.method, self.eta, self.cache_policy = method, eta, cache_policy
        self.stats = {"calls": 0, "frames": 0, "caches": 0}
        self._matrices: dict[int, torch.Tensor] = {}

    def matrix(self, horizon: int) -> torch.Tensor:
        """The chunk scheduling matrix for ``horizon`` frames, in training levels (int64 [M, horizon])."""
        _checks.number("horizon", horizon, low=1, high=self.horizon, integer=True)
        if horizon not in self._matrices:
            rows = scheduling_matrix(self.scheduling, horizon, self.sampling_steps, uncertainty=self.uncertainty)
            self._matrices[horizon] = to_training_levels(rows, self.sampling_steps, self.schedule.steps)
        return self._matrices[horizon]

    def history(self, before: int, chunk: int) -> list[int]:
        """Indices (into context + generated frames) of the history a chunk of ``chunk`` frames
        starting at frame ``before`` sees: all earlier frames if they fit, else the sinks and
        the latest frames that fill the window."""
        _checks.number("before", before, low=0, integer=True)
        _checks.number("chunk", chunk, low=1, high=self.horizon, integer=True)
        recent = self.window_frames - chunk
        if before <= recent:
            return list(range(before))
        return list(range(self.sink_frames)) + list(range(before - (recent - self.sink_frames), before))

    def _chunks(self, num_frames):
        done = 0
        while done < num_frames:
            h = min(self.horizon, num_frames - done)
            yield done, h
            done += h

    @torch.no_grad()
    def rollout(self, context: torch.Tensor, num_frames: int, guidance=None, generator: torch.Generator | None = None,
                progress: bool = True) -> torch.Tensor:
        """Generate ``num_frames`` frames after ``context`` ``[B, C, *frame_shape]`` (clean frames;
        ``C <= window_frames`` under the window policy, any C under rolling; C = 0 starts from
        nothing) and return them, ``[B, num_frames, *frame_shape]`` in context's dtype and device.

        ``guidance``: None, a :class:`RewardGuidance` (or a bare reward callable), a
        :class:`HistoryGuidance`, or a list of them. ``generator`` drives every random draw, in
        an order that does not depend on ``kv_cache``. ``progress`` shows a tqdm bar over the
        model calls.

        Everything is checked before the first model call. An empty request is an error, as
        everywhere in the toolkit: B = 0 (``context.shape[0]``) and ``num_frames = 0`` raise
        ValueError (C = 0 context frames is fine).
        """
        _checks.number("num_frames", num_frames, low=1, integer=True)
        _checks.tensor("context", context)
        if context.dim() < 3:
            raise ValueError(f"context must be [B, C, *frame_shape] with at least one frame dim, got shape "
                             f"{tuple(context.shape)}")
        if not context.is_floating_point():
            raise TypeError(f"context must be a floating-point tensor, got {str(context.dtype).removeprefix('torch.')}")
        if context.shape[0] == 0:
            raise ValueError(f"context must hold at least one batch row (B >= 1), got shape {tuple(context.shape)}")
        if context.shape[1] > self.window_frames and self.cache_policy == "window":
            raise ValueError(f"context has {context.shape[1]} frames, longer than the window "
                             f"(window_frames={self.window_frames}); pass at most window_frames frames")
        expected = getattr(self.model, "frame_shape", None)
        if expected is not None and tuple(context.shape[2:]) != tuple(expected):
            raise ValueError(f"context frames have shape {tuple(context.shape[2:])} but the model takes frames of "
                             f"shape {tuple(expected)} (model.frame_shape)")
        # The output and its bookkeeping copies are single tensors: their element count must fit.
        if context.shape[0] * math.prod(context.shape[2:]) * (context.shape[1] + num_frames) >= MAX_ENTRIES**2:
            raise ValueError(f"num_frames={num_frames} is too large: the rollout's frames would not fit in one tensor")
        check_generator(generator, context.device)
        _flag("progress", progress)
        rewards, history_guidance = _guidance.parse(guidance)
        n_ctx = context.shape[1]
        batch, frame_shape, device, dtype = context.shape[0], tuple(context.shape[2:]), context.device, context.dtype
        self.stats = {"calls": 0, "frames": 0, "caches": 0}

        def randn(frames):
            return torch.randn((batch, frames, *frame_shape), generator=generator, device=device, dtype=dtype)

        seq = torch.empty((batch, n_ctx + num_frames, *frame_shape), device=device, dtype=dtype)
        seq[:, :n_ctx] = context
        presented = torch.empty_like(seq)  # each clean frame as the model sees it (re-noised once)

        def present(idx: torch.Tensor):
            if self.context_noise == 0:
                presented[:, idx] = seq[:, idx]
                return
            lv = torch.full((batch, idx.numel()), self.context_noise, device=device)
            presented[:, idx] = self.schedule.add_noise(seq[:, idx], randn(idx.numel()), lv)

        masked = None  # rolling + history guidance: each context frame's masking noise, drawn once
        if history_guidance is not None and self.cache_policy == "rolling":
            masked = torch.empty_like(seq)
            plain_present = present

            def present(idx: torch.Tensor):
                plain_present(idx)
                masked[:, idx] = randn(idx.numel())

        present(torch.arange(n_ctx, device=device))
        total = sum(int((m[1:] != m[:-1]).any(1).sum()) for m in (self.matrix(h) for _, h in self._chunks(num_frames)))
        bar = tqdm(total=total, desc="rollout", unit="step", disable=not progress)
        state = types.SimpleNamespace(seq=seq, presented=presented, masked=masked, present=present, randn=randn,
                                      bar=bar, rewards=rewards, history_guidance=history_guidance, generator=generator)
        (self._rolling if self.cache_policy == "rolling" else self._window)(state, n_ctx, num_frames)
        bar.close()
        return seq[:, n_ctx:]

    @staticmethod
    def _rows(levels, device):
        """The rows m of a chunk's matrix after which some frame changes level: (m, those frames
        on the CPU and on ``device``, the matrix on ``device``)."""
        levels_dev = levels.to(device)
        for m in range(levels.shape[0] - 1):
            update = (levels[m] != levels[m + 1]).nonzero().flatten()
            if update.numel():
                yield m, update, update.to(device), levels_dev

    def _advance(self, st, x, pred, levels, levels_dev, m, update, upd, a, done):
        """After a model call: mix the history-guidance branches, step the updated frames of the
        chunk ``x`` (starting at frame ``a``, ``done`` generated before it) from row m to m + 1,
        and present the frames that became clean as context."""
        if st.history_guidance is not None:
            cond, uncond = pred.chunk(2)
            pred = uncond + st.history_guidance.weight * (cond - uncond)
        now, nxt = levels_dev[m], levels_dev[m + 1]
        x[:, upd] = self._step(x[:, upd], pred, now[upd], nxt[upd], upd + done, st.rewards, st.generator)
        finished = update[levels[m + 1, update] == 0]
        if finished.numel():
            finished = finished.to(x.device)
            st.seq[:, a + finished] = x[:, finished]
            st.present(a + finished)
        st.bar.update(1)

    def _window(self, st, n_ctx, num_frames):
        seq, presented, randn, history_guidance = st.seq, st.presented, st.randn, st.history_guidance
        batch, frame_shape, device = seq.shape[0], tuple(seq.shape[2:]), seq.device
        top = self.schedule.steps
        cache, cached = None, []  # the cache and the frame indices committed to it, in order
        branches = 2 if history_guidance is not None else 1
        for done, h in self._chunks(num_frames):
            a = n_ctx + done
            hist = self.history(a, h)
            levels = self.matrix(h)  # on the CPU: it drives the control flow without device syncs
            x = randn(h)
            hist_x = presented[:, hist]
            hist_lv = torch.full((batch, len(hist)), self.context_noise, device=device, dtype=torch.int64)
            if history_guidance is not None:  # second half of the batch: the history masked by noise
                hist_x = torch.cat([hist_x, randn(len(hist))])
                hist_lv = torch.cat([hist_lv, torch.full_like(hist_lv, top)])
            if self.kv_cache and (history_guidance is not None or cache is None or hist[:len(cached)] != cached):
                cache, cached = self.model.new_cache(batch * branches, self.window_frames), []
                self.stats["caches"] += 1
            for m, update, upd, levels_dev in self._rows(levels, device):
                now = levels_dev[m]
                clean = now == 0
                chunk_x = torch.where(clean.view(1, h, *(1,) * len(frame_shape)), presented[:, a:a + h], x)
                chunk_lv = torch.where(clean, self.context_noise, now).expand(batch, h)
                if branches == 2:
                    chunk_x, chunk_lv = torch.cat([chunk_x, chunk_x]), torch.cat([chunk_lv, chunk_lv])
                if self.kv_cache:
                    # uncommitted frames up to the last one updated; the leading clean ones get committed
                    start, stop = len(cached), len(hist) + int(update[-1]) + 1
                    fresh = (hist + list(range(a, a + h)))[start:stop]
                    commit = 0
                    while commit < len(fresh) and (fresh[commit] < a or levels[m, fresh[commit] - a] == 0):
                        commit += 1
                    lo = max(start - len(hist), 0)
                    xs, ls = [chunk_x[:, lo:stop - len(hist)]], [chunk_lv[:, lo:stop - len(hist)]]
                    if start < len(hist):
                        xs, ls = [hist_x[:, start:]] + xs, [hist_lv[:, start:]] + ls
                    out = self._call(torch.cat(xs, 1), torch.cat(ls, 1), cache, commit)
                    cached += fresh[:commit]
                    pred = out[:, len(hist) + upd - start]
                else:
                    out = self._call(torch.cat([hist_x, chunk_x], 1), torch.cat([hist_lv, chunk_lv], 1), None, 0)
                    pred = out[:, len(hist) + upd]
                self._advance(st, x, pred, levels, levels_dev, m, update, upd, a, done)

    def _rolling(self, st, n_ctx, num_frames):
        seq, presented, masked, randn, history_guidance = st.seq, st.presented, st.masked, st.randn, st.history_guidance
        batch, frame_shape, device = seq.shape[0], tuple(seq.shape[2:]), seq.device
        top, ctx_level = self.schedule.steps, self.context_noise
        mask = dict(window_frames=self.window_frames, sink_frames=self.sink_frames)
        branches = 2 if history_guidance is not None else 1
        cache, committed = None, 0  # one cache for the rollout; frames 0 .. committed - 1 are in it
        if self.kv_cache:
            cache = self.model.new_cache(batch * branches, n_ctx + num_frames, **mask)
            self.stats["caches"] += 1

        def history(lo, hi):  # frames lo .. hi - 1 (all clean) as both branches present them
            xs, ls = presented[:, lo:hi], torch.full((batch, hi - lo), ctx_level, device=device, dtype=torch.int64)
            if branches == 2:
                xs, ls = torch.cat([xs, masked[:, lo:hi]]), torch.cat([ls, torch.full_like(ls, top)])
            return xs, ls

        for done, h in self._chunks(num_frames):
            a = n_ctx + done
            levels = self.matrix(h)
            x = randn(h)
            for m, update, upd, levels_dev in self._rows(levels, device):
                now = levels_dev[m]
                clean = now == 0
                clean_x = clean.view(1, h, *(1,) * len(frame_shape))
                chunk_x = torch.where(clean_x, presented[:, a:a + h], x)
                chunk_lv = torch.where(clean, ctx_level, now).expand(batch, h)
                if branches == 2:
                    chunk_x = torch.cat([chunk_x, torch.where(clean_x, masked[:, a:a + h], x)])
                    chunk_lv = torch.cat([chunk_lv, torch.where(clean, top, now).expand(batch, h)])
                if self.kv_cache:
                    # uncommitted frames up to the last one updated; the leading clean ones get committed
                    lo, stop = max(committed - a, 0), int(update[-1]) + 1
                    clean_lead = lo
                    while clean_lead < stop and levels[m, clean_lead] == 0:
                        clean_lead += 1
                    commit = max(a - committed, 0) + clean_lead - lo
                    xs, ls = [chunk_x[:, lo:stop]], [chunk_lv[:, lo:stop]]
                    if committed < a:
                        hx, hl = history(committed, a)
                        xs, ls = [hx] + xs, [hl] + ls
                    out = self._call(torch.cat(xs, 1), torch.cat(ls, 1), cache, commit, mask)
                    pred = out[:, a + upd - committed]  # the call's frames start at `committed`
                    committed += commit
                else:
                    hx, hl = history(0, a)
                    out = self._call(torch.cat([hx, chunk_x], 1), torch.cat([hl, chunk_lv], 1), None, 0, mask)
                    pred = out[:, a + upd]
                self._advance(st, x, pred, levels, levels_dev, m, update, upd, a, done)

    def _call(self, x, levels, cache, commit, mask=None):
        mask = mask or {}
        if cache is None:
            out = self.model(x, levels, **mask)
        else:
            out = self.model(x, levels, cache=cache, commit=commit, **mask)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model returned {got} for frames of shape {tuple(x.shape)}; it must return one "
                             f"prediction per input frame, shaped like its input (the DFModel protocol)")
        self.stats["calls"] += 1
        self.stats["frames"] += x.shape[1]
        return out.to(x.dtype)

    def _step(self, x_t, pred, now, nxt, frames, rewards, generator):
        sched = self.schedule
        now_b, nxt_b = now.expand(x_t.shape[0], -1), nxt.expand(x_t.shape[0], -1)
        x0, eps = sched.split(pred, x_t, now_b, self.prediction, check=False)
        if rewards:
            for r in rewards:
                x0 = r(x0, frames)
            x0, eps = sched.split(x0, x_t, now_b, "x0", check=False)
        noise = None
        if self.method == "ddpm" or self.eta > 0:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return sched._update(x_t, x0, eps, now_b, nxt_b, self.method, self.eta, noise)

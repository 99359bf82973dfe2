"""Suite ``df-rollout``: Diffusion Forcing rollouts, time per generated frame, KV cache vs recompute.

A :class:`fastdf.models.DFTransformer` with random weights (timing needs no training) rolls
out with :class:`fastdf.diffusion_forcing.Sampler` at window 16 (one sink frame), 8 sampling
steps per frame, for a pyramid schedule over chunks of 4 frames and an autoregressive one
(chunks of 1 frame), under both cache policies:

- ``window`` (the paper's sampler): ``recompute`` runs the whole window at every step (the
  official code); ``kv-cache`` commits the history once per window and runs only the
  frames being denoised.
- ``rolling`` (Self-Forcing / CausVid streaming): ``recompute`` runs the full history with
  the window masks at every step (the honest no-cache baseline; its cost grows with the
  rollout); ``kv-cache`` computes each frame's K/V once and evicts beyond the window.

"median ms" is milliseconds per generated frame (one rollout timed after a warm-up one,
divided by the frames generated); "vs fastdf" is recompute over kv-cache per frame. The case
name carries the frames-passed ratio (frames through the model, recompute over kv-cache),
counted by running the same sampler on a zero-cost stand-in model, which also gives the
FLOP floor per generated frame (linear layers 24 C^2 per token per layer, attention 4 C per
visible (query, key) token pair per layer, forward only): "TFLOP/s" is against that floor.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core import Case, time_once
from ..core import suite as register

WINDOW, STEPS, SINKS = 16, 8, 1
SCHEDULES = {"pyramid": 4, "autoregressive": 1}  # scheduling: chunk (frames denoised together)


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    tokens: int  # per frame
    channels: int  # per token (the frame is [tokens, channels])
    dim: int
    depth: int
    heads: int
    context: int  # real frames the rollout starts from
    frames: int  # frames generated
    batch: int = 1


CPU_SIZES = [Size("cpu-small", 32, 16, 128, 2, 4, 12, 16), Size("cpu-medium", 64, 16, 192, 3, 4, 12, 32)]
# Wan2.1-1.3B-like frames (1560 tokens, width 1536, 12 heads of 128) with fewer layers; quick
# mode (the GPU check) generates 8 frames with 2 layers, the full run 32 frames with 6.
GPU_SIZES = [Size("wan-like C1536 2 layers", 1560, 64, 1536, 2, 12, 12, 8),
             Size("wan-like C1536 6 layers", 1560, 64, 1536, 6, 12, 12, 32)]


class _Cost:
    """A zero-cost DFModel (with the rolling extension) that counts the FLOPs ``size``'s
    DFTransformer would spend on each call: frames through the model and visible pairs."""

    def __init__(self, size: Size):
        self.size, self.flops, self.frames = size, 0.0, 0

    class Cache:
        def __init__(self, window_frames, sink_frames):
            self.frames, self.window, self.sinks = 0, window_frames, sink_frames

    def new_cache(self, batch, max_frames, *, window_frames=None, sink_frames=0):
        return self.Cache(window_frames, sink_frames)

    def __call__(self, x, levels, *, cache=None, commit=0, window_frames=None, sink_frames=0):
        s = self.size
        start, n = (cache.frames if cache is not None else 0), x.shape[1]
        visible = 0
        for p in range(start, start + n):  # key frames a query frame at position p sees
            if window_frames is None:
                visible += p + 1
            else:
                visible += min(p + 1, window_frames) + min(sink_frames, max(0, p + 1 - window_frames))
        tokens = n * s.tokens * s.batch
        self.flops += (s.depth * 24 * s.dim**2 * tokens  # qkv, proj, MLP (4x) of every block
                       + 4 * s.channels * s.dim * tokens  # embedding and head
                       + s.depth * 4 * s.dim * s.batch * visible * s.tokens**2)  # attention
        self.frames += n
        if cache is not None:
            cache.frames += commit
        return torch.zeros_like(x)


def _sampler(model, policy, scheduling, kv_cache):
    from fastdf import diffusion_forcing as dforce

    schedule = dforce.NoiseSchedule("cosine", 1000)
    return dforce.Sampler(model, schedule, STEPS, scheduling, 1.0 if scheduling == "pyramid" else None,
                          window_frames=WINDOW, horizon=SCHEDULES[scheduling], sink_frames=SINKS, kv_cache=kv_cache,
                          cache_policy=policy)


def rollout_cost(size: Size, policy: str, scheduling: str, kv_cache: bool) -> tuple[float, int]:
    """(FLOPs, frames through the model) of one rollout (the per-frame cost model)."""
    model = _Cost(size)
    _sampler(model, policy, scheduling, kv_cache).rollout(torch.zeros(1, size.context, 1), size.frames,
                                                          progress=False)
    return model.flops, model.frames


def _case(size: Size, policy: str, scheduling: str) -> Case:
    costs = {p: rollout_cost(size, policy, scheduling, kv) for p, kv in (("kv-cache", True), ("recompute", False))}
    ratio = costs["recompute"][1] / costs["kv-cache"][1]
    name = (f"{policy} {size.name}, {size.tokens} tok/frame, {scheduling} chunk{SCHEDULES[scheduling]} W{WINDOW} "
            f"steps{STEPS}, {size.context}+{size.frames} frames, frames x{ratio:.2f}")

    def setup(device):
        from fastdf.models import DFTransformer

        gpu = device.type == "cuda"
        dtype = torch.bfloat16 if gpu else torch.float32
        g = torch.Generator().manual_seed(0)
        model = DFTransformer((size.tokens, size.channels), dim=size.dim, depth=size.depth, num_heads=size.heads,
                              level_dim=128)
        with torch.no_grad():  # random weights (a new model's AdaLN-Zero blocks are the identity)
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        model = model.to(device=device, dtype=dtype).eval()
        context = torch.randn(size.batch, size.context, size.tokens, size.channels, generator=g).to(device, dtype)

        def provider(kv_cache):
            sampler = _sampler(model, policy, scheduling, kv_cache)
            return lambda: sampler.rollout(context, size.frames, generator=torch.Generator(device).manual_seed(1),
                                           progress=False)

        return {"kv-cache": provider(True), "recompute": provider(False)}

    return Case(name, setup, flops_by={p: c[0] / size.frames for p, c in costs.items()},
                timer=lambda fn, quick: time_once(fn, quick) / size.frames)


@register("df-rollout", help="Diffusion Forcing rollout per generated frame: KV cache vs recompute, window 16")
def cases(device, quick):
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    if quick:
        # The CPU quick set is the default CPU run (issue 11: a few minutes on 2 cores): the
        # rolling recompute baseline grows with the history, so half the generated frames.
        sizes = sizes[:1] if device.type == "cuda" else [dataclasses.replace(CPU_SIZES[0], frames=8)]
    return [_case(size, policy, scheduling) for size in sizes for scheduling in SCHEDULES
            for policy in ("window", "rolling")]

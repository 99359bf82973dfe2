"""Diffusion Forcing end to end on moving blobs: train, roll out 4x past the training horizon.

    python -m fastdf.examples.df_rollout                 # ~1-2 minutes on a 2-core CPU
    python -m fastdf.examples.df_rollout --help          # sizes, steps, policies, output path

1. Makes a video-like dataset in code: Gaussian blobs moving at constant speed and bouncing
   off the walls (``moving_blobs``; nothing is downloaded).
2. Trains a small :class:`fastdf.models.DFTransformer` with Diffusion Forcing (independent
   noise level per frame) on clips of ``--frames`` frames (the training horizon).
3. Rolls it out for ``--rollout`` frames (default 4x the horizon) from ``--context`` real
   frames with the sliding-window sampler, once with the KV cache and once recomputing the
   window at every step, for each cache policy asked for; prints the time per generated
   frame of each, the max difference between cached and recomputed frames, and whether the
   rollout stayed finite and in range (per-frame std bounded by the data's).
4. Writes a PNG strip of the frames (context | generated, one row per sample).

Exit status 1 when a check fails (cached != recomputed beyond tolerance, non-finite or
out-of-range frames).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastdf import diffusion_forcing as dforce
from fastdf.models import DFTransformer


def moving_blobs(batch: int, frames: int, *, size: int = 16, blobs: int = 1, sigma: float = 2.0,
                 speed: tuple[float, float] = (0.5, 1.5), generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:
    """Clips ``[batch, frames, 1, size, size]`` in ``[-1, 1]`` (background -1): ``blobs``
    Gaussian blobs of width ``sigma`` pixels, each at a random place with a random velocity
    of ``speed`` pixels per frame, bouncing off the walls."""
    g = generator
    lo, hi = 1.5, size - 2.5
    pos = lo + (hi - lo) * torch.rand(batch, blobs, 2, generator=g)
    angle = 2 * math.pi * torch.rand(batch, blobs, generator=g)
    mag = speed[0] + (speed[1] - speed[0]) * torch.rand(batch, blobs, generator=g)
    vel = torch.stack([angle.cos(), angle.sin()], -1) * mag[..., None]
    t = torch.arange(frames, dtype=torch.float32)[None, :, None, None]
    raw = pos[:, None] + vel[:, None] * t - lo  # [B, F, blobs, 2], unfolded
    span = hi - lo
    folded = torch.remainder(raw, 2 * span)  # bounce: a triangle wave between lo and hi
    centre = lo + torch.where(folded > span, 2 * span - folded, folded)
    grid = torch.arange(size, dtype=torch.float32)
    dy = (grid[None, None, None, :] - centre[..., 0, None]) ** 2  # [B, F, blobs, size]
    dx = (grid[None, None, None, :] - centre[..., 1, None]) ** 2
    img = torch.exp(-(dy[..., :, None] + dx[..., None, :]) / (2 * sigma**2)).sum(2).clamp(max=1.0)
    return (2 * img - 1)[:, :, None].to(device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastdf.examples.df_rollout", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-steps", type=int, default=400, help="optimiser steps")
    p.add_argument("--batch", type=int, default=32, help="training clips per step")
    p.add_argument("--frames", type=int, default=8, help="training horizon (frames per clip) = the sampler's window")
    p.add_argument("--size", type=int, default=16, help="frame side in pixels")
    p.add_argument("--blobs", type=int, default=1, help="blobs per clip")
    p.add_argument("--sigma", type=float, default=2.0, help="blob width in pixels")
    p.add_argument("--patch", type=int, default=4, help="patch side (tokens per frame = (size / patch)^2)")
    p.add_argument("--dim", type=int, default=64, help="model width")
    p.add_argument("--depth", type=int, default=4, help="DFBlocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--levels", type=int, default=1000, help="noise schedule levels (training)")
    p.add_argument("--sampling-steps", type=int, default=10, help="sampling levels per frame")
    p.add_argument("--chunk", type=int, default=4, help="frames denoised together (the scheduling horizon)")
    p.add_argument("--context", type=int, default=2, help="real frames the rollout starts from")
    p.add_argument("--rollout", type=int, default=None, help="frames to generate (default: 4x --frames)")
    p.add_argument("--samples", type=int, default=4, help="rollouts run in one batch")
    p.add_argument("--context-noise", type=int, default=100,
                   help="stabilisation level of context frames (training levels, 0 = clean)")
    p.add_argument("--policy", choices=("window", "rolling", "both"), default="both",
                   help="sampler cache policy (the PNG shows the first one)")
    p.add_argument("--out", default="df_rollout.png", help="PNG strip to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    for name in ("train_steps", "batch", "frames", "size", "patch", "dim", "depth", "heads", "levels", "sampling_steps",
                 "chunk", "samples", "blobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rollout is None:
        args.rollout = 4 * args.frames
    if args.sigma <= 0:
        p.error("--sigma must be > 0")
    if not 0 <= args.context_noise <= args.levels:
        p.error("--context-noise must be in 0 .. --levels")
    if not 0 <= args.context < args.frames:
        p.error("--context must be in 0 .. --frames - 1")
    if args.chunk > args.frames:
        p.error("--chunk must be <= --frames (the window)")
    if args.size % args.patch:
        p.error("--patch must divide --size")
    return args


def train(model, schedule, args, generator, device):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * i / args.train_steps)))
    model.train()
    bar = tqdm(range(args.train_steps), desc="train", unit="step", disable=args.no_progress)
    losses = []
    for _ in bar:
        x0 = moving_blobs(args.batch, args.frames, size=args.size, blobs=args.blobs, sigma=args.sigma,
                          generator=generator, device=device)
        loss = dforce.training_step(model, x0, schedule, prediction="v", weighting="min_snr", generator=generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    model.eval()
    return losses


def rollout(model, schedule, context, args, policy, kv_cache):
    sampler = dforce.Sampler(model, schedule, args.sampling_steps, "pyramid", 1.0, window_frames=args.frames,
                             horizon=args.chunk, context_noise=args.context_noise, prediction="v",
                             kv_cache=kv_cache, cache_policy=policy)
    gen = torch.Generator(device=context.device).manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    frames = sampler.rollout(context, args.rollout, generator=gen, progress=not args.no_progress)
    return frames, time.perf_counter() - t0, sampler.stats


def save_strip(path, context, frames, horizon, title):
    """One row per sample: the context frames, then the generated ones (1-pixel gaps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq = torch.cat([context, frames], 1)[:, :, 0].float().cpu().clamp(-1, 1)  # [B, T, H, W]
    B, T, H, W = seq.shape
    canvas = torch.ones(B * (H + 1) - 1, T * (W + 1) - 1)
    for b in range(B):
        for t in range(T):
            canvas[b * (H + 1):b * (H + 1) + H, t * (W + 1):t * (W + 1) + W] = seq[b, t]
    fig, ax = plt.subplots(figsize=(max(6.0, T * 0.32), B * 0.34 + 0.9))
    ax.imshow(canvas.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    n_ctx = context.shape[1]
    ax.axvline(n_ctx * (W + 1) - 1, color="tab:red", linewidth=1.5)
    for t in range(n_ctx + horizon, T, horizon):  # where each further training horizon starts
        ax.axvline(t * (W + 1) - 1, color="tab:blue", linewidth=0.6, linestyle="--")
    ticks = list(range(0, T, max(1, T // 12)))
    ax.set_xticks([t * (W + 1) + W / 2 for t in ticks], [str(t) for t in ticks], fontsize=7)
    ax.set_yticks([])
    ax.set_xlabel("frame (red: end of the real context; blue: every training horizon after it)", fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    frame_shape = (1, args.size, args.size)
    model = DFTransformer(frame_shape, dim=args.dim, depth=args.depth, num_heads=args.heads, patch_size=args.patch,
                          level_dim=64, device=device)
    schedule = dforce.NoiseSchedule("cosine", args.levels)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: DFTransformer {params / 1e6:.2f}M params, {model.tokens_per_frame} tokens/frame, "
          f"depth {args.depth}, dim {args.dim}; data: {args.blobs} moving blob(s), {args.size}x{args.size}, "
          f"clips of {args.frames} frames")
    t0 = time.perf_counter()
    losses = train(model, schedule, args, g, device)
    k = max(1, len(losses) // 10)
    print(f"trained {args.train_steps} steps in {time.perf_counter() - t0:.1f}s: loss {sum(losses[:k]) / k:.4f} "
          f"(first {k}) -> {sum(losses[-k:]) / k:.4f} (last {k})")

    real = moving_blobs(args.samples, args.context + args.rollout, size=args.size, blobs=args.blobs, sigma=args.sigma,
                        generator=torch.Generator().manual_seed(args.seed + 7), device=device)
    context = real[:, :args.context]
    data_std = real.flatten(2).std(-1)  # per frame
    std_limit = 2.0 * float(data_std.max()) + 0.1
    policies = ["window", "rolling"] if args.policy == "both" else [args.policy]
    with torch.no_grad():  # warm-up (first-call allocations, lazy imports) kept out of the timings
        rollout(model, schedule, context, argparse.Namespace(**{**vars(args), "rollout": 1, "no_progress": True}),
                policies[0], True)
    ok, shown = True, None
    n = args.samples * args.rollout
    print(f"rollout: {args.samples} samples x {args.rollout} frames ({args.rollout / args.frames:g}x the training "
          f"horizon) from {args.context} real frames; window {args.frames}, chunks of {args.chunk}, "
          f"{args.sampling_steps} sampling steps, pyramid schedule")
    for policy in policies:
        cached, t_cached, s_cached = rollout(model, schedule, context, args, policy, True)
        recomputed, t_recomputed, s_recomputed = rollout(model, schedule, context, args, policy, False)
        diff = (cached - recomputed).abs().max().item()
        frame_std = cached.flatten(2).std(-1)
        finite = bool(torch.isfinite(cached).all())
        in_range = finite and float(frame_std.max()) <= std_limit and float(cached.abs().max()) <= 3.0
        print(f"  {policy:<7} KV cache : {1e3 * t_cached / n:7.2f} ms per generated frame "
              f"({s_cached['frames']} frames through the model)")
        print(f"  {policy:<7} recompute: {1e3 * t_recomputed / n:7.2f} ms per generated frame "
              f"({s_recomputed['frames']} frames through the model) -> cache {t_recomputed / t_cached:.2f}x faster, "
              f"{s_recomputed['frames'] / s_cached['frames']:.2f}x fewer frames")
        print(f"  {policy:<7} max |cached - recomputed| = {diff:.2e}; finite: {finite}; per-frame std "
              f"{float(frame_std.min()):.3f}..{float(frame_std.max()):.3f} (data {float(data_std.mean()):.3f}, "
              f"limit {std_limit:.3f}); range {float(cached.min()):.2f}..{float(cached.max()):.2f}: "
              f"{'in range' if in_range else 'OUT OF RANGE'}")
        ok = ok and diff <= 1e-3 and in_range
        if shown is None:
            shown = (policy, cached)
    policy, frames = shown
    save_strip(args.out, context, frames, args.frames,
               f"DFTransformer on moving blobs: {args.context} real frames, then {args.rollout} generated "
               f"({policy} policy, KV cache; trained on {args.frames}-frame clips)")
    print(f"wrote {args.out}")
    print("checks: " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

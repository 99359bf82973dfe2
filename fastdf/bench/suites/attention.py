"""Suite ``attention``: df_attention forward / backward / forward+backward against SDPA (every
backend the card has), FlexAttention compiled with the same mask, and flash-attn.

Shapes (issue #3; GPU, bf16):
  (a) token-causal, 16k tokens, 16 heads x 128
  (b) Wan-1.3B: 12 heads x 128, 21 frames of 1560 tokens, frame-causal in blocks of 3 frames
  (c) KV-cache chunk: 4680 queries (one block) against 9360..32760 keys, window 4 blocks, 1 sink
  (d) DFoT-S: 6 heads x 64, 16 frames of 256 tokens, batch 8
  (e) temporal attention of a factorised U-Net: batch 131072, 16 tokens, 4 heads x 64
TFLOP/s count visible (query, key) pairs only: 4 D per pair forward, 2.5x that backward.
On the CPU the same cases run at toy sizes in fp32, plus (f) the attention of the CPU
``skyreels`` suite's model (L=2000, frame blocks of 400): the torch backend against what a
user writes there, ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` with the
dense boolean mask (``sdpa``: PyTorch's own choice of kernel, its CPU flash kernel), SDPA
pinned to the math backend (``sdpa-math``) and eager FlexAttention: they show nothing
about GPU kernels.

``--quick`` runs a subset, skips FlexAttention (its compile takes minutes) and uses the
heuristic kernel configs (no autotuning); the issue's targets need the full run:
``python -m fastdf.bench --suite attention``.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

import fastdf
from fastdf.ops.attention import df_attention_mask, df_mask_mod, visible_pairs

from ..core import Case, Skip, suite

# name: (B, Hq, Hkv, Tq, Tk, D, mask)
GPU_SHAPES = {
    "a token-causal 16k": (1, 16, 16, 16384, 16384, 128, {}),
    "b Wan1.3B 21x1560 blocks of 3": (1, 12, 12, 32760, 32760, 128, dict(frame_size=4680)),
    "c KV chunk Tk=9360": (1, 12, 12, 4680, 9360, 128, dict(frame_size=4680, window_frames=4, sink_frames=1)),
    "c KV chunk Tk=18720": (1, 12, 12, 4680, 18720, 128, dict(frame_size=4680, window_frames=4, sink_frames=1)),
    "c KV chunk Tk=32760": (1, 12, 12, 4680, 32760, 128, dict(frame_size=4680, window_frames=4, sink_frames=1)),
    "d DFoT-S 16x256": (8, 6, 6, 4096, 4096, 64, dict(frame_size=256)),
    "e U-Net temporal 131072x16": (131072, 4, 4, 16, 16, 64, {}),
}
GPU_QUICK = [("a token-causal 16k", "fwd"), ("b Wan1.3B 21x1560 blocks of 3", "fwd+bwd"),
             ("c KV chunk Tk=32760", "fwd"), ("d DFoT-S 16x256", "fwd+bwd"), ("e U-Net temporal 131072x16", "fwd")]
CPU_SHAPES = {
    "a token-causal": (1, 2, 2, 256, 256, 64, {}),
    "b frame-causal blocks": (1, 2, 2, 288, 288, 32, dict(frame_size=96)),
    "c KV chunk": (1, 2, 2, 96, 288, 32, dict(frame_size=96, window_frames=2, sink_frames=1)),
    "d DFoT-like": (2, 2, 2, 256, 256, 64, dict(frame_size=32)),
    "e U-Net temporal": (512, 4, 4, 16, 16, 64, {}),
    "f SkyReels-reduced 5 blocks of 400": (1, 4, 4, 2000, 2000, 32, dict(frame_size=400)),
}
CPU_QUICK = [("a token-causal", "fwd"), ("b frame-causal blocks", "fwd+bwd"), ("e U-Net temporal", "fwd"),
             ("f SkyReels-reduced 5 blocks of 400", "fwd")]
MODES = ("fwd", "bwd", "fwd+bwd")
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def _inputs(B, Hq, Hkv, Tq, Tk, D, dtype, device):
    """[B, H, T, D] views of [B, T, H, D] storage, as a model's projections give them."""
    q = torch.randn(B, Tq, Hq, D, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, Tk, Hkv, D, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, Tk, Hkv, D, device=device, dtype=dtype).transpose(1, 2)
    return q, k, v


def _plain_causal(Tq, Tk, mask):
    return Tq == Tk and mask.get("frame_size", 1) == 1 and mask.get("window_frames") is None


def _sdpa(name, Tq, Tk, mask, device):
    """SDPA pinned to backend ``name``, or PyTorch's own choice for None."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = None if name is None else getattr(SDPBackend, SDPA_BACKENDS[name])
    if _plain_causal(Tq, Tk, mask):
        kwargs = dict(is_causal=True)
    else:
        if name == "flash":
            raise Skip("SDPA's flash backend takes no explicit mask")
        kwargs = dict(attn_mask=df_attention_mask(Tq, Tk, **mask, device=device))

    def run(q, k, v):
        with contextlib.nullcontext() if pinned is None else sdpa_kernel(pinned):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kwargs)

    return run


def _flex(B, Tq, Tk, mask, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(df_mask_mod(Tq, Tk, **mask), None, None, Tq, Tk, device=device)
    if device.type == "cuda":
        compiled = torch.compile(flex_attention, dynamic=False)
    else:
        compiled = flex_attention  # eager (unfused) on the CPU: compiling takes too long for a smoke run

    def run(q, k, v):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])

    return run


def _flash_attn(Tq, Tk, mask):
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise Skip("flash-attn is not installed") from None
    if not _plain_causal(Tq, Tk, mask):
        raise Skip("flash-attn has no frame-causal mask")
    return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           causal=True).transpose(1, 2)


def _timed(fn, mode, q, k, v, grad):
    """A zero-argument callable for ``mode``; the backward graph is built on first use."""
    if mode == "fwd":
        return lambda: fn(q, k, v)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
    state = {}

    def backward():
        if "out" not in state:
            state["out"] = fn(q, k, v)
        return torch.autograd.grad(state["out"], (q, k, v), grad, retain_graph=True)

    return backward


def _case(name, shape, mode, dtype, device, quick):
    B, Hq, Hkv, Tq, Tk, D, mask = shape
    pairs = visible_pairs(Tq, Tk, **mask) * B * Hq
    fwd_flops = 4.0 * D * pairs
    flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}[mode]
    elem = torch.tensor([], dtype=dtype).element_size()
    io = (2 * B * Tq * Hq + 2 * B * Tk * Hkv) * D * elem  # read q, k, v, write o
    nbytes = {"fwd": io, "bwd": 2 * io, "fwd+bwd": 3 * io}[mode]

    def setup(device):
        q, k, v = _inputs(B, Hq, Hkv, Tq, Tk, D, dtype, device)
        if mode != "fwd":
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        grad = torch.randn_like(q)
        providers = {"fastdf": lambda q, k, v: fastdf.df_attention(q, k, v, **mask)}
        dense = B * Hq * Tq * Tk
        if device.type == "cpu":  # what a user writes: no backend pinned
            providers["sdpa"] = _sdpa(None, Tq, Tk, mask, device)
        for sdpa in SDPA_BACKENDS:
            if device.type == "cpu" and sdpa != "math":
                continue
            if sdpa == "math" and dense > (1 << 28):
                providers["sdpa-math"] = Skip(f"math backend would materialise {dense:.2e} scores")
                continue
            try:
                providers[f"sdpa-{sdpa}"] = _sdpa(sdpa, Tq, Tk, mask, device)
            except Skip as why:
                providers[f"sdpa-{sdpa}"] = why
        if device.type == "cpu" and mode != "fwd":
            providers["flex"] = Skip("FlexAttention has no backward on the CPU")
        elif not (quick and device.type == "cuda"):
            providers["flex"] = _flex(B, Tq, Tk, mask, device)
        if device.type == "cuda":
            try:
                providers["flash-attn"] = _flash_attn(Tq, Tk, mask)
            except Skip as why:
                providers["flash-attn"] = why
        # Providers that cannot run this case (a Skip holding the reason) are left out of the timing.
        return {pname: _timed(fn, mode, q, k, v, grad) for pname, fn in providers.items() if not isinstance(fn, Skip)}

    dt = str(dtype).removeprefix("torch.")
    return Case(f"{name} B{B} H{Hq}/{Hkv} Tq{Tq} Tk{Tk} D{D} {dt} {mode}", setup, flops=flops, bytes=nbytes)


@suite("attention", help="df_attention fwd/bwd vs SDPA (each backend), compiled FlexAttention, flash-attn")
def cases(device, quick):
    if device.type == "cuda":
        dtype, shapes, picks = torch.bfloat16, GPU_SHAPES, GPU_QUICK
        if quick:
            from fastdf.kernels import attention as kernels

            kernels.TUNE_MIN_PAIRS = float("inf")  # quick runs: heuristic configs, no autotuning compiles
    else:
        dtype, shapes, picks = torch.float32, CPU_SHAPES, CPU_QUICK
    if not quick:
        picks = [(name, mode) for name in shapes for mode in MODES]
    return [_case(name, shapes[name], mode, dtype, device, quick) for name, mode in picks]

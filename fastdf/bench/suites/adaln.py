"""Suite ``adaln``: per-frame AdaLN (adaln_modulate) and gated residuals against eager torch.

Baselines: ``eager-expanded`` is what DFoT / SkyReels-V2 do (LayerNorm, then the per-frame
modulation repeated to every token); ``eager-broadcast`` broadcasts a [B, F, 1, C] view
instead (no per-token table, still three extra passes), and with one token per frame (F =
T) it is the plain elementwise expression a user writes there (``x + gate * y``, no views:
each view is one more autograd node); ``compiled`` is torch.compile of
the broadcast version. GB/s against the byte floor (each tensor read or written once:
x and y forward; dy, x and dx backward), to compare with the card's copy bandwidth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastdf

from ..core import Case, suite

GPU_SHAPES = {  # name: (B, T, F, C)
    "Wan1.3B 21x1560": (1, 32760, 21, 1536),
    "DFoT-S 16x256": (8, 4096, 16, 768),
    "per-token F=T": (4, 4096, 4096, 1024),
}
CPU_SHAPES = {"Wan-like": (1, 2048, 8, 256), "per-token F=T": (2, 256, 256, 128)}


def _expanded(x, shift, scale):
    S = x.shape[1] // shift.shape[1]
    n = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    return n * (1 + scale.repeat_interleave(S, 1)) + shift.repeat_interleave(S, 1)


def _broadcast(x, shift, scale):
    B, T, C = x.shape
    if shift.shape[1] == T:  # one token per frame: plain elementwise
        return F.layer_norm(x, (C,), eps=1e-6) * (1 + scale) + shift
    n = F.layer_norm(x, (C,), eps=1e-6).view(B, shift.shape[1], -1, C)
    return (n * (1 + scale[:, :, None]) + shift[:, :, None]).view(B, T, C)


def _gated_broadcast(x, y, gate):
    B, T, C = x.shape
    if gate.shape[1] == T:
        return x + gate * y
    Fr = gate.shape[1]
    return (x.view(B, Fr, -1, C) + gate[:, :, None] * y.view(B, Fr, -1, C)).view(B, T, C)


def _gated_expanded(x, y, gate):
    return x + gate.repeat_interleave(x.shape[1] // gate.shape[1], 1) * y


def _timed(fn, mode, args, grad):
    if mode == "fwd":
        return lambda: fn(*args)
    wants = [a for a in args if a.requires_grad]
    return lambda: torch.autograd.grad(fn(*args), wants, grad)


def _case(op, name, shape, mode, dtype, device, quick):
    B, T, Fr, C = shape
    elem = torch.tensor([], dtype=dtype).element_size()
    big = B * T * C * elem
    tables = B * Fr * C * 4
    if op == "modulate":
        floor = {"fwd": 2 * big + 2 * tables, "fwd+bwd": 5 * big + 4 * tables}[mode]
    else:
        floor = {"fwd": 3 * big + tables, "fwd+bwd": 5 * big + 2 * tables}[mode]

    def setup(device):
        g = mode != "fwd"
        x = torch.randn(B, T, C, device=device, dtype=dtype, requires_grad=g)
        t1, t2 = (torch.randn(B, Fr, C, device=device, dtype=torch.float32, requires_grad=g) for _ in range(2))
        grad = torch.randn(B, T, C, device=device, dtype=dtype)
        # the baselines cast the fp32 tables to x's dtype only where they differ (bf16 on a
        # GPU): a same-dtype .to() is no work, but one more call a user would not write
        if op == "modulate":
            ours = lambda x, shift, scale: fastdf.adaln_modulate(x, shift, scale)  # noqa: E731
            if dtype == torch.float32:
                baselines = {"eager-expanded": _expanded, "eager-broadcast": _broadcast}
            else:
                baselines = {"eager-expanded": lambda x, s, c: _expanded(x, s.to(x.dtype), c.to(x.dtype)),
                             "eager-broadcast": lambda x, s, c: _broadcast(x, s.to(x.dtype), c.to(x.dtype))}
            args = (x, t1, t2)
        else:
            y = torch.randn(B, T, C, device=device, dtype=dtype, requires_grad=g)
            ours = fastdf.gated_residual
            if dtype == torch.float32:
                baselines = {"eager-expanded": _gated_expanded, "eager-broadcast": _gated_broadcast}
            else:
                baselines = {"eager-expanded": lambda x, y, gate: _gated_expanded(x, y, gate.to(x.dtype)),
                             "eager-broadcast": lambda x, y, gate: _gated_broadcast(x, y, gate.to(x.dtype))}
            args = (x, y, t1)
        if device.type == "cuda" and not quick:
            baselines["compiled"] = torch.compile(baselines["eager-broadcast"])
        providers = {"fastdf": _timed(ours, mode, args, grad)}
        providers.update({n: _timed(fn, mode, args, grad) for n, fn in baselines.items()})
        return providers

    dt = str(dtype).removeprefix("torch.")
    return Case(f"{op} {name} B{B} T{T} F{Fr} C{C} {dt} {mode}", setup, bytes=floor)


@suite("adaln", help="per-frame adaln_modulate / gated_residual vs eager LayerNorm + expanded modulation")
def cases(device, quick):
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    names = list(shapes)[:1] if quick else list(shapes)
    out = []
    for op in ("modulate", "gated"):
        for name in names:
            for mode in ("fwd", "fwd+bwd"):
                out.append(_case(op, name, shapes[name], mode, dtype, device, quick))
    return out

"""The eager CPU fast path: when a public op may skip its torch.library custom op.

A ``torch.library`` custom op with ``register_autograd`` costs tens of microseconds per
call in Python dispatch, more than a whole small elementwise op on the CPU, which made the
``torch`` backend slower than the plain PyTorch code it replaces (issue 11). When the torch
backend is the one that would run, and nothing is being traced, the public functions of
adaln and cascade call plain differentiable torch code instead (native autograd, same
math as the custom op's torch implementation). Under ``torch.compile`` the custom op stays
(one opaque node, as DESIGN.md asks), and ``torch.ops.fastdf.*`` always is the custom op.
"""

from __future__ import annotations

import os

import torch

from ._backend import _check_choice, _requests

# FASTDF_BACKEND values already parsed as requested_backend parses them (~1 us a call, a
# few percent of a small CPU op); a new value is parsed (and refused) the same way.
_ENV_CHOICES: dict = {}
# os.environ.get runs ~10 lines of Python (encode the key, look up, decode the value):
# beside a running op, where each cold line costs ~1 us, that was ~10 us a call. On POSIX
# os.environ keeps its bytes in a dict that every os.environ update writes through, so
# one dict lookup reads the same value; elsewhere the public API.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENV_DATA, dict):
    _ENV_DATA = None


def torch_backend_eager(device: torch.device) -> bool:
    """True when the op would run its ``torch`` backend on ``device`` and no compiler or
    exporter is tracing (so plain torch code may stand in for the custom op)."""
    if torch.compiler.is_compiling():
        return False
    request = _request()
    return request == "torch" or (request == "auto" and device.type == "cpu")


def _request() -> str:
    """The backend asked for: the innermost fastdf.backend(...) block, else FASTDF_BACKEND
    (requested_backend's rule; a new env value is parsed, and refused, once)."""
    if _requests:
        return _requests[-1]
    raw = _ENV_DATA.get(b"FASTDF_BACKEND") if _ENV_DATA is not None else os.environ.get("FASTDF_BACKEND")
    request = _ENV_CHOICES.get(raw)
    if request is None:
        text = os.fsdecode(raw) if isinstance(raw, bytes) else raw
        request = _ENV_CHOICES[raw] = _check_choice(text or "auto", "FASTDF_BACKEND")
    return request


_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_is_compiling = torch.compiler.is_compiling
# Dynamo's own flag: one Python frame where is_compiling() is two (~1 us with cold caches,
# beside a ~110 us per-token gated residual). What is_compiling() adds (AOTAutograd, make_fx
# and non-strict export running Python under a compile session) traces fake tensors or runs
# under a dispatch mode, which cpu_kernel_route and its callers' plain-tensor tests refuse.
_dynamo_compiling = torch.compiler.is_dynamo_compiling


def cpu_kernel_route(compiling: bool | None = None) -> bool:
    """``torch_backend_eager(cpu)`` and no ``__torch_dispatch__`` mode or functorch transform
    active, in one call: where fastdf._cpu's kernels may take plain CPU tensors. Measured on
    a 256 KiB gated residual between other ops (caches part cold): the separate calls cost
    ~10 us a call, each Python function touched being a cost there, not only its lines.
    ``compiling``: ``torch.compiler.is_compiling()`` where the caller has it already, else
    Dynamo's flag is asked (see _dynamo_compiling); callers pass plain tensors only."""
    if (_dynamo_compiling() if compiling is None else compiling) or _len_dispatch_stack() or _functorch_active():
        return False
    # _request() inlined for the common case (no block, a value parsed before): one Python
    # frame fewer, ~1-2% of a 120 us per-token gated residual with its backward
    if _requests:
        request = _requests[-1]
    elif _ENV_DATA is None or (request := _ENV_CHOICES.get(_ENV_DATA.get(b"FASTDF_BACKEND"))) is None:
        request = _request()
    return request == "torch" or request == "auto"


# nn.Parameter disables __torch_function__, so it runs as a plain tensor (layer weights are
# Parameters); other subclasses keep the custom op.
PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_tensors(*tensors) -> bool:
    """True when every tensor given (None skipped) is a plain ``torch.Tensor`` (or an
    ``nn.Parameter``) and no
    ``__torch_dispatch__`` mode (make_fx, FakeTensorMode) or functorch transform (vmap,
    grad) is active: the custom op's fake and the transforms' rules then are not needed.
    Ops whose torch code reads data on the host (``bool(t.any())``) check this as well,
    since fake or batched tensors cannot answer that."""
    if torch._C._len_torch_dispatch_stack() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) in PLAIN for t in tensors)


_C_APPLY = torch._C._FunctionBase.__dict__["apply"]
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def direct_apply(cls):
    """``cls.apply`` for an ``autograd.Function`` without ``setup_context``, minus the Python
    wrapper's per-call work (~2 us a call: a closure, a generator over the arguments), for
    callers that have checked that no functorch transform is active: it then does what the
    wrapper does, unwrap dead functorch wrappers and call the C ``apply``. Takes tensors
    only (positional)."""
    c_apply = _C_APPLY.__get__(None, cls)

    def apply(*tensors):
        return c_apply(*map(_unwrap_if_dead, tensors))

    return apply

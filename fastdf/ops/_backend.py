"""Backend registry: which implementation of an op runs.

Every op has up to three implementations: ``cuda`` (fastdf._C, csrc/), ``triton``
(fastdf.kernels) and ``torch`` (the readable reference, also the CPU path). The request
comes from the innermost ``fastdf.backend(name)`` block, else ``FASTDF_BACKEND``, else
``auto``. ``auto`` takes the op's preferred available backend for the tensors' device
(CPU tensors -> torch). A named backend that cannot run raises
:class:`BackendUnavailableError`; nothing falls back silently.

The request is process-wide (not per thread) on purpose: autograd runs CUDA backward
passes on its own worker threads, which must see the same choice as the caller.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable

import torch

BACKENDS = ("cuda", "triton", "torch")
CHOICES = ("auto",) + BACKENDS

_requests: list[str] = []


class BackendUnavailableError(RuntimeError):
    """A backend was named that cannot run this op on these inputs."""


def _check_choice(name, source):
    if not isinstance(name, str):
        raise TypeError(f"{source}: expected a backend name (str), got {type(name).__name__}")
    choice = name.strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{source}: unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    return choice


def requested_backend() -> str:
    """The backend asked for right now: 'auto', 'cuda', 'triton' or 'torch'."""
    if _requests:
        return _requests[-1]
    return _check_choice(os.environ.get("FASTDF_BACKEND", "auto") or "auto", "FASTDF_BACKEND")


@contextlib.contextmanager
def backend(name: str):
    """Run fastdf ops inside this block with backend ``name`` ('auto', 'cuda', 'triton',
    'torch'). Blocks nest; the innermost wins. Also usable as a decorator.

    >>> with fastdf.backend("triton"):
    ...     out = fastdf.merge_attention_states(o_a, lse_a, o_b, lse_b)
    """
    _requests.append(_check_choice(name, "fastdf.backend"))
    try:
        yield
    finally:
        _requests.pop()


def _triton_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    from fastdf import kernels

    if device.type == "cuda":
        if kernels.INTERPRET:
            return "TRITON_INTERPRET=1 was set when fastdf was imported, so Triton kernels run on CPU tensors only"
        return None
    if device.type == "cpu":
        if kernels.INTERPRET:
            return None
        return "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before importing fastdf"
    return f"Triton cannot run {device.type} tensors"


def _cuda_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the cuda backend runs CUDA tensors, got {device.type} tensors"
    from fastdf import _native

    return _native.unavailable_reason()


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run tensors on ``device`` (None if it can)."""
    device = torch.device(device)
    if name == "torch":
        return None
    if name == "triton":
        return _triton_reason(device)
    if name == "cuda":
        return _cuda_reason(device)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run tensors on ``device`` in this process."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


class Op:
    """One op family member: its implementations per backend and how to pick one.

    ``prefer`` is the order ``auto`` tries on CUDA tensors (fastest first, as measured);
    on CPU tensors ``auto`` always takes ``torch``. An implementation may pass
    ``supports``: a function of the call's arguments returning None or the reason it
    cannot handle them (auto then tries the next backend; a named backend raises).
    """

    def __init__(self, name: str, *, prefer=("cuda", "triton", "torch")):
        self.name = name
        self.prefer = tuple(prefer)
        self.impls: dict[str, tuple[Callable, Callable | None]] = {}
        REGISTRY[name] = self

    def register(self, name: str, *, supports: Callable | None = None):
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}")

        def decorate(fn):
            self.impls[name] = (fn, supports)
            return fn

        return decorate

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b in BACKENDS if b in self.impls)

    def select(self, device: torch.device, *args, **kwargs) -> tuple[str, Callable]:
        request = requested_backend()
        explicit = request != "auto"
        if explicit:
            order = (request,)
        elif device.type == "cpu":
            order = ("torch",)
        else:
            order = self.prefer
        reasons = []
        for name in order:
            if name not in self.impls:
                reason = f"fastdf.{self.name} has no {name} implementation (it has: {', '.join(self.backends)})"
            else:
                fn, supports = self.impls[name]
                reason = unavailable_reason(name, device)
                if reason is None and supports is not None:
                    reason = supports(*args, **kwargs)
                if reason is None:
                    return name, fn
            if explicit:
                raise BackendUnavailableError(f"backend {name!r} cannot run fastdf.{self.name}: {reason}")
            reasons.append(f"{name}: {reason}")
        raise BackendUnavailableError(f"no backend can run fastdf.{self.name} here ({'; '.join(reasons)})")

    def __call__(self, *args, **kwargs):
        """Run the selected implementation; the device is the first tensor argument's."""
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        _, fn = self.select(device, *args, **kwargs)
        return fn(*args, **kwargs)


REGISTRY: dict[str, Op] = {}

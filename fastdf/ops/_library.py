"""Registering fastdf ops with torch.library.

Each public op is a ``torch.library.custom_op`` named ``fastdf::<name>`` whose body asks
the backend registry which implementation to run. torch.compile then sees one opaque node
(no graph break, no tracing into Triton or CUDA launches); ``register_fake`` gives it
shapes, ``register_autograd`` its backward. Usage::

    MERGE = Op("merge_attention_states")          # backends register on MERGE

    @custom_op(MERGE)
    def merge_op(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
        ...                                       # prototype: the signature is the schema

    @merge_op.register_fake
    def _(o_a, lse_a, o_b, lse_b): ...

    merge_op.register_autograd(backward, setup_context=setup_context)

The backend is read when the op runs (forward and backward alike), so a compiled graph
follows ``fastdf.backend(...)`` blocks entered after compilation.
"""

from __future__ import annotations

import functools

import torch

from ._backend import Op


def custom_op(op: Op, *, mutates_args=()):
    """Decorator: define ``fastdf::<op.name>`` from a prototype; its body runs ``op``."""

    def decorate(prototype):
        @functools.wraps(prototype)
        def body(*args, **kwargs):
            return op(*args, **kwargs)

        # The schema comes from the prototype, whose module resolves its annotations.
        schema = torch.library.infer_schema(prototype, mutates_args=mutates_args)
        return torch.library.custom_op(f"fastdf::{op.name}", mutates_args=mutates_args, schema=schema)(body)

    return decorate

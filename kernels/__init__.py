"""Triton kernels, installed as ``fastdf.kernels`` (the source lives in the top-level
``kernels/`` folder). Nothing here is public API: ``fastdf.ops`` launches these.

Triton decides at decoration time whether a kernel runs compiled or under its CPU
interpreter, so ``TRITON_INTERPRET=1`` must be set before ``import fastdf``; ``INTERPRET``
records what this process got.
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune(configs, key, **kwargs):
    """``triton.autotune``, except under the interpreter, where autotuning cannot run
    ("0 active drivers"): there the first config is used as a fixed one."""
    import triton

    if not INTERPRET:
        return triton.autotune(configs=configs, key=key, **kwargs)

    def wrap(fn):
        return _FixedConfig(fn, configs[0])

    return wrap


class _FixedConfig:
    """Launches a jitted kernel with one config's meta-parameters, like an autotuner would."""

    def __init__(self, fn, config):
        self.fn = fn
        self.config = config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = dict(self.config.kwargs)
            meta.update(num_warps=self.config.num_warps, num_stages=self.config.num_stages)
            meta.update(kwargs)
            return self.fn[grid](*args, **meta)

        return launch

"""What the launchers need to know about the GPU they launch on, shared by every kernel
family: SM count (persistent and split grids), whether TMA tensor descriptors may be used,
and the global scratch that device-made descriptors need.

The launchers call these through the module (``_device.num_sms(...)``), never by a name
imported into their own namespace: ``fastdf.bench.compile`` replaces ``num_sms`` and
``tma_capable`` here with the compile target's answers, so meta-tensor launches show the
grid and the load path they would get on that GPU.
"""

import contextlib

from . import INTERPRET

_SMS = {}


def num_sms(device):
    """Streaming multiprocessors of CUDA ``device`` (cached per device index)."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


TMA_BYTES = 16  # TMA: base address and every stride but the unit one in multiples of 16 B


def tma_capable(device):
    """Whether launches on ``device`` may use TMA descriptors: Hopper and later (Triton
    lowers descriptors to plain unpipelined loads before sm_90, slower than our pointer
    path), the interpreter (which checks the same alignment rules, so tests cover the
    path), and meta tensors, which only the compile report (sm_90a) launches with."""
    import torch

    device = torch.device(device)
    if INTERPRET or device.type == "meta":
        return True
    if device.type != "cuda" or torch.version.hip:  # (ROCm has no TMA: its capability 9.x is not Hopper)
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _CAPABILITY[index]


_CAPABILITY = {}


def tma_strides(t, inner):
    """Whether a descriptor can read ``t`` with dim ``inner`` innermost: that dim has unit
    stride, the base and every other stride (of a dim longer than 1) are multiples of 16 B."""
    size = t.element_size()
    if t.stride(inner) != 1 or (t.data_ptr() % TMA_BYTES if t.device.type != "meta" else 0):
        return False
    return all(t.stride(d) > 0 and (t.stride(d) * size) % TMA_BYTES == 0
               for d in range(t.dim()) if d != inner % t.dim())


def scratch(size, alignment, stream):
    """Global scratch for the descriptors a kernel makes on the device (128 B each per
    program), from torch's caching allocator on the current stream's device."""
    import torch

    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextlib.contextmanager
def scratch_allocator():
    """Make ``scratch`` Triton's allocator for a launch, unless the caller set one: the
    allocator is a ContextVar, so this neither leaks past the launch nor replaces theirs."""
    from triton.runtime import _allocation

    var = _allocation._allocator
    if INTERPRET or not isinstance(var.get(), _allocation.NullAllocator):
        yield
        return
    token = var.set(scratch)
    try:
        yield
    finally:
        var.reset(token)

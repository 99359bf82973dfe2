"""Builds csrc/*.cu for the CPU emulation and calls the fastdf:: launch functions via ctypes.

The .cu sources are compiled unchanged except for a mechanical rewrite of the three
constructs g++ cannot parse (``k<<<grid, block, smem, stream>>>(args)``,
``__shared__ T name;`` and ``extern __shared__ T name[];``) into calls of the emulation
runtime (include/cuda_runtime.h). The shared library is cached under the system temp
directory, keyed by a hash of every input and the compiler flags, so a session compiles
once. Inputs are copied into buffers that end at a guard page (emu_alloc) and outputs are
pre-filled with garbage, so an out-of-bounds access faults and an unwritten output shows.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# FASTDF_CUDA_CPU_CSRC: another copy of csrc/ (e.g. an old revision, to see a regression test fail).
CSRC = Path(os.environ.get("FASTDF_CUDA_CPU_CSRC", ROOT / "csrc")).resolve()
KERNELS = ("sampling.cu", "moe.cu", "cascade.cu")  # csrc/, compiled unchanged (after rewrite())
SELFTEST = HERE / "selftest.cu"  # kernels that break the rules: the checks must fire
HOST = (HERE / "emu_runtime.cpp", HERE / "shim.cpp")

VARIANTS = {
    # -O2 without -fno-strict-aliasing: type-punned reads miscompile as they may under nvcc.
    "default": ["-O2", "-g0"],
    "asan": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
             "-fno-omit-frame-pointer"],
}
# -ffp-contract=off: the emulation rounds every product, as the torch references do; nvcc
# contracts into FMAs (benches/notes/cuda_cpu.md: which ops are bit-exact where).
COMMON = ["-std=c++17", "-fPIC", "-pthread", "-ffp-contract=off", "-U_FORTIFY_SOURCE", "-Wall", "-Wno-unused-function",
          "-Wno-unused-variable",
          "-Wno-unknown-pragmas"]

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}()]*?>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+([\w:<>]+)\s+(\w+)\s*((?:\[[^\]]+\])?)\s*;")


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def rewrite(src: str) -> str:
    """The .cu text with launches and shared-memory declarations mapped onto the runtime."""
    out = _LAUNCH.sub(lambda m: f"::emu::Launch({m.group(2)}).go({m.group(1)})(", src)
    out = _EXTERN_SHARED.sub(lambda m: f"{m.group(1)}* const {m.group(2)} = static_cast<{m.group(1)}*>("
                             "::emu::dynamic_shared());", out)
    out = _SHARED.sub(lambda m: f"{m.group(1)} (&{m.group(2)}){m.group(3)} = "
                      f"*static_cast<{m.group(1)} (*){m.group(3)}>(::emu::static_shared("
                      f"sizeof({m.group(1)}{m.group(3)}), alignof({m.group(1)})));", out)
    if "<<<" in out or "__shared__" in out:
        raise RuntimeError("cuda_cpu: a launch or __shared__ declaration the rewrite does not understand")
    return out


def _inputs():
    files = [CSRC / k for k in KERNELS] + [SELFTEST] + sorted(CSRC.glob("*.h")) + list(HOST)
    files += sorted((HERE / "include").glob("*.h"))
    files.append(Path(__file__))
    return files


def build(variant: str = "default") -> Path:
    """Path of the emulation library for ``variant``, compiled if the cache has none."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("g++ not found")
    flags = COMMON + VARIANTS[variant] + os.environ.get("FASTDF_CUDA_CPU_CXXFLAGS", "").split()
    h = hashlib.sha256()
    for f in _inputs():
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(" ".join([cxx, *flags, str(CSRC)]).encode())
    cache = Path(tempfile.gettempdir()) / "fastdf_cuda_cpu" / f"{variant}-{h.hexdigest()[:16]}"
    lib = cache / "libfdf_emu.so"
    if lib.exists():
        return lib
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache.parent if cache.parent.exists() else None))
    srcs = []
    for path in [CSRC / k for k in KERNELS] + [SELFTEST]:
        dst = work / (path.name + ".cpp")
        dst.write_text(f'#line 1 "{path.parent.name}/{path.name}"\n' + rewrite(path.read_text()))
        srcs.append(dst)
    srcs += list(HOST)
    inc = ["-I", str(HERE / "include"), "-I", str(CSRC)]

    def compile_one(src):
        obj = work / (src.name + ".o")
        res = subprocess.run([cxx, *flags, *inc, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"cuda_cpu: compiling {src.name} failed:\n{res.stderr[-6000:]}")
        return obj

    with ThreadPoolExecutor(max_workers=2) as pool:
        objs = list(pool.map(compile_one, srcs))
    tmp_lib = work / "libfdf_emu.so"
    link = [cxx, *flags, "-shared", "-o", str(tmp_lib), *map(str, objs)]
    res = subprocess.run(link, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"cuda_cpu: linking failed:\n{res.stderr[-4000:]}")
    cache.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_lib, lib)  # atomic: a concurrent session sees the whole file or none
    shutil.rmtree(work, ignore_errors=True)
    return lib


class KernelError(RuntimeError):
    """The emulated launch failed (a check fired, a fault, or the launch function threw)."""


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I = ctypes.c_int
_F = ctypes.c_float
_SIGS = {
    "fdf_sample_from_logits": [_P, _I64, _I64, _I64, _I64, _I, _P, _P, _I64, _P, _P, _P, _P, _F, _I64, _F, _F, _P, _P,
                               _I],
    "fdf_moe_route": [_P, _I, _I64, _I, _P, _P, _P, _P],
    "fdf_moe_gather": [_P, _I64, _I64, _P, _I64, _I64, _P, _I64, _I64, _I],
    "fdf_moe_combine": [_P, _I64, _I64, _P, _I64, _I, _I64, _P, _P, _I64, _I64, _I],
    "fdf_merge_attention_states": [_P, _P] * 6 + [_P, _I],
}
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_POISONS = (0xA5, 0xFF, 0x7F, 0x80)


class Emu:
    """The emulated device: ``device(t)`` copies a CPU tensor into a guarded buffer."""

    def __init__(self, path: Path, seed: int = 0):
        self.lib = ctypes.CDLL(str(path))
        for name, args in _SIGS.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        self.lib.fdf_last_error.restype = ctypes.c_char_p
        self.lib.emu_alloc.argtypes, self.lib.emu_alloc.restype = [ctypes.c_size_t], ctypes.c_void_p
        self.lib.emu_free.argtypes, self.lib.emu_free.restype = [ctypes.c_void_p, ctypes.c_size_t], None
        self.lib.emu_configure.argtypes = [ctypes.c_ulonglong, ctypes.c_uint, ctypes.c_int]
        self._live: list[tuple[int, int]] = []
        self.configure(seed)

    def configure(self, seed: int, atomic_yield: int = 64, poison: int | None = None):
        """Thread order (seed), how often atomics yield (out of 256), the shared-memory poison byte."""
        self.lib.emu_configure(seed, atomic_yield, _POISONS[seed % len(_POISONS)] if poison is None else poison)

    def counters(self):
        buf = (ctypes.c_ulonglong * 3)()
        self.lib.emu_counters(buf)
        return {"launches": buf[0], "blocks": buf[1], "switches": buf[2]}

    # ---------------------------------------------------------------- memory
    def empty(self, shape, dtype, stride=None, fill=None):
        """A guarded device tensor (strided if asked), pre-filled with garbage bytes."""
        shape = tuple(shape)
        if stride is None:
            stride = torch.empty(shape, device="meta").stride() if shape else ()
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        esize = torch.empty((), dtype=dtype).element_size()
        nbytes = max(extent * esize, 0)
        addr = self.lib.emu_alloc(nbytes)
        if not addr:
            raise MemoryError("emu_alloc")
        self._live.append((addr, nbytes))
        raw = (ctypes.c_ubyte * max(nbytes, 1)).from_address(addr)
        u8 = torch.uint8
        storage = torch.frombuffer(raw, dtype=u8, count=nbytes) if nbytes else torch.empty(0, dtype=u8)
        storage.fill_(0xCD if fill is None else fill)
        flat = storage.view(dtype) if nbytes else torch.empty(0, dtype=dtype)
        return flat.as_strided(shape, stride) if nbytes else torch.empty(shape, dtype=dtype)

    def device(self, t: torch.Tensor | None, stride=None):
        """A guarded copy of ``t`` with ``t``'s strides (or ``stride``); None stays None."""
        if t is None:
            return None
        d = self.empty(t.shape, t.dtype, stride=t.stride() if stride is None else stride)
        d.copy_(t)
        return d

    def free_all(self):
        for addr, nbytes in self._live:
            self.lib.emu_free(addr, nbytes)
        self._live.clear()

    def _check(self, rc):
        if rc:
            raise KernelError(self.lib.fdf_last_error().decode())

    # ---------------------------------------------------------------- ops
    def sample(self, logits, uniforms, *, indices=None, temperature=None, top_k=None, top_p=None, min_p=None,
               temperature_value=1.0, top_k_value=0, top_p_value=1.0, min_p_value=0.0, candidate_cap=-1,
               logits_stride=None):
        """fastdf.ops.sampling._sample_cuda's call, on guarded copies; returns (ids, status)."""
        try:
            x = self.device(logits, logits_stride)
            u = self.device(uniforms.float().contiguous())
            ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
            knobs = [self.device(t) for t in (indices, temperature, top_k, top_p, min_p)]
            n = u.numel()
            out = self.empty((n,), torch.int64)
            status = self.empty((n,), torch.int32)
            self._check(self.lib.fdf_sample_from_logits(
                x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), x.stride(1), DTYPE_CODES[x.dtype], u.data_ptr(),
                ptr(knobs[0]), n, *(ptr(k) for k in knobs[1:]), temperature_value, top_k_value, top_p_value,
                min_p_value, out.data_ptr(), status.data_ptr(), candidate_cap))
            return out.clone(), status.clone()
        finally:
            self.free_all()

    def moe_route(self, topk_ids, num_experts, chunk=1024):
        """fastdf.ops.moe._cuda_route's call: (order, inverse, offs)."""
        try:
            n = topk_ids.numel()
            ids = self.device(topk_ids.contiguous())
            order = self.empty((n,), torch.int32)
            inverse = self.empty(tuple(topk_ids.shape), torch.int32)
            offs = self.empty((num_experts,), torch.int32)
            workspace = self.empty((max(1, -(-n // chunk)) * (num_experts + 1),), torch.int32)
            self._check(self.lib.fdf_moe_route(ids.data_ptr(), int(ids.dtype == torch.int32), n, num_experts,
                                               order.data_ptr(), inverse.data_ptr(), offs.data_ptr(),
                                               workspace.data_ptr()))
            return order.clone(), inverse.clone(), offs.clone()
        finally:
            self.free_all()

    def moe_gather(self, x, rows, x_stride=None, out_stride=None):
        try:
            xd = self.device(x, x_stride)
            r = self.device(rows.int().contiguous())
            out = self.empty((rows.numel(), x.shape[1]), x.dtype, stride=out_stride)
            self._check(self.lib.fdf_moe_gather(xd.data_ptr(), xd.stride(0), xd.stride(1), r.data_ptr(), r.numel(),
                                                x.shape[1], out.data_ptr(), out.stride(0), out.stride(1),
                                                x.element_size()))
            return out.clone()
        finally:
            self.free_all()

    def moe_combine(self, y, inverse, weights, y_stride=None, out_stride=None):
        try:
            T, K = inverse.shape
            yd = self.device(y, y_stride)
            inv = self.device(inverse.int().contiguous())
            w = self.device(weights.float().contiguous()) if weights is not None else None
            out = self.empty((T, y.shape[1]), y.dtype, stride=out_stride)
            self._check(self.lib.fdf_moe_combine(yd.data_ptr(), yd.stride(0), yd.stride(1), inv.data_ptr(), T, K,
                                                 y.shape[1], w.data_ptr() if w is not None else 0, out.data_ptr(),
                                                 out.stride(0), out.stride(1), DTYPE_CODES[y.dtype]))
            return out.clone()
        finally:
            self.free_all()

    def merge(self, o_a, lse_a, o_b, lse_b):
        """fastdf.ops.cascade._merge_cuda's call for [..., D] states with up to four leading dims."""
        try:
            lead = tuple(lse_a.shape)
            if len(lead) > 4:
                raise ValueError("at most four leading dims")
            size = [1] * (4 - len(lead)) + list(lead) + [o_a.shape[-1]]
            tensors = [self.device(t) for t in (o_a, lse_a, o_b, lse_b)]
            o = self.empty(o_a.shape, o_a.dtype)
            lse = self.empty(lse_a.shape, torch.float32)
            keep = []

            def strides(t, is_o):
                st = list(t.stride())
                lead_st = st[:-1] if is_o else st
                five = [0] * (4 - len(lead_st)) + lead_st + [st[-1] if is_o else 0]
                arr = (ctypes.c_int64 * 5)(*five)
                keep.append(arr)
                return ctypes.addressof(arr)

            args = []
            for t, is_o in zip((tensors[0], tensors[1], tensors[2], tensors[3], o, lse),
                               (True, False, True, False, True, False)):
                args += [t.data_ptr(), strides(t, is_o)]
            size_arr = (ctypes.c_int64 * 5)(*size)
            self._check(self.lib.fdf_merge_attention_states(*args, ctypes.addressof(size_arr), DTYPE_CODES[o_a.dtype]))
            return o.clone(), lse.clone()
        finally:
            self.free_all()

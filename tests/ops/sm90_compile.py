"""Compile fastdf's Triton kernels for an H100 (sm_90) on a machine without a GPU.

The interpreter runs kernels but never lowers them, so errors only the compiler sees
(non-constexpr globals, layouts, shared memory, a loop that stops pipelining) would first
show on the GPU. Triton compiles for a given target without one. Run in a process without
TRITON_INTERPRET (tests/ops/test_kernels_compile.py does); prints one JSON line per kernel.

Launch-time specialisation is mimicked: head-dim strides are 1 and every pointer and
other stride is 16-divisible, as for contiguous [B, T, H, D] tensors with H * D % 16 == 0.
"""

import inspect
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = ("qk_scale", "scale", "eps")
UNIT_STRIDES = ("sqd", "skd", "svd", "sod", "sgd", "sdkd", "sdvd", "sdqd", "slt", "sxc", "shc", "scc", "syc", "soc",
                "sgc")


def compile_kernel(jit, pointers, constexprs, num_warps, num_stages):
    params = list(inspect.signature(jit.fn).parameters)
    constexprs = {**constexprs, **{p: 1 for p in UNIT_STRIDES if p in params}}
    sig, attrs = {}, {}
    for i, p in enumerate(params):
        if p in constexprs:
            sig[p] = "constexpr"
        elif p in pointers:
            sig[p] = pointers[p]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p in FLOATS:
            sig[p] = "fp32"
        else:
            sig[p] = "i32"
            if p.startswith("s"):  # strides
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=jit, signature=sig, constexprs={(params.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    ttgir = kernel.asm["ttgir"]
    return {"kernel": jit.fn.__name__, "shared": kernel.metadata.shared,
            "wgmma": ttgir.count("warp_group_dot "), "async_copy": ttgir.count("async_copy_global_to_local")}


def main():
    sys.path.insert(0, ".")
    import fastdf  # noqa: F401  (installs fastdf.kernels from the checkout)
    from fastdf.kernels import adaln, attention

    ptr = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "X", "Y", "DY", "DX", "OUT", "DOUT")}
    ptr.update({n: "*fp32" for n in ("LSE", "DELTA", "DLSE", "SHIFT", "SCALE", "BIAS", "MEAN", "RSTD", "P_SHIFT",
                                     "P_SCALE", "P_W", "P_B", "GATE", "P_GATE")})
    ptr["KS"] = "*i32"
    norm_ptr = {**ptr, "W": "*fp32"}  # in the attention kernels W is the window (an int)
    mask = dict(HAS_WINDOW=True, HAS_KS=True, PREC="tf32")
    d128 = dict(BLOCK_D=128, EVEN_D=True)
    jobs = [
        (attention._fwd_kernel, dict(**d128, BLOCK_M=128, BLOCK_N=64, STAGES=3, **mask), 8, 3),
        (attention._bwd_dkdv_kernel, dict(**d128, BLOCK_M=32, BLOCK_N=128, STAGES=3, **mask), 4, 3),
        (attention._bwd_dq_kernel, dict(**d128, BLOCK_M=128, BLOCK_N=32, STAGES=3, **mask), 4, 3),
        (attention._fwd_short_kernel, dict(BLOCK_D=64, BLOCK_M=16, BLOCK_N=16, R=8, **mask), 4, 1),
        (adaln._modulate_fwd_kernel, dict(BLOCK_C=2048, ROWS=4, RMS=False, HAS_W=True, HAS_B=True), 4, 1),
        (adaln._modulate_bwd_kernel, dict(BLOCK_C=2048, ROWS=4, RMS=False, HAS_W=True, HAS_B=True), 4, 1),
    ]
    for jit, constexprs, warps, stages in jobs:
        pointers = norm_ptr if jit.fn.__module__.endswith("adaln") else ptr
        print(json.dumps(compile_kernel(jit, pointers, constexprs, warps, stages)), flush=True)


if __name__ == "__main__":
    main()

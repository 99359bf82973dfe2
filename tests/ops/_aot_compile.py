"""Compile the grouped-GEMM / MoE Triton kernels ahead of time for sm_90 and sm_80 without a
GPU (Triton ships ptxas) and report what the compiler made of them.

Explicit specialisations (layouts and configs the launchers may not pick at the benchmark
shapes) through fastdf.bench.compile.compile_signature; the launcher-driven report is
``python -m fastdf.bench.compile``. Run by
test_grouped_mm.py::test_kernels_compile_for_hopper_and_ampere in a subprocess,
because the test process imports the kernels under TRITON_INTERPRET=1. Argument
specialisations mimic what the runtime sees for contiguous HF-layout tensors (unit
strides as constants, 16-divisible pointers and leading strides), which is what lets the
pipeliner use async copies.
"""

import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)


def _build(fn, types, consts, div16, warps, stages, arch):
    from fastdf.bench.compile import compile_signature, ptx_summary

    kernel = compile_signature(fn, types, consts, div16, warps, stages, arch)
    ir, ptx = kernel.asm["ttgir"], ptx_summary(kernel.asm["ptx"])
    return {"smem": kernel.metadata.shared, "async_copies": len(re.findall(r"\basync_copy_global_to_local", ir)),
            "tma_async": len(re.findall(r"async_tma_copy_global_to_local", ir)),
            "wgmma": ptx["wgmma"], "load_kind": ptx["load_kind"],
            "mma_versions": sorted(set(int(v) for v in re.findall(r"nvidia_mma<\{versionMajor = (\d)", ir)))}


def main():
    import fastdf  # noqa: F401  (installs fastdf.kernels)
    from fastdf.kernels import grouped_mm as G
    from fastdf.kernels import moe as M

    gmm_ptrs = {n: "*bf16" for n in ("x_ptr", "w_ptr", "tw_ptr", "out_ptr", "h_ptr")}
    gmm_ptrs.update(rows_ptr="*i32", slot_ptr="*i32", offs_ptr="*i32")
    gmm_div = ["x_ptr", "w_ptr", "tw_ptr", "out_ptr", "h_ptr", "rows_ptr", "slot_ptr", "offs_ptr", "N", "K", "s_xm",
               "s_we", "s_te", "s_om", "s_hm"]
    k_major = dict(s_xk=1, s_wk=1, s_tk=1, s_on=1, s_hn=1)  # w = HF gate_up/down transposed
    n_major = dict(s_xk=1, s_wn=1, s_tn=1, s_on=1, s_hn=1)  # w = HF weight as stored (dX)
    out = {}
    pointers = dict(A_TMA=False, W_TMA=False, W_KMAJOR=False, PAIR=False)
    gemms = [  # name, arch, layout, HAS_ROWS, HAS_TW, GLU, BM, BN, BK, warps, stages[, TMA flags]
        ("fwd_down_esft", 90, k_major, False, 1, False, 128, 256, 64, 8, 3),
        ("fwd_gate_up_glu_esft", 90, k_major, True, 1, True, 128, 64, 64, 8, 3),
        ("dx_gate_up", 90, n_major, False, 0, False, 128, 128, 64, 8, 3),
        ("fwd_other_tw_layout", 90, k_major, False, 2, False, 64, 128, 64, 4, 3),
        ("fwd_down_esft", 80, k_major, False, 1, False, 128, 256, 64, 8, 3),
        ("fwd_gate_up_glu_esft", 80, k_major, True, 1, True, 128, 64, 64, 8, 3),
        # TMA descriptors (sm_90 only): weights K-major (HF) or N-major (dX), A dense or gathered.
        # PAIR: the GLU's gate and up halves as one 2 BN-wide box (K-major weights only).
        ("tma_fwd_down_esft", 90, k_major, False, 1, False, 128, 256, 64, 8, 3,
         dict(A_TMA=True, W_TMA=True, W_KMAJOR=True, PAIR=False)),
        ("tma_fwd_gate_up_glu_esft", 90, k_major, True, 1, True, 128, 64, 64, 8, 3,
         dict(A_TMA=False, W_TMA=True, W_KMAJOR=True, PAIR=True)),
        ("tma_fwd_glu_n_major", 90, n_major, True, 0, True, 128, 64, 64, 8, 3,
         dict(A_TMA=False, W_TMA=True, W_KMAJOR=False, PAIR=False)),
        ("tma_dx_gate_up", 90, n_major, False, 0, False, 128, 128, 64, 8, 3,
         dict(A_TMA=True, W_TMA=True, W_KMAJOR=False, PAIR=False)),
    ]
    for name, arch, layout, rows, tw, glu, bm, bn, bk, warps, stages, *tma in gemms:
        consts = dict(HAS_ROWS=rows, HAS_TW=tw, GLU=glu, STORE_H=glu, ACT=0, EP=128, PRECISION="tf32", BM=bm, BN=bn,
                      BK=bk, GROUP_M=8, EVEN_K=True, **layout, **(tma[0] if tma else pointers))
        div = gmm_div + [s for s in ("s_wk", "s_wn", "s_tk", "s_tn") if s not in layout]
        out[f"{name}@sm{arch}"] = _build(G._gmm_kernel, gmm_ptrs, consts, div, warps, stages, arch)
    dw_ptrs = {"x_ptr": "*bf16", "dy_ptr": "*bf16", "dw_ptr": "*bf16", "xrows_ptr": "*i32", "dyrows_ptr": "*i32",
               "ids_ptr": "*i64", "offs_ptr": "*i32"}
    dw_div = ["x_ptr", "dy_ptr", "dw_ptr", "N", "K", "s_xm", "s_ym", "s_de", "s_dn"]
    for name, xr, yr, bk, bn, bm, warps, stages in [("dw_gate_up", True, False, 128, 128, 64, 8, 3),
                                                    ("dw_down", False, True, 128, 64, 64, 4, 4),
                                                    ("tma_dw_gate_up", True, False, 128, 128, 64, 8, 3),
                                                    ("tma_dw_down", False, False, 128, 128, 64, 8, 3)]:
        # TMA for every operand that is not gathered through a row index.
        tma = dict(X_TMA=name.startswith("tma") and not xr, Y_TMA=name.startswith("tma") and not yr)
        consts = dict(HAS_XROWS=xr, HAS_YROWS=yr, PRECISION="tf32", BK=bk, BN=bn, BM=bm, s_xk=1, s_yn=1, s_dk=1, **tma)
        out[f"{name}@sm90"] = _build(G._gmm_dw_kernel, dw_ptrs, consts, dw_div, warps, stages, 90)
    out["combine@sm90"] = _build(M._combine_kernel, {"y_ptr": "*bf16", "inv_ptr": "*i32", "w_ptr": "*fp32",
                                                     "out_ptr": "*bf16"}, dict(HAS_W=True, BT=8, BH=256), [], 4, 1, 90)
    out["glu_backward@sm90"] = _build(
        M._glu_bwd_kernel, {"h_ptr": "*bf16", "da_ptr": "*bf16", "dh_ptr": "*bf16", "aw_ptr": "*bf16", "w_ptr": "*bf16",
                            "dw_ptr": "*fp32"}, dict(ACT=0, STORE_AW=True, BS=16, BI=128), [], 4, 1, 90)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

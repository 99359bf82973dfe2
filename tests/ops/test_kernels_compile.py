"""The attention, AdaLN and grouped-GEMM kernels compile for an H100 (sm_90a) here, without a
GPU, through their launchers: the tiled ones with wgmma and a pipelined key/K loop.

The compile is ``fastdf.bench.compile.ci_report()`` (shared with tests/bench/test_compile.py,
which holds the spill / shared-memory / TMA / wave gates)."""

import pytest

from fastdf.bench import compile as C


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    if C._tool("ptxas") is None:
        pytest.skip("Triton's ptxas is missing in this install")
    rows = [r for r in C.ci_report()["kernels"] if r["source"] == "triton"]
    failed = [f"{r['job']} {r['kernel']}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "\n".join(failed)
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    assert {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_fwd_short_kernel", "_modulate_fwd_kernel",
            "_modulate_bwd_kernel", "_gmm_kernel", "_gmm_dw_kernel"} <= set(by_kernel)
    for name in ("_bwd_dkdv_kernel", "_bwd_dq_kernel", "_gmm_kernel", "_gmm_dw_kernel"):
        for r in by_kernel[name]:
            assert r["wgmma"] > 0, f"{r['job']} {name} lost its wgmma"
            assert r["cp_async"] + r["tma_loads"] > 0, f"{r['job']} {name}'s main loop is no longer pipelined"
    # The forward's tall query tiles use wgmma; decode-sized ones (16 rows) use mma.sync.
    for r in by_kernel["_fwd_kernel"]:
        assert r["wgmma"] > 0 if r["config"]["BLOCK_M"] >= 64 else r["mma_sync"] > 0, f"{r['job']}: {r}"
        assert r["cp_async"] + r["tma_loads"] > 0, f"{r['job']} forward's key loop is no longer pipelined"
    assert all(r["smem"] <= C.LIMITS[90]["smem_block"] for r in rows)

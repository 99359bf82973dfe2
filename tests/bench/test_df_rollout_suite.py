"""The df-rollout suite's cost model (FLOP floors and frames-passed ratios) and its cases."""

import torch

from fastdf.bench.suites import df_rollout as suite
from fastdf.ops.attention import visible_pairs


def test_cost_model_counts_visible_pairs_like_the_attention():
    size = suite.Size("t", tokens=3, channels=2, dim=8, depth=2, heads=2, context=0, frames=1)
    for window, sinks in [(None, 0), (2, 1), (3, 0)]:
        for start, n in [(0, 7), (4, 3)]:
            model = suite._Cost(size)
            cache = None
            if start:
                cache = model.new_cache(1, start + n, window_frames=window, sink_frames=sinks)
                cache.frames = start
            model(torch.zeros(1, n, 1), None, cache=cache, window_frames=window, sink_frames=sinks)
            t = (start + n) * size.tokens
            pairs = visible_pairs(n * size.tokens, t, frame_size=size.tokens, window_frames=window, sink_frames=sinks)
            linear = n * size.tokens * (size.depth * 24 * size.dim**2 + 4 * size.channels * size.dim)
            assert model.flops == linear + size.depth * 4 * size.dim * pairs
            assert model.frames == n


def test_cases_report_the_frames_ratio_and_floors():
    cases = suite.cases(torch.device("cpu"), quick=True)
    assert len(cases) == 4 and {c.name.split()[0] for c in cases} == {"window", "rolling"}
    for case in cases:
        ratio = float(case.name.rsplit("frames x", 1)[1])
        assert ratio > 3  # the cache passes several times fewer frames through the model at window 16
        assert case.flops_by["recompute"] > case.flops_by["kv-cache"] > 0

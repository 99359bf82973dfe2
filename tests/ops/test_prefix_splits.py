"""The shared-prefix launcher's key-split rule (kernels/cascade.py prefix_splits): grids in
whole waves, never more splits than the keys allow. Pure Python: no kernel runs."""

import pytest

triton = pytest.importorskip("triton")

from fastdf.kernels import cascade as K  # noqa: E402


def _fill(ctas, slots):
    waves = ctas / slots
    return waves / -(-waves // 1)


@pytest.mark.parametrize("slots", [132, 264, 108, 148])
def test_fewest_splits_that_fill_the_last_wave(slots):
    """Against a brute-force search over every split count the keys allow: the rule returns
    the fewest (launched) splits that fill >= 90% of the last wave when one exists, else the
    fullest last wave; a grid that already covers the GPU is not split."""
    for programs in (1, 3, 8, 16, 32, 48, 64, 100, 131, 132, 200):
        for keys in (1, 64, 255, 256, 512, 2048, 5000, 8192, 32768):
            got = K.prefix_splits(programs, keys, slots)
            limit = max(1, min(-(-keys // K.MIN_SPLIT_KEYS), 64))
            launched = sorted({K._split_count(keys, s, 64)[1] for s in range(1, limit + 1)})
            assert 1 <= got <= limit and got in launched, (programs, keys, got)
            if programs >= slots:
                assert got == 1
                continue
            good = [s for s in launched if _fill(programs * s, slots) >= 0.9]
            if good:
                assert got == min(good), (programs, keys, got, good)
            else:
                assert _fill(programs * got, slots) == max(_fill(programs * s, slots) for s in launched)


def test_ctas_per_sm_match_the_compiled_kernel():
    """The tile model against the compile report of _prefix_kernel on sm_90a (bf16, 3 stages):
    64x64x128 w4 allocates 112 KB and fits 2 CTAs an SM, 128x64x128 w8 128 KB and 1."""
    smem = 228 * 1024
    assert K._prefix_ctas_per_sm(64, 64, 128, 2, 4, 3, smem) == 2
    assert K._prefix_ctas_per_sm(128, 64, 128, 2, 8, 3, smem) == 1
    # N128 Hq32 Hkv8 P2048 (the benchmark's CI shape): 32 programs, 4 splits = 128 CTAs on 132 SMs
    assert K.prefix_splits(8 * 4, 2048, 132 * 1) == 4

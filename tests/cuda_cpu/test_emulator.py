"""The harness's own checks fire: each rule-breaking kernel in selftest.cu is reported,
and a well-behaved one gives the right answer under every thread order."""

import ctypes

import pytest
import torch


def _run(emu, which, n=64, seed=0):
    emu.configure(seed)
    inp = emu.device(torch.arange(n, dtype=torch.int32))
    out = emu.empty((256,), torch.int32, fill=0)
    fn = emu.lib.emu_selftest
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    emu.lib.emu_selftest_message.restype = ctypes.c_char_p
    rc = fn(which, inp.data_ptr(), out.data_ptr(), n)
    msg = emu.lib.emu_selftest_message().decode() if rc else ""
    return rc, msg, out.clone()


@pytest.mark.parametrize("seed", range(4))
def test_well_behaved_kernel(emu, seed):
    rc, msg, out = _run(emu, 0, n=100, seed=seed)
    assert rc == 0, msg
    assert out[:2].tolist() == [sum(range(64)), sum(range(64))]  # each block sums in[0:64]
    assert out[2:4].tolist() == [0xAAAAAAAA - (1 << 32)] * 2  # odd lanes of every warp


@pytest.mark.parametrize("which, expect", [
    (1, "divergent block barrier"),
    (2, "has exited"),
    (3, "names lane 31"),
    (4, "does not name its own lane"),
    (5, "invalid memory access"),
    (8, "dynamic shared memory"),
])
def test_rule_breaking_kernel_is_reported(emu, which, expect):
    rc, msg, _ = _run(emu, which)
    assert rc != 0
    assert expect in msg


def test_shared_memory_starts_poisoned(emu):
    seen = set()
    for seed in range(4):
        rc, msg, out = _run(emu, 6, seed=seed)
        assert rc == 0, msg
        assert out[0] == 7
        seen.add(int(out[1]))
    assert len(seen) >= 3  # several poison bytes across runs, none of them "zero"
    assert 0 not in seen


def test_random_order_exposes_a_race(emu):
    counts = set()
    for seed in range(8):
        rc, msg, out = _run(emu, 7, seed=seed)
        assert rc == 0, msg
        counts.add(int(out[0]))
    assert 8 in counts  # some orders run the eight warps one after another
    assert min(counts) < 8  # and some interleave a read and a write: lost updates


def test_launch_after_failure_reports_once(emu):
    assert _run(emu, 1)[0] != 0
    rc, msg, out = _run(emu, 0)  # the sticky error was read: the next launch runs
    assert rc == 0, msg

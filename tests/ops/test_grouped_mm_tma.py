"""The grouped GEMMs' TMA-descriptor path (fastdf.kernels.grouped_mm): which operands the
launchers send through descriptors, and that both that path and the pointer fallback give
the reference's numbers at group edges, empty groups, tail rows and sizes that are not
multiples of the tile or of 16 bytes.

Runs the kernels directly, on CUDA when there is a GPU, else under the interpreter (which
checks TMA's alignment rules and zero-fills out-of-bounds boxes as the hardware does, so a
wrong eligibility choice fails its assertion and a wrong bound shows up in the numbers).
"""

import pytest
import torch

from fastdf.kernels import grouped_mm as G
from fastdf.ops.grouped_mm import grouped_mm_reference
from fastdf.testing import assert_close_by_rule

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Groups whose sizes are not multiples of the 16-row interpreter tile, an empty group in the
# middle and one at the start, and tail rows past offs[-1].
OFFS = [0, 5, 5, 29, 40]
S = 45


class _Spy:
    """Wraps a launcher (``kernel[grid](...)``) and records each launch's keyword flags."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getitem__(self, grid):
        launch = self.inner[grid]

        def run(*args, **kwargs):
            self.calls.append(kwargs)
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def spy(monkeypatch):
    spies = {}
    for table in (G._GMM, G._DW):
        for key, launcher in list(table.items()):
            spies[id(table), key] = s = _Spy(launcher)
            monkeypatch.setitem(table, key, s)

    def flags():
        calls = [c for s in spies.values() for c in s.calls]
        assert len(calls) == 1
        return {k: v for k, v in calls[0].items() if k.endswith(("TMA", "KMAJOR", "PAIR"))}

    return flags


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def _weights(E, K, N, dtype, kmajor, seed=1):
    if kmajor:  # HF stores [E, N, K]; the kernels read its transpose
        return _rand(E, N, K, dtype=dtype, seed=seed).transpose(1, 2)
    return _rand(E, K, N, dtype=dtype, seed=seed)


def _offs(offs=OFFS):
    return torch.tensor(offs, dtype=torch.int32, device=DEV)


def _check(actual, ref64, lowp):
    assert_close_by_rule(actual, ref64, lowp)


def _gmm_ref(x, w, offs, **kw):
    return grouped_mm_reference(x.double(), w.double(), offs, **{k: v.double() if v.is_floating_point() else v
                                                                 for k, v in kw.items()}), \
        grouped_mm_reference(x, w, offs, **kw)


# (dtype, K, N, w K-major?, expected (A_TMA, W_TMA, W_KMAJOR))
LAYOUTS = [
    (torch.float16, 40, 24, True, (True, True, True)),  # K = 2.5 tiles: the descriptor zero-fills the tail
    (torch.float16, 24, 40, False, (True, True, False)),  # N-major weights, N = 2.5 tiles
    (torch.float32, 20, 12, True, (True, True, True)),  # fp32: 80-byte rows are 16-byte multiples
    (torch.float16, 20, 24, True, (False, False, False)),  # 40-byte rows: no descriptor, pointers
    (torch.float16, 24, 20, False, (True, False, False)),  # N-major 40-byte weight rows: W by pointer
]


@pytest.mark.parametrize("dtype, K, N, kmajor, want", LAYOUTS,
                         ids=[f"{str(d)[6:]}-K{k}-N{n}-{'kmaj' if m else 'nmaj'}" for d, k, n, m, _ in LAYOUTS])
def test_forward_descriptor_choice_and_result(spy, dtype, K, N, kmajor, want):
    x, w, offs = _rand(S, K, dtype=dtype, seed=0), _weights(len(OFFS), K, N, dtype, kmajor), _offs()
    out = torch.full((S, N), float("nan"), dtype=dtype, device=DEV)
    G.gmm(x, w, offs, out)
    assert tuple(spy().values()) == (*want, False)  # PAIR: GLU only
    _check(out, *_gmm_ref(x, w, offs))


def test_forward_misaligned_base_falls_back_to_pointers(spy):
    """A view starting 2 bytes into its storage cannot be a TMA base address."""
    buf = _rand(S * 32 + 1, dtype=torch.float16, seed=0)
    x = buf[1:].view(S, 32)
    w = _weights(len(OFFS), 32, 16, torch.float16, True)
    out = torch.empty(S, 16, dtype=torch.float16, device=DEV)
    G.gmm(x, w, _offs(), out)
    assert spy() == dict(A_TMA=False, W_TMA=True, W_KMAJOR=True, PAIR=False)
    _check(out, *_gmm_ref(x, w, _offs()))


def test_forward_gathered_rows_stay_pointer_loads(spy):
    x = _rand(30, 32, dtype=torch.float16, seed=0)
    rows = torch.randint(0, 30, (S,), generator=torch.Generator().manual_seed(2), dtype=torch.int32).to(DEV)
    w = _weights(len(OFFS), 32, 16, torch.float16, True)
    out = torch.empty(S, 16, dtype=torch.float16, device=DEV)
    G.gmm(x, w, _offs(), out, rows=rows)
    assert spy() == dict(A_TMA=False, W_TMA=True, W_KMAJOR=True, PAIR=False)
    _check(out, *_gmm_ref(x[rows.long()], w, _offs()))


def test_forward_neighbouring_group_rows_do_not_leak(spy):
    """A's descriptor reads whole 16-row boxes across group ends: rows of the next group
    (NaN here) may only reach output rows that the next group's tile writes."""
    x = _rand(S, 32, dtype=torch.float32, seed=0)
    x[29:40] = float("nan")  # expert 4's rows; expert 3's last tile (rows 21..36) reads 8 of them
    w = _weights(len(OFFS), 32, 16, torch.float32, True)
    out = torch.empty(S, 16, device=DEV)
    G.gmm(x, w, _offs(), out)
    assert spy()["A_TMA"]
    assert torch.isnan(out[29:40]).all() and not torch.isnan(out[:29]).any() and (out[40:] == 0).all()
    _check(out[:29], *(r[:29] for r in _gmm_ref(x, w, _offs())))


@pytest.mark.parametrize("same_strides", [True, False], ids=["tw-like-w", "tw-other-strides"])
def test_forward_trainable_weights_through_one_expert_descriptors(spy, same_strides):
    """With trainable_w, each tile makes a descriptor for whichever tensor holds its expert."""
    K, N, E = 40, 24, len(OFFS)
    x, w = _rand(S, K, dtype=torch.float16, seed=0), _weights(E, K, N, torch.float16, True)
    tids = torch.tensor([2, 3], device=DEV)  # an empty group and rows 5..28
    tw = _rand(2, N, K, dtype=torch.float16, seed=5)
    if not same_strides:  # a padded [E_t, N, K + 8] buffer: same orientation, other strides
        tw = torch.cat([tw, torch.zeros(2, N, 8, dtype=torch.float16, device=DEV)], 2)[:, :, :K]
    tw = tw.transpose(1, 2)
    out = torch.empty(S, N, dtype=torch.float16, device=DEV)
    G.gmm(x, w, _offs(), out, tw=tw, slot=torch.tensor([-1, -1, 0, 1, -1], dtype=torch.int32, device=DEV))
    assert spy() == dict(A_TMA=True, W_TMA=True, W_KMAJOR=True, PAIR=False)
    _check(out, *_gmm_ref(x, w, _offs(), trainable_w=tw, trainable_ids=tids))


def test_forward_trainable_weights_other_orientation_fall_back(spy):
    """w K-major and trainable_w N-major: no single descriptor layout, so pointers for both."""
    K, N = 32, 16
    x, w = _rand(S, K, dtype=torch.float16, seed=0), _weights(len(OFFS), K, N, torch.float16, True)
    tw = _rand(1, K, N, dtype=torch.float16, seed=5)
    out = torch.empty(S, N, dtype=torch.float16, device=DEV)
    G.gmm(x, w, _offs(), out, tw=tw, slot=torch.tensor([-1, -1, -1, 0, -1], dtype=torch.int32, device=DEV))
    assert spy() == dict(A_TMA=True, W_TMA=False, W_KMAJOR=False, PAIR=False)
    _check(out, *_gmm_ref(x, w, _offs(), trainable_w=tw, trainable_ids=torch.tensor([3], device=DEV)))


def _glu_ref(x, w, offs, N):
    """act(gate) * up per row, gate/up rounded to x's dtype as the kernel stores them."""
    def run(x, w):
        h = grouped_mm_reference(x, w, offs)
        return torch.nn.functional.silu(h[:, :N]) * h[:, N:]
    return run(x.double(), w.double()), run(x, w)


@pytest.mark.parametrize("kmajor, N, want", [(True, 20, (True, True, True)), (False, 24, (True, False, False)),
                                             (False, 20, (False, False, False))],
                         ids=["kmajor-N20-paired", "nmajor-N24-two-tiles", "nmajor-N20-up-half-misaligned"])
def test_glu_gate_and_up_tiles(spy, kmajor, N, want):
    """The GLU reads the up half at column N. K-major weights (HF's gate_up) take both halves
    as one [BK, 2 BN] box of a 4-D descriptor (PAIR: one accumulator, split in the
    epilogue); N-major weights take two boxes of one descriptor, which needs the up half on
    a 16-byte boundary, else the weights go through pointers. N=20 is not a multiple of the
    16-wide tile: the gate box's columns past N must be zeros or masked, never up columns."""
    K = 32
    x, w = _rand(S, K, dtype=torch.float16, seed=0), _weights(len(OFFS), K, 2 * N, torch.float16, kmajor)
    out = torch.empty(S, N, dtype=torch.float16, device=DEV)
    h = torch.empty(S, 2 * N, dtype=torch.float16, device=DEV)
    G.gmm(x, w, _offs(), out, rows=torch.arange(S, dtype=torch.int32, device=DEV), glu_act=G.ACT_SILU, h=h)
    flags = spy()
    assert (flags["W_TMA"], flags["W_KMAJOR"], flags["PAIR"]) == want and not flags["A_TMA"]
    _check(out, *_glu_ref(x, w, _offs(), N))
    _check(h[:40], *(r[:40] for r in _gmm_ref(x, w, _offs())))  # h's tail rows are not written


def test_glu_paired_with_trainable_weights(spy):
    """PAIR through the per-tile descriptor (ESFT: gate_up of some experts in trainable_w)."""
    K, N, E = 40, 24, len(OFFS)
    x = _rand(S, K, dtype=torch.float16, seed=0)
    w, tw = _weights(E, K, 2 * N, torch.float16, True), _weights(2, K, 2 * N, torch.float16, True, seed=7)
    rows = torch.randint(0, S, (S,), generator=torch.Generator().manual_seed(2), dtype=torch.int32).to(DEV)
    out = torch.empty(S, N, dtype=torch.float16, device=DEV)
    slot = torch.tensor([-1, 1, -1, 0, -1], dtype=torch.int32, device=DEV)
    G.gmm(x, w, _offs(), out, rows=rows, tw=tw, slot=slot, glu_act=G.ACT_SILU)
    assert spy() == dict(A_TMA=False, W_TMA=True, W_KMAJOR=True, PAIR=True)
    merged = w.clone()
    merged[3], merged[1] = tw[0], tw[1]
    _check(out, *_glu_ref(x[rows.long()], merged, _offs(), N))


def _dw_ref(x, dy, offs, ids):
    bounds = [0] + offs.tolist()

    def run(x, dy):
        return torch.stack([x[bounds[e]:bounds[e + 1]].T @ dy[bounds[e]:bounds[e + 1]] for e in ids.tolist()])
    return run(x.double(), dy.double()), run(x, dy).to(x.dtype)


@pytest.mark.parametrize("dtype, K, N, want", [(torch.float16, 40, 24, (True, True)),
                                               (torch.float32, 20, 36, (True, True)),
                                               (torch.float16, 20, 24, (False, True)),
                                               (torch.float16, 24, 36, (True, False))],
                         ids=["fp16-K40-N24", "fp32-K20-N36", "fp16-K20-x-by-pointer", "fp16-N36-dy-by-pointer"])
def test_dw_neighbouring_groups_never_reach_a_dw(spy, dtype, K, N, want):
    """dW sums over an expert's rows: the boxes crossing its last row must read zeros, not
    the next expert's rows. Every other expert's rows are NaN here, so a single leaked row
    makes the dW NaN."""
    ids = torch.tensor([4, 0, 1], device=DEV)  # rows 29..39 (11: not a tile multiple), none, rows 0..4
    x, dy = _rand(S, K, dtype=dtype, seed=0), _rand(S, N, dtype=dtype, seed=1)
    mine = torch.zeros(S, dtype=torch.bool, device=DEV)
    mine[29:40] = mine[0:5] = True
    x[~mine], dy[~mine] = float("nan"), float("nan")
    dw = torch.full((3, K, N), float("nan"), dtype=dtype, device=DEV)
    G.gmm_dw(x, dy, _offs(), ids, dw)
    assert tuple(spy().values()) == want
    assert (dw[1] == 0).all(), "an empty group's dW is zero"
    _check(dw, *_dw_ref(x, dy, _offs(), ids))


def test_dw_gathered_rows_stay_pointer_loads(spy):
    K, N = 32, 24
    x = _rand(30, K, dtype=torch.float16, seed=0)
    rows = torch.randint(0, 30, (S,), generator=torch.Generator().manual_seed(2), dtype=torch.int32).to(DEV)
    dy = _rand(S, N, dtype=torch.float16, seed=1)
    ids = torch.tensor([0, 2, 3], device=DEV)
    dw = torch.empty(3, K, N, dtype=torch.float16, device=DEV)
    G.gmm_dw(x, dy, _offs(), ids, dw, x_rows=rows)
    assert spy() == dict(X_TMA=False, Y_TMA=True)
    _check(dw, *_dw_ref(x[rows.long()], dy, _offs(), ids))


def test_tma_capability_and_scratch_allocator(monkeypatch):
    """Outside the interpreter: CPU tensors never take descriptors, meta tensors (the compile
    report) do; the scratch allocator is installed only for the launch and never replaces
    one the caller set."""
    from triton.runtime import _allocation

    from fastdf.kernels import _device

    monkeypatch.setattr(_device, "INTERPRET", False)
    assert not _device.tma_capable("cpu") and _device.tma_capable("meta")
    assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    with _device.scratch_allocator():
        assert _allocation._allocator.get() is _device.scratch
    assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)

    def mine(size, alignment, stream):
        raise AssertionError("not called here")

    token = _allocation._allocator.set(mine)
    try:
        with _device.scratch_allocator():
            assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.reset(token)

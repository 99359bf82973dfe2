"""Bad input to fastdf.esft: every malformed call raises TypeError/ValueError naming the
argument (or the file and tensor) and leaves the model, and any checkpoint on disk, as it
was. Tiny random HF MoE models built from configs; nothing downloaded."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdf import esft
from fastdf.esft import state as esft_state
from fastdf.esft.stats import RoutingStats
from tests.hf_tiny import batch, tiny_model

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

WEIGHTS, SELECTION = esft_state.WEIGHTS_FILE, esft_state.SELECTION_FILE


def _snapshot(model):
    """Everything a failed call must not change: tensors, requires_grad, experts backend,
    ESFT flag, and the forward's output."""
    with torch.no_grad():
        logits = model(**batch(lengths=(5, 3), seed=11)).logits
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "impl": model.config._experts_implementation,
        "applied": esft.is_applied(model),
        "logits": logits,
    }


def _assert_unchanged(model, snap):
    now = _snapshot(model)
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k
    assert now["grad"] == snap["grad"]
    assert now["impl"] == snap["impl"] and now["applied"] == snap["applied"]
    assert torch.equal(now["logits"], snap["logits"])


# ---------------------------------------------------------------------------- apply

BAD_SELECTIONS = [
    ({1: "12"}, TypeError, r"selection\[1\] must be a list of expert ids.*'12'"),
    ({1: [1.7]}, TypeError, r"selection\[1\] has expert id 1\.7 of type float"),
    ({1: [True]}, TypeError, r"selection\[1\] has expert id True of type bool"),
    ({1: [np.float32(2.0)]}, TypeError, r"selection\[1\] has expert id"),
    ({1: None}, TypeError, r"selection\[1\] must be a list"),
    ({1: torch.tensor([1.0])}, TypeError, r"selection\[1\] must hold integer expert ids"),
    ({1: torch.tensor([[1]])}, ValueError, r"selection\[1\] must be a 1-D tensor"),
    ({1: [8]}, ValueError, r"selection\[1\] has expert ids outside \[0, 8\): \[8\]"),
    ({1: [-1]}, ValueError, r"selection\[1\] has expert ids outside \[0, 8\): \[-1\]"),
    ({1: [2, 2]}, ValueError, r"selection\[1\] lists an expert twice"),
    ({0: [1]}, ValueError, "decoder layer 0, which has no routed experts"),
    ({7: [1]}, ValueError, "decoder layer 7, which has no routed experts"),
    ({-1: [1]}, ValueError, "decoder layer -1, which has no routed experts"),
    ({1.0: [1]}, TypeError, "selection keys must be decoder-layer indices"),
    ({True: [1]}, TypeError, "selection keys must be decoder-layer indices"),
    ({"\u00b2": [1]}, TypeError, "selection keys must be decoder-layer indices"),  # isdigit() but not int()-able
    ({1: [1], "1": [2]}, ValueError, "names decoder layer 1 twice"),
    ({1: [], 2: []}, ValueError, "selects no expert"),
    ({}, ValueError, "selects no expert"),
    ([[1]], TypeError, "selection must be a dict"),
    ("1:2", TypeError, "selection must be a dict"),
]


def test_apply_refuses_bad_selections_and_changes_nothing():
    model = tiny_model("deepseek_v2")
    snap = _snapshot(model)
    for selection, err, msg in BAD_SELECTIONS:
        with pytest.raises(err, match=msg):
            esft.apply(model, selection)
        _assert_unchanged(model, snap)
    # Integer ids in any reasonable container still work (numpy ints, tensors, tuples, JSON keys).
    esft.apply(model, {1: torch.tensor([5, 1]), "2": (np.int64(0), 3)})
    assert model.model.layers[1].mlp.experts.esft_ids.tolist() == [1, 5]
    assert model.model.layers[2].mlp.experts.esft_ids.tolist() == [0, 3]


def test_apply_failing_midway_is_undone(monkeypatch):
    """An error after the model started changing (here: the second layer's buffer) rolls
    everything back, so a retry works."""
    model = tiny_model("deepseek_v2")
    snap = _snapshot(model)
    experts = model.model.layers[2].mlp.experts

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(experts, "register_buffer", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        esft.apply(model, {1: [0], 2: [1]})
    assert not hasattr(model.model.layers[1].mlp.experts, "esft_ids")
    monkeypatch.undo()
    _assert_unchanged(model, snap)
    esft.apply(model, {1: [0], 2: [1]})
    assert esft.is_applied(model)


# ---------------------------------------------------------------------------- select_experts


def test_select_experts_refuses_bad_knobs_and_stats():
    gate = torch.tensor([[0.02, 0.05, 0.03, 0.04], [0.25, 0.25, 0.3, 0.2]], dtype=torch.float64)
    stats = RoutingStats([3, 7], gate, gate.clone(), num_sequences=1, num_tokens=1)
    for p in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="p must be"):
            esft.select_experts(stats, "gate", p)
    for p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="p must be"):
            esft.select_experts(stats, "gate", p)
    for p in ("0.1", True, None):
        with pytest.raises(TypeError, match="p must be a number"):
            esft.select_experts(stats, "gate", p)
    with pytest.raises(TypeError, match="method must be a str"):
        esft.select_experts(stats, ["gate"], 0.1)
    with pytest.raises(ValueError, match="method must be 'gate' or 'token'"):
        esft.select_experts(stats, "Gate", 0.1)
    bad = [
        (RoutingStats([3, 7], gate.clone().fill_(math.nan), gate, 1, 1), ValueError, "gate_scores must be finite"),
        (RoutingStats([3, 7], -gate, gate, 1, 1), ValueError, "non-negative"),
        (RoutingStats([3], gate, gate, 1, 1), ValueError, r"stats.gate_scores must have shape \(1, '\*'\)"),
        (RoutingStats([3, 3], gate, gate, 1, 1), ValueError, "lists a decoder layer twice"),
        (RoutingStats(["3", 7], gate, gate, 1, 1), TypeError, "stats.layers must be a list"),
        (RoutingStats([3, 7], gate[0], gate, 1, 1), ValueError, "stats.gate_scores must have 2 dims"),
        (RoutingStats([3, 7], gate.long(), gate, 1, 1), ValueError, "gate_scores must be a float tensor"),
        (RoutingStats([3, 7], gate.tolist(), gate, 1, 1), TypeError, "stats.gate_scores must be a torch.Tensor"),
    ]
    for s, err, msg in bad:
        with pytest.raises(err, match=msg):
            esft.select_experts(s, "gate", 0.1)
    assert esft.select_experts(stats, "gate", 1) == {3: [0, 1, 2, 3], 7: [0, 1, 2, 3]}  # p = 1 (int) is valid


# ---------------------------------------------------------------------------- collect_routing_stats


def test_collect_routing_stats_refuses_bad_batches():
    model = tiny_model("olmoe")  # vocab 97
    good = batch(lengths=(5, 3))
    ids, mask = good["input_ids"], good["attention_mask"]
    shape_msg = r"batches\[1\]\['attention_mask'\] must have shape"
    cases = [
        ({"input_ids": ids.float(), "attention_mask": mask}, ValueError, r"batches\[1\]\['input_ids'\] must hold integer"),
        ({"input_ids": ids.bool()}, ValueError, r"batches\[1\]\['input_ids'\] must hold integer"),
        ({"input_ids": ids.clone().fill_(97)}, ValueError, r"batches\[1\]\['input_ids'\] .*outside .*\[0, 97\)"),
        ({"input_ids": ids - 5}, ValueError, r"batches\[1\]\['input_ids'\] .*outside"),
        ({"input_ids": ids[None]}, ValueError, r"batches\[1\]\['input_ids'\] must have 1 or 2 dims"),
        ({"input_ids": ids[:, :0]}, ValueError, r"batches\[1\]\['input_ids'\] is empty"),
        ({"input_ids": ids.to("meta")}, ValueError, r"batches\[1\]\['input_ids'\] is on the meta device"),
        ({"input_ids": ids.tolist()}, TypeError, r"batches\[1\]\['input_ids'\] must be a torch.Tensor"),
        ({"attention_mask": mask}, ValueError, r"batches\[1\] needs input_ids"),
        ({"input_ids": ids, "attention_mask": mask[:, :-1]}, ValueError, shape_msg),
        ({"input_ids": ids, "attention_mask": mask[0]}, ValueError, shape_msg),
        ({"input_ids": ids, "attention_mask": mask * 2}, ValueError, r"batches\[1\]\['attention_mask'\] must hold only 0"),
        ({"input_ids": ids, "attention_mask": "all"}, TypeError, r"batches\[1\]\['attention_mask'\] must be a torch"),
        (ids, TypeError, r"batches\[1\] must be a dict"),
    ]
    for bad, err, msg in cases:
        model.train()
        with pytest.raises(err, match=msg):
            esft.collect_routing_stats(model, [good, bad], progress=False)
        assert model.training, "collect_routing_stats must restore train/eval mode after an error"
        assert not any(m._forward_hooks for m in model.modules()), "hooks left behind"
    with pytest.raises(TypeError, match="got a single dict"):
        esft.collect_routing_stats(model, good, progress=False)
    with pytest.raises(TypeError, match="batches must be an iterable"):
        esft.collect_routing_stats(model, 5, progress=False)
    with pytest.raises(TypeError, match="progress must be a bool"):
        esft.collect_routing_stats(model, [good], progress="no")
    # Valid variants agree: int32 ids, bool mask, a generator of batches.
    want = esft.collect_routing_stats(model, [good], progress=False)
    got = esft.collect_routing_stats(model, (b for b in [{"input_ids": ids.int(), "attention_mask": mask.bool()}]),
                                     progress=False)
    torch.testing.assert_close(got.gate_scores, want.gate_scores, rtol=0, atol=0)
    torch.testing.assert_close(got.token_ratios, want.token_ratios, rtol=0, atol=0)


# ---------------------------------------------------------------------------- save


def _trained_model(seed=0, selection=None):
    model = esft.apply(tiny_model("deepseek_v2"), selection or {1: [3], 2: [1, 5]})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # stands in for training: the selected experts differ from the base
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _files(d):
    return {p.name: p.read_bytes() for p in Path(d).iterdir()}


def _logits(model):
    with torch.no_grad():
        return model(**batch(lengths=(5, 3), seed=11)).logits


def test_save_refuses_existing_checkpoint_unless_overwrite(tmp_path):
    first, second = _trained_model(0), _trained_model(1, {2: [0, 7]})
    path = esft.save(first, tmp_path)
    with safetensors_torch.safe_open(str(path), "pt") as f:
        sums = json.loads(f.metadata()["sha256"])
    assert sorted(sums) == sorted(f"layers.{i}.{k}" for i in (1, 2) for k in ("expert_ids", "gate_up", "down"))
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="already holds an ESFT checkpoint.*overwrite=True"):
        esft.save(second, tmp_path)
    assert _files(tmp_path) == before
    (tmp_path / WEIGHTS).unlink()  # a lone selection file (e.g. from a crash) is a checkpoint too
    with pytest.raises(ValueError, match=f"already holds an ESFT checkpoint \\({SELECTION}\\)"):
        esft.save(second, tmp_path)
    esft.save(first, tmp_path, overwrite=True)
    assert torch.equal(_logits(esft.load(tiny_model("deepseek_v2"), tmp_path)), _logits(first))
    esft.save(second, tmp_path, overwrite=True)
    assert sorted(_files(tmp_path)) == sorted([WEIGHTS, SELECTION])  # no temporaries left
    assert json.loads((tmp_path / SELECTION).read_text())["selection"] == {"2": [0, 7]}
    loaded = esft.load(tiny_model("deepseek_v2"), tmp_path)
    assert torch.equal(_logits(loaded), _logits(second))

    with pytest.raises(TypeError, match="overwrite must be a bool"):
        esft.save(second, tmp_path, overwrite=1)
    with pytest.raises(TypeError, match="directory must be a str or os.PathLike"):
        esft.save(second, 5)
    with pytest.raises(ValueError, match="is not a directory"):
        esft.save(second, tmp_path / WEIGHTS, overwrite=True)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        esft.save(None, tmp_path)


def test_save_writes_on_rank0_only(tmp_path, monkeypatch):
    """DDP-style (plain tensors): a rank other than 0 returns the path and writes nothing,
    without any collective, so `if rank == 0: save(...)` code does not hang either."""
    monkeypatch.setattr(esft_state, "_rank", lambda: 1)
    assert esft.save(_trained_model(0), tmp_path / "out") == tmp_path / "out" / WEIGHTS
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("crash_at", ["weights", "selection", "first_replace", "second_replace"])
def test_save_crash_leaves_old_checkpoint_intact(tmp_path, monkeypatch, crash_at):
    old, new = _trained_model(0), _trained_model(1, {1: [0, 2]})
    esft.save(old, tmp_path)
    before = _files(tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if crash_at == "weights":
        real = safetensors_torch.save_file

        def partial(tensors, filename, metadata=None):  # writes half a file, then fails
            real(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(Path(filename).read_bytes()[:100])
            crash()

        monkeypatch.setattr(safetensors_torch, "save_file", partial)
    elif crash_at == "selection":
        real_dumps = json.dumps  # the selection file is the only JSON written with indent

        def dumps(obj, **kwargs):
            return crash() if kwargs.get("indent") else real_dumps(obj, **kwargs)

        monkeypatch.setattr(esft_state.json, "dumps", dumps)
    else:
        real_replace, calls = os.replace, []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == (1 if crash_at == "first_replace" else 2):
                crash()
            real_replace(src, dst)

        monkeypatch.setattr(esft_state.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        esft.save(new, tmp_path, overwrite=True)
    monkeypatch.undo()
    after = _files(tmp_path)
    assert sorted(after) == sorted(before), f"temporaries left behind: {sorted(after)}"
    # The weights file (the one load reads) is the old one until the final rename.
    assert after[WEIGHTS] == before[WEIGHTS]
    loaded = esft.load(tiny_model("deepseek_v2"), tmp_path)
    assert torch.equal(_logits(loaded), _logits(old))


# ---------------------------------------------------------------------------- load


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    model = _trained_model(0)
    d = tmp_path_factory.mktemp("good")
    esft.save(model, d)
    return d, _logits(model)


def _rewrite(src, dst, edit_tensors=None, edit_meta=None, checksums=True):
    """A copy of checkpoint ``src`` in ``dst`` with tensors/metadata edited; checksums are
    recomputed for the edited tensors unless ``checksums`` is False (then dropped)."""
    from safetensors import safe_open

    with safe_open(str(Path(src) / WEIGHTS), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    meta["sha256"] = json.dumps({k: esft_state._sha256(t) for k, t in tensors.items()})
    if not checksums:
        del meta["sha256"]
    if edit_meta:
        edit_meta(meta)
    dst.mkdir(exist_ok=True)
    safetensors_torch.save_file(tensors, str(dst / WEIGHTS), metadata=meta)
    return dst


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's data (layers.2.gate_up, by name order)
    path.write_bytes(bytes(data))


def _sel(meta, value):
    meta["selection"] = value


BAD_CHECKPOINTS = {
    "missing tensor": (dict(edit_tensors=lambda t: t.pop("layers.2.down")), r"tensor 'layers.2.down' is missing"),
    "extra tensor": (dict(edit_tensors=lambda t: t.update({"layers.3.down": t["layers.2.down"].clone()})),
                     r"unexpected tensor 'layers.3.down'"),
    "wrong shape": (dict(edit_tensors=lambda t: t.update({"layers.1.gate_up": t["layers.1.gate_up"][:, :-1]})),
                    r"tensor 'layers.1.gate_up' has shape \(1, 31, 32\).*\(1, 32, 32\)"),
    "int32 gate_up": (dict(edit_tensors=lambda t: t.update({"layers.1.gate_up": t["layers.1.gate_up"].int()})),
                      r"tensor 'layers.1.gate_up' has dtype int32.*refused, not cast"),
    "float64 down": (dict(edit_tensors=lambda t: t.update({"layers.2.down": t["layers.2.down"].double()})),
                     r"tensor 'layers.2.down' has dtype float64"),
    "nan weights": (dict(edit_tensors=lambda t: t["layers.2.down"].view(-1).__setitem__(3, math.nan)),
                    r"tensor 'layers.2.down' holds NaN"),
    "ids disagree": (dict(edit_tensors=lambda t: t.update({"layers.2.expert_ids": torch.tensor([1, 6])})),
                     r"tensor 'layers.2.expert_ids'.*disagrees with the metadata's selection \[1, 5\]"),
    "no selection": (dict(edit_meta=lambda m: m.pop("selection")), "metadata has no 'selection'"),
    "bad json": (dict(edit_meta=lambda m: _sel(m, '{"1": [3')), "'selection' is not valid JSON"),
    "selection not a dict": (dict(edit_meta=lambda m: _sel(m, "[3]")), "'selection' does not fit.*must be a dict"),
    "string ids": (dict(edit_meta=lambda m: _sel(m, '{"1": "3", "2": [1, 5]}')), r"does not fit.*selection\[1\]"),
    "unknown layer": (dict(edit_meta=lambda m: _sel(m, '{"0": [3], "2": [1, 5]}')), "does not fit.*decoder layer 0"),
    "other model type": (dict(edit_meta=lambda m: m.update({"model_type": "olmoe"})),
                         "saved from a 'olmoe' model; this model is 'deepseek_v2'"),
    "wrong format": (dict(edit_meta=lambda m: m.update({"format": "other"})), "is not a fastdf.esft checkpoint"),
    "bad checksum json": (dict(edit_meta=lambda m: m.update({"sha256": "{"})), "'sha256' is not valid JSON"),
    "checksum list short": (dict(edit_meta=lambda m: m.update({"sha256": json.dumps({"layers.1.down": "0"})})),
                            "'sha256' does not list exactly the stored tensors"),
    "flipped byte": ("flip", r"tensor 'layers.2.gate_up' does not match its sha256"),
    "truncated": ("truncate", "cannot read"),
    "garbage": ("garbage", "cannot read it as safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_failed_load_leaves_model_exactly_as_it_was(tmp_path, good_checkpoint, case):
    good, want = good_checkpoint
    how, msg = BAD_CHECKPOINTS[case]
    bad = tmp_path / "bad"
    if isinstance(how, dict):
        _rewrite(good, bad, **how)
    else:
        bad.mkdir()
        data = (good / WEIGHTS).read_bytes()
        (bad / WEIGHTS).write_bytes({"flip": data, "truncate": data[:len(data) * 2 // 3],
                                     "garbage": os.urandom(len(data))}[how])
        if how == "flip":
            _flip_byte(bad / WEIGHTS)
    model = tiny_model("deepseek_v2")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=msg) as info:
        esft.load(model, bad)
    assert str(bad / WEIGHTS) in str(info.value), "the error must name the file"
    _assert_unchanged(model, snap)
    esft.load(model, good)  # a retry with a good checkpoint works
    assert torch.equal(_logits(model), want)


def test_load_rollback_and_old_checkpoints(tmp_path, good_checkpoint, monkeypatch):
    good, want = good_checkpoint
    # A checkpoint from before checksums loads.
    old = _rewrite(good, tmp_path / "old", checksums=False)
    assert torch.equal(_logits(esft.load(tiny_model("deepseek_v2"), old)), want)
    # A failure while installing (after every check passed) is undone too.
    model = tiny_model("deepseek_v2")
    snap = _snapshot(model)
    monkeypatch.setattr(model.model.layers[2].mlp.experts, "register_buffer",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("simulated")))
    with pytest.raises(RuntimeError, match="simulated"):
        esft.load(model, good)
    monkeypatch.undo()
    _assert_unchanged(model, snap)
    esft.load(model, good)
    assert torch.equal(_logits(model), want)
    # Loading onto a model that already carries ESFT state is refused before reading anything.
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already carries ESFT state"):
        esft.load(model, good)
    _assert_unchanged(model, snap)
    with pytest.raises(TypeError, match="directory must be a str"):
        esft.load(tiny_model("deepseek_v2"), None)
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        esft.load(tiny_model("deepseek_v2"), tmp_path / "nowhere")


def test_save_gathers_fsdp2_shards_and_only_rank0_writes(tmp_path, monkeypatch):
    """FSDP2 turns the trainable experts into DTensors: save gathers them (one-rank gloo
    group here; the collective path is the same) and the checkpoint loads bit-exact.
    Ranks other than 0 write nothing."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _trained_model(0)
    want = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert isinstance(model.model.layers[1].mlp.experts.esft_gate_up, DTensor)
        esft.save(model, tmp_path / "ckpt")
        monkeypatch.setattr(esft_state, "_rank", lambda: 1)
        assert esft.save(model, tmp_path / "rank1") == tmp_path / "rank1" / WEIGHTS
        assert not (tmp_path / "rank1").exists()
    finally:
        dist.destroy_process_group()
    loaded = esft.load(tiny_model("deepseek_v2"), tmp_path / "ckpt")
    got = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)

"""Rank bodies for test_fsdp.py (spawned on gloo CPU ranks by tests/distributed/_spawn.py).

Every check compares the sharded run against one process on the same global batch, which
each rank recomputes itself (cheap at these sizes): no rank needs another's reference."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

# Lowest trainable layer 1: layer 0 (and the embedding) must see no autograd at all.
SELECTIONS = {"deepseek_v2": {1: [0, 5], 2: [3]}, "qwen2_moe": {1: [2], 2: [0, 4]}}
# Four rows, two per rank, each rank with the same number of real tokens, so the mean of the
# ranks' mean losses is the global mean loss (what FSDP's averaged gradients follow).
LENGTHS = (9, 6, 8, 7)


def _labels(b):
    return b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)


def _loss(model, b):
    return model(**b, labels=_labels(b)).loss


def _rows(b, rank, world):
    per = b["input_ids"].shape[0] // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in b.items()}


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard(model, mp_policy=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kw = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _mean_over_ranks(x):
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _close(got, want, name, atol=2e-6, rtol=1e-5):
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _assert_same_checkpoint(a, b):
    """Same tensors bit for bit, same metadata, same selection file. (Not the same bytes:
    safetensors writes its metadata map in a random order, from a Rust HashMap.)"""
    from safetensors import safe_open

    from fastdf.esft.state import SELECTION_FILE, WEIGHTS_FILE

    assert (a / SELECTION_FILE).read_bytes() == (b / SELECTION_FILE).read_bytes()
    with safe_open(str(a / WEIGHTS_FILE), "pt") as fa, safe_open(str(b / WEIGHTS_FILE), "pt") as fb:
        assert fa.metadata() == fb.metadata(), (fa.metadata(), fb.metadata())
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), k


def esft_fsdp(rank, world, tmp, families):
    import pytest

    from fastdf import esft
    from tests.hf_tiny import batch, tiny_model

    tmp = Path(tmp)
    for family in families:
        sel = SELECTIONS[family]
        glob = batch(lengths=LENGTHS, seed=3)
        local = _rows(glob, rank, world)

        # --- one process, global batch: the reference
        ref = esft.apply(tiny_model(family), sel)
        esft.save(ref, tmp / family / "single")  # inside the group: only rank 0 writes
        ref_loss = _loss(ref, glob)
        ref_loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        trainable = {n for n, p in ref.named_parameters() if p.requires_grad}
        assert trainable and set(ref_grads) == trainable and all(".esft_" in n for n in trainable), ref_grads.keys()
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        ref_opt.step()

        # --- FSDP2: apply, then fully_shard per decoder layer and on the root
        model = _shard(esft.apply(tiny_model(family), sel))
        from torch.distributed.tensor import DTensor

        experts = model.model.layers[2].mlp.experts
        assert isinstance(experts.esft_gate_up, DTensor) and isinstance(experts.gate_up_proj, DTensor)
        assert not experts.gate_up_proj.requires_grad
        # Untrained weights: the sharded save writes the very bytes one process writes.
        esft.save(model, tmp / family / "fsdp")
        dist.barrier()
        _assert_same_checkpoint(tmp / family / "single", tmp / family / "fsdp")
        # Every rank saw the rank-0 file only after the barrier: no rank writes its own copy.
        assert sorted(p.name for p in (tmp / family / "fsdp").iterdir()) == sorted(
            [esft.state.WEIGHTS_FILE, esft.state.SELECTION_FILE])

        # Rank 0 refuses to overwrite; every rank hears of it and raises (none is left waiting).
        with pytest.raises(ValueError, match="already holds an ESFT checkpoint"):
            esft.save(model, tmp / family / "fsdp")
        path = esft.save(model, tmp / family / "fsdp", overwrite=True)
        assert path == tmp / family / "fsdp" / esft.state.WEIGHTS_FILE
        dist.barrier()
        _assert_same_checkpoint(tmp / family / "single", tmp / family / "fsdp")

        # Autograd must stop below the lowest trainable layer (1): layer 0's output and the
        # input of layer 1 carry no graph, also with the FSDP hooks in place.
        seen = []
        hook = model.model.layers[0].register_forward_hook(lambda m, i, o: seen.append(
            (o[0] if isinstance(o, tuple) else o).requires_grad))
        loss = _loss(model, local)
        hook.remove()
        assert seen == [False], f"{family}: layer 0 output requires grad under FSDP: {seen}"
        _close(_mean_over_ranks(loss), ref_loss.detach(), f"{family} loss")
        loss.backward()
        for n, p in model.named_parameters():
            if n in trainable:
                assert p.grad is not None, f"{family}: {n} got no gradient"
                _close(_full(p.grad), ref_grads[n], f"{family} grad {n}")
                assert _full(p.grad).abs().sum() > 0, n
            else:
                assert p.grad is None, f"{family}: frozen {n} got a gradient buffer"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all parameters offered on purpose
        opt.step()
        stated = {n for n, p in model.named_parameters() if p in opt.state}
        assert stated == trainable, f"{family}: optimizer state for {sorted(stated ^ trainable)}"
        ref_params = dict(ref.named_parameters())
        for n in sorted(trainable):  # the same order on every rank: full_tensor is a collective
            _close(_full(dict(model.named_parameters())[n]).detach(), ref_params[n].detach(), f"{family} step {n}")

        # Trained weights: same checkpoint content (the values agree to rounding, not bits).
        esft.save(ref, tmp / family / "single_step")
        esft.save(model, tmp / family / "fsdp_step")
        dist.barrier()
        from safetensors.torch import load_file

        a = load_file(str(tmp / family / "single_step" / esft.state.WEIGHTS_FILE))
        b = load_file(str(tmp / family / "fsdp_step" / esft.state.WEIGHTS_FILE))
        assert a.keys() == b.keys()
        for k in a:
            _close(b[k], a[k], f"{family} saved {k}")

        # esft.load onto a fresh base model, then shard: runs as the trained reference.
        loaded = _shard(esft.load(tiny_model(family), tmp / family / "fsdp_step"))
        with torch.no_grad():
            _close(loaded(**local).logits, ref(**local).logits, f"{family} logits after load", atol=1e-5)
        # After sharding, apply/load/merge would create or write unsharded weights FSDP does
        # not manage (gradients never reduced): refused.
        with pytest.raises(ValueError, match="fully_shard"):
            esft.load(_shard(tiny_model(family)), tmp / family / "fsdp_step")
        with pytest.raises(ValueError, match="fully_shard"):
            esft.merge(model)

        # esft.merge on a gathered copy: the full state dict into an unsharded twin.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            twin = esft.apply(tiny_model(family), sel)
            twin.load_state_dict(full)
            esft.merge(twin)
            esft.merge(ref)
            want = dict(ref.named_parameters())
            for n, p in twin.named_parameters():
                _close(p.detach(), want[n].detach(), f"{family} merged {n}")
        del model, loaded, opt
        dist.barrier()


def esft_fsdp_bf16(rank, world, family):
    """MixedPrecisionPolicy(param_dtype=bf16) with the fastdf experts backend: the experts run
    in bf16 (the gradients reduce in fp32 into fp32 shards) and agree with fp32 to bf16 rounding."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from fastdf import esft
    from tests.hf_tiny import batch, tiny_model

    sel = SELECTIONS[family]
    glob = batch(lengths=LENGTHS, seed=3)
    ref = esft.apply(tiny_model(family), sel)
    ref_loss = _loss(ref, glob)
    ref_loss.backward()
    model = _shard(esft.apply(tiny_model(family), sel),
                   MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    dtypes = []
    experts = model.model.layers[1].mlp.experts
    hook = experts.register_forward_hook(lambda m, i, o: dtypes.append((m.esft_gate_up.dtype, o.dtype)))
    loss = _loss(model, _rows(glob, rank, world))
    hook.remove()
    assert dtypes == [(torch.bfloat16, torch.bfloat16)], dtypes
    _close(_mean_over_ranks(loss.float()), ref_loss.detach(), f"{family} bf16 loss", atol=2e-2, rtol=2e-2)
    loss.backward()
    for n, p in ref.named_parameters():
        if p.grad is None:
            continue
        got = _full(dict(model.named_parameters())[n].grad)
        assert got.dtype == torch.float32, (n, got.dtype)
        err = (got - p.grad).norm() / p.grad.norm()
        assert err < 5e-2, f"{family} bf16 grad {n}: relative error {err:.3g}"




def df_fsdp(rank, world, compile_backend="aot_eager"):
    """DFTransformer + training_step (independent per-frame levels) under fully_shard per
    block + root: loss and gradients equal one process on the global batch; then the sharded
    model under torch.compile gives the same loss (fastdf's custom ops see local tensors)."""
    from fastdf.diffusion_forcing import NoiseSchedule, sample_training_levels, training_step
    from fastdf.models import DFTransformer

    def build():
        torch.manual_seed(0)
        model = DFTransformer((2, 4, 4), dim=32, depth=2, num_heads=2, patch_size=2, level_dim=16)
        with torch.no_grad():  # AdaLN-Zero starts at zero: random weights so every gradient is nonzero
            for p in model.parameters():
                p.add_(torch.randn(p.shape) * 0.05)
        return model

    g = torch.Generator().manual_seed(7)
    B, F = 2 * world, 3
    x0 = torch.randn(B, F, 2, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sched = NoiseSchedule("cosine", steps=100)
    levels = sample_training_levels(B, F, sched.steps, "independent", generator=g)
    assert (levels != levels[:, :1]).any(), "independent levels should differ across frames"

    ref = build()
    ref_loss = training_step(ref, x0, sched, levels=levels, noise=noise)
    ref_loss.backward()

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = build()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    rows = slice(rank * 2, rank * 2 + 2)
    loss = training_step(model, x0[rows], sched, levels=levels[rows], noise=noise[rows])
    _close(_mean_over_ranks(loss), ref_loss.detach(), "df loss")
    loss.backward()
    want = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert p.grad is not None, f"df: {n} got no gradient"
        _close(_full(p.grad), want[n].grad, f"df grad {n}", atol=1e-5)
        assert want[n].grad.abs().sum() > 0, n
    if compile_backend:
        compiled = torch.compile(model, backend=compile_backend)
        with torch.no_grad():
            got = training_step(compiled, x0[rows], sched, levels=levels[rows], noise=noise[rows])
        _close(_mean_over_ranks(got), ref_loss.detach(), "df compiled loss")


def all_checks(rank, world, tmp):
    """Everything test_fsdp.py checks, in one spawned group (start-up dominates)."""
    esft_fsdp(rank, world, tmp, ("deepseek_v2", "qwen2_moe"))
    esft_fsdp_bf16(rank, world, "deepseek_v2")
    df_fsdp(rank, world)

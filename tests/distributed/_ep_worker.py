"""Rank bodies for test_expert_parallel.py: expert-parallel moe_experts_ep against one
process running fastdf.moe_experts on every rank's tokens with all the experts."""

from __future__ import annotations

import torch
import torch.distributed as dist

E, H, I, K = 8, 16, 12, 2


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g) * 0.2, torch.randn(E, H, I, generator=g) * 0.2


def _tokens(world, case, seed):
    """Per-rank (hidden, topk_ids, topk_weights, probe) for every rank (all ranks build all)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        T = {"uniform": 7, "skewed": 9, "empty_rank": 0 if r == world - 1 else 6}[case] + r
        hidden = torch.randn(T, H, generator=g)
        if case == "skewed":  # everything to the first rank's experts: the others receive nothing
            ids = torch.stack([torch.randperm(E // world, generator=g)[:K] for _ in range(T)]) if T else \
                torch.empty(0, K, dtype=torch.int64)
        else:
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
                torch.empty(0, K, dtype=torch.int64)
        w = torch.rand(T, K, generator=g) + 0.1
        out.append((hidden, ids, w, torch.randn(T, H, generator=g)))
    return out


def _close(got, want, name):
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def check(rank, world, tmp, cases=("uniform", "skewed", "empty_rank")):
    import fastdf
    from fastdf.integrations.expert_parallel import expert_range, local_trainable, moe_experts_ep

    mine = expert_range(E)
    for case in cases:
        for esft, frozen_in in ((False, False), (True, False), (True, True)):
            # frozen_in: ESFT above frozen layers, nothing but the trainable experts needs a
            # gradient; ranks holding none of them must still join the backward exchange.
            tag = f"{case} world={world} esft={esft} frozen_inputs={frozen_in} rank={rank}"
            gate_up, down = _weights(1)
            tokens = _tokens(world, case, seed=2)
            tids = torch.tensor([1, 2, 3]) if esft else None  # held by the first ranks only

            # One process, every rank's tokens, all experts.
            hidden = torch.cat([t[0] for t in tokens]).requires_grad_()
            w = torch.cat([t[2] for t in tokens]).requires_grad_()
            ids = torch.cat([t[1] for t in tokens])
            probe = torch.cat([t[3] for t in tokens])
            if esft:
                tgu, tdn = gate_up[tids].clone().requires_grad_(), down[tids].clone().requires_grad_()
                ref = fastdf.moe_experts(hidden, ids, w, gate_up, down, trainable_ids=tids, trainable_gate_up=tgu,
                                         trainable_down=tdn)
                want_w = (tgu, tdn)
            else:
                gu, dn = gate_up.clone().requires_grad_(), down.clone().requires_grad_()
                ref = fastdf.moe_experts(hidden, ids, w, gu, dn)
                want_w = (gu, dn)
            (ref * probe).sum().backward()

            # This rank: its own tokens, its slice of the experts.
            start = sum(t[0].shape[0] for t in tokens[:rank])
            h, i, wt, p = tokens[rank]
            h, wt = h.clone().requires_grad_(not frozen_in), wt.clone().requires_grad_(not frozen_in)
            lgu, ldn = gate_up[mine.start:mine.stop].clone(), down[mine.start:mine.stop].clone()
            if esft:
                pos, lids = local_trainable(tids, E)
                ltgu, ltdn = tgu.detach()[pos].clone().requires_grad_(), tdn.detach()[pos].clone().requires_grad_()
                if pos.numel() == 0 and frozen_in:
                    # This rank trains nothing and its output needs no gradient here: only
                    # the backward exchange anchor makes it serve the other ranks' backward.
                    out = moe_experts_ep(h, i, wt, lgu, ldn, num_experts=E)
                    got_w = want_slices = ()
                else:
                    out = moe_experts_ep(h, i, wt, lgu, ldn, num_experts=E, trainable_ids=lids,
                                         trainable_gate_up=ltgu, trainable_down=ltdn)
                    got_w, want_slices = (ltgu, ltdn), (want_w[0].grad[pos], want_w[1].grad[pos])
            else:
                lgu.requires_grad_(), ldn.requires_grad_()
                out = moe_experts_ep(h, i, wt, lgu, ldn, num_experts=E)
                got_w = (lgu, ldn)
                want_slices = tuple(x.grad[mine.start:mine.stop] for x in want_w)
            rows = slice(start, start + h.shape[0])
            _close(out, ref.detach()[rows], f"{tag} out")
            loss = (out * p).sum()
            assert loss.requires_grad, f"{tag}: the output must stay in the graph (backward exchange)"
            loss.backward()
            if frozen_in:
                assert h.grad is None and wt.grad is None
            else:
                _close(h.grad, hidden.grad[rows], f"{tag} d hidden")
                _close(wt.grad, w.grad[rows], f"{tag} d topk_weights")
            for name, got, want in zip(("gate_up", "down"), got_w, want_slices):
                _close(got.grad, want, f"{tag} d {name}")
            if esft:
                assert lgu.grad is None and ldn.grad is None, f"{tag}: frozen experts got gradients"
            if case == "skewed" and rank > 0 and got_w:
                assert all(x.grad.abs().sum() == 0 for x in got_w), f"{tag}: no token came, yet nonzero gradients"

    # No gradient anywhere (inference under no_grad): forward only, still equal.
    gate_up, down = _weights(1)
    tokens = _tokens(world, "uniform", seed=5)
    with torch.no_grad():
        ref = fastdf.moe_experts(torch.cat([t[0] for t in tokens]), torch.cat([t[1] for t in tokens]),
                                 torch.cat([t[2] for t in tokens]), gate_up, down)
        h, i, wt, _ = tokens[rank]
        out = moe_experts_ep(h, i, wt, gate_up[mine.start:mine.stop], down[mine.start:mine.stop], num_experts=E)
    start = sum(t[0].shape[0] for t in tokens[:rank])
    _close(out, ref[start:start + h.shape[0]], f"no_grad world={world} rank={rank}")
    dist.barrier()
    _bad_input(h, i, wt, gate_up[mine.start:mine.stop], down[mine.start:mine.stop])

    # bf16 (what mixed precision feeds the experts): the exchange carries bf16 rows, the
    # result matches one process in bf16 to bf16 rounding, gradients included.
    bf = torch.bfloat16
    hb = torch.cat([t[0] for t in tokens]).to(bf).requires_grad_()
    ref = fastdf.moe_experts(hb, torch.cat([t[1] for t in tokens]), torch.cat([t[2] for t in tokens]),
                             gate_up.to(bf), down.to(bf))
    ref.float().sum().backward()
    hl = tokens[rank][0].to(bf).requires_grad_()
    out = moe_experts_ep(hl, i, wt, gate_up[mine.start:mine.stop].to(bf), down[mine.start:mine.stop].to(bf),
                         num_experts=E)
    out.float().sum().backward()
    assert out.dtype == bf and hl.grad.dtype == bf
    rows = slice(start, start + h.shape[0])
    torch.testing.assert_close(out.float(), ref.detach()[rows].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(hl.grad.float(), hb.grad[rows].float(), atol=2e-2, rtol=2e-2)
    if world == 2:  # the HF model check shares this group (start-up is the slow part)
        check_hf(rank, world)
        check_hf_esft(rank, world, tmp)


def check_hf(rank, world, family="qwen2_moe"):
    """shard_experts on a tiny HF model: logits equal the unsharded model's, the expert
    slices' gradients equal the full model's slices (every rank's tokens reach them), the
    replicated weights' gradients summed over ranks equal the full model's."""
    import pytest

    import fastdf.integrations.hf_experts  # noqa: F401  (registers "fastdf")
    from fastdf.integrations.expert_parallel import expert_range, shard_experts
    from tests.hf_tiny import batch, tiny_model

    glob = batch(lengths=(9, 6, 8, 7), seed=4)
    labels = glob["input_ids"].masked_fill(glob["attention_mask"] == 0, -100)
    ref = tiny_model(family)
    ref.set_experts_implementation("fastdf")
    per = glob["input_ids"].shape[0] // world
    # Sum of the per-rank mean losses: what the ranks' gradients add up to.
    ref_logits, ref_loss = [], 0
    for r in range(world):
        rows = slice(r * per, (r + 1) * per)
        out = ref(input_ids=glob["input_ids"][rows], attention_mask=glob["attention_mask"][rows],
                  labels=labels[rows])
        ref_logits.append(out.logits.detach())
        ref_loss = ref_loss + out.loss
    ref_loss.backward()

    model = shard_experts(tiny_model(family))
    rows = slice(rank * per, (rank + 1) * per)
    out = model(input_ids=glob["input_ids"][rows], attention_mask=glob["attention_mask"][rows], labels=labels[rows])
    _close(out.logits, ref_logits[rank], f"hf logits rank={rank}")
    out.loss.backward()
    want = dict(ref.named_parameters())
    n_experts = 0
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            mine = expert_range(want[name].shape[0])
            assert p.shape[0] == len(mine), (name, p.shape)
            _close(p.detach(), want[name].detach()[mine.start:mine.stop], f"hf slice {name}")
            _close(p.grad, want[name].grad[mine.start:mine.stop], f"hf grad {name} rank={rank}")
            n_experts += 1
        elif want[name].grad is not None:
            g = p.grad.clone()
            dist.all_reduce(g)
            _close(g, want[name].grad, f"hf grad {name} rank={rank}")
    assert n_experts == 2 * ref.config.num_hidden_layers
    with pytest.raises(ValueError, match="already sharded"):
        shard_experts(model)


def _bad_input(h, i, wt, gu, dn):
    """Refused before any exchange, on every rank alike (so no rank is left waiting)."""
    import pytest

    from fastdf.integrations.expert_parallel import expert_range, local_trainable, moe_experts_ep

    with pytest.raises(ValueError, match="num_experts"):
        moe_experts_ep(h, i, wt, gu, dn, num_experts=E + 1)
    with pytest.raises(TypeError, match="num_experts"):
        moe_experts_ep(h, i, wt, gu, dn, num_experts=float(E))
    with pytest.raises(ValueError, match="gate_up holds"):
        moe_experts_ep(h, i, wt, gu[:1], dn[:1], num_experts=E)
    with pytest.raises(ValueError, match="topk_ids"):
        moe_experts_ep(h, torch.full_like(i, E), wt, gu, dn, num_experts=E)
    with pytest.raises(ValueError, match="topk_weights"):
        moe_experts_ep(h, i, wt[:, :1], gu, dn, num_experts=E)
    with pytest.raises(ValueError, match="hidden"):
        moe_experts_ep(h.long(), i, wt, gu, dn, num_experts=E)
    with pytest.raises(ValueError, match="trainable_ids"):
        local_trainable(torch.tensor([E]), E)
    with pytest.raises(ValueError, match="down"):
        moe_experts_ep(h, i, wt, gu, dn[:, :, :-1], num_experts=E)
    with pytest.raises(ValueError, match="dtype"):
        moe_experts_ep(h, i, wt, gu, dn.double(), num_experts=E)
    per = gu.shape[0]
    with pytest.raises(ValueError, match="trainable_ids"):  # a local id past this rank's slice
        moe_experts_ep(h, i, wt, gu, dn, num_experts=E, trainable_ids=torch.tensor([per]),
                       trainable_gate_up=gu[:1], trainable_down=dn[:1])
    with pytest.raises(ValueError, match="trainable_down"):
        moe_experts_ep(h, i, wt, gu, dn, num_experts=E, trainable_ids=torch.tensor([0]), trainable_gate_up=gu[:1])
    with pytest.raises(ValueError, match="act"):
        moe_experts_ep(h, i, wt, gu, dn, num_experts=E, act="swiglu9")
    with pytest.raises(ValueError, match="multiple"):
        expert_range(E + 1)


def check_hf_esft(rank, world, tmp, family="qwen2_moe"):
    """ESFT with expert parallelism (apply, then shard_experts): the compact experts each
    rank keeps get the gradients one process gives them (summed over the ranks' losses),
    esft.save gathers every rank's experts into the checkpoint one process writes, and
    esft.merge writes each rank's experts into its slice."""
    from pathlib import Path

    import pytest

    import fastdf.integrations.hf_experts as hfe
    from fastdf import esft
    from fastdf.integrations.expert_parallel import expert_range, shard_experts
    from tests.distributed._fsdp_worker import _assert_same_checkpoint
    from tests.hf_tiny import batch, tiny_model

    tmp = Path(tmp)
    sel = {1: [2], 2: [0, 4]}  # layer 1: only rank 0 trains an expert there
    glob = batch(lengths=(9, 6, 8, 7), seed=4)
    labels = glob["input_ids"].masked_fill(glob["attention_mask"] == 0, -100)
    per = glob["input_ids"].shape[0] // world

    def loss_of(model, r):
        rows = slice(r * per, (r + 1) * per)
        return model(input_ids=glob["input_ids"][rows], attention_mask=glob["attention_mask"][rows],
                     labels=labels[rows]).loss

    # Routing statistics on a spread model: the router still scores every expert.
    rows = slice(rank * per, (rank + 1) * per)
    mine_batch = [{"input_ids": glob["input_ids"][rows], "attention_mask": glob["attention_mask"][rows]}]
    want_stats = esft.collect_routing_stats(tiny_model(family), mine_batch, progress=False)
    got_stats = esft.collect_routing_stats(shard_experts(tiny_model(family)), mine_batch, progress=False)
    assert got_stats.layers == want_stats.layers and got_stats.num_tokens == want_stats.num_tokens
    _close(got_stats.gate_scores, want_stats.gate_scores, "routing stats gate scores")
    _close(got_stats.token_ratios, want_stats.token_ratios, "routing stats token ratios")

    ref = esft.apply(tiny_model(family), sel)
    sum(loss_of(ref, r) for r in range(world)).backward()
    esft.save(ref, tmp / "single")  # plain model in a group: rank 0 writes

    model = shard_experts(esft.apply(tiny_model(family), sel))
    with pytest.raises(ValueError, match="shard_experts"):
        esft.apply(shard_experts(tiny_model(family)), sel)
    esft.save(model, tmp / "ep")  # every rank's experts gathered
    dist.barrier()
    _assert_same_checkpoint(tmp / "single", tmp / "ep")

    loss_of(model, rank).backward()
    ref_layers, layers = ref.model.layers, model.model.layers
    for i in sel:
        ex, rex = layers[i].mlp.experts, ref_layers[i].mlp.experts
        mine = expert_range(rex.gate_up_proj.shape[0])
        keep = [j for j, e in enumerate(rex.esft_ids.tolist()) if e in mine]
        assert ex.esft_ids.tolist() == [rex.esft_ids[j].item() for j in keep], (i, ex.esft_ids)
        for attr in (hfe.ESFT_GATE_UP, hfe.ESFT_DOWN):
            got, want = getattr(ex, attr), getattr(rex, attr)
            _close(got.grad, want.grad[keep], f"esft ep grad layer {i} {attr} rank={rank}")
        assert ex.gate_up_proj.grad is None and ex.down_proj.grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if ".esft_" not in n)

    with torch.no_grad():  # one SGD step on both, then merge: the slices agree
        for m in (ref, model):
            for p in m.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad
    esft.merge(ref)
    esft.merge(model)
    assert model.config._experts_implementation == "fastdf"
    want = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
            mine = expert_range(want[n].shape[0])
            _close(p.detach(), want[n].detach()[mine.start:mine.stop], f"esft ep merged {n} rank={rank}")

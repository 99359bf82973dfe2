"""ESFT workflow on tiny random HF MoE models: routing statistics against the paper's
formulas, the selection rule, freezing, training, save/load/merge, DDP."""

import json
import tempfile

import pytest
import torch

from fastdf import esft
from fastdf.esft.stats import RoutingStats
from tests.hf_tiny import batch, tiny_model

pytest.importorskip("transformers")


def _router_outputs(model, batches):
    """Each MoE layer's (logits, topk indices) per batch, captured by our own hooks."""
    from fastdf.esft._layers import moe_layers

    layers = moe_layers(model)
    seen = {layer.index: [] for layer in layers}
    handles = [layer.router.register_forward_hook(
        lambda mod, args, out, i=layer.index: seen[i].append((out[0].detach().float(), out[2].detach())))
        for layer in layers]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return seen


def _paper_stats(model, batches, sigmoid=False):
    """g_i and r_i straight from the formulas, one sequence and one token at a time."""
    seen = _router_outputs(model, batches)
    gate, ratio = {}, {}
    for layer, outs in seen.items():
        sums_g, sums_r, n_seq = 0, 0, 0
        for b, (logits, topk) in zip(batches, outs):
            B, T = b["input_ids"].shape
            probs = logits.sigmoid() if sigmoid else logits.softmax(-1)
            E, K = probs.shape[-1], topk.shape[-1]
            for j in range(B):
                tokens = [j * T + t for t in range(T) if b["attention_mask"][j, t]]
                if not tokens:
                    continue
                n_seq += 1
                g_j, r_j = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
                for k in tokens:
                    for i in topk[k].tolist():
                        g_j[i] += probs[k, i].item()
                        r_j[i] += 1 / K
                sums_g = sums_g + g_j / len(tokens)
                sums_r = sums_r + r_j / len(tokens)
        gate[layer], ratio[layer] = sums_g / n_seq, sums_r / n_seq
    return gate, ratio


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "mixtral", "qwen2_moe"])
def test_stats_match_paper_formulas(family):
    model = tiny_model(family)
    batches = [batch(lengths=(7, 3, 5)), batch(lengths=(4, 6), seed=2)]
    stats = esft.collect_routing_stats(model, batches, progress=False)
    gate, ratio = _paper_stats(model, batches, sigmoid=family == "deepseek_v3")
    assert stats.layers == sorted(gate) and stats.num_sequences == 5 and stats.num_tokens == 25
    for row, layer in enumerate(stats.layers):
        torch.testing.assert_close(stats.gate_scores[row], gate[layer], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(stats.token_ratios[row], ratio[layer], atol=1e-9, rtol=0)
    torch.testing.assert_close(stats.token_ratios.sum(1), torch.ones(len(stats.layers), dtype=torch.float64))
    if family == "mixtral":  # scores before top-k renormalisation: a token's chosen scores sum below 1
        assert (stats.gate_scores.sum(1) < 0.99).all()


def test_stats_exclude_padding():
    """Right-padded batches give the statistics of the same sequences run one by one."""
    model = tiny_model("deepseek_v2", seed=3)
    padded = batch(lengths=(8, 3, 6), seed=5)
    singles = [{k: v[j:j + 1, :n] for k, v in padded.items()} for j, n in enumerate((8, 3, 6))]
    a = esft.collect_routing_stats(model, [padded], progress=False)
    b = esft.collect_routing_stats(model, singles, progress=False)
    torch.testing.assert_close(a.gate_scores, b.gate_scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.token_ratios, b.token_ratios, atol=1e-9, rtol=0)


def test_select_rule():
    gate = torch.tensor([[0.02, 0.05, 0.03, 0.04], [0.25, 0.25, 0.3, 0.2]], dtype=torch.float64)
    token = torch.tensor([[0.1, 0.5, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    stats = RoutingStats([3, 7], gate, token, num_sequences=1, num_tokens=1)
    # Sorted by score, taken until the running sum reaches p.
    assert esft.select_experts(stats, "gate", 0.1) == {3: [1, 2, 3], 7: [2]}
    assert esft.select_experts(stats, "gate", 0.09) == {3: [1, 3], 7: [2]}
    assert esft.select_experts(stats, "token", 0.2) == {3: [1], 7: [0]}  # ties: lower id first
    assert esft.select_experts(stats, "token", 0.8) == {3: [1, 3], 7: [0, 1, 2, 3]}
    with pytest.raises(ValueError, match="method must be 'gate' or 'token'"):
        esft.select_experts(stats, "score", 0.1)
    with pytest.raises(ValueError, match="p must be > 0"):
        esft.select_experts(stats, "gate", 0.0)
    with pytest.raises(TypeError, match="stats must be the RoutingStats"):
        esft.select_experts({}, "gate", 0.1)


def _labels(b):
    return b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)


def _train(model, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for step in range(steps):
        b = batch(seed=step)
        model(**b, labels=_labels(b)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return params


def test_apply_train_merge_changes_only_selected_experts():
    model = tiny_model("deepseek_v2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    selection = {1: [2, 6], 2: [0]}
    esft.apply(model, selection)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"model.layers.{i}.mlp.experts.esft_{w}" for i in (1, 2) for w in ("gate_up", "down"))
    assert model.config._experts_implementation == "fastdf"
    _train(model)
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    esft.merge(model)
    assert not esft.is_applied(model) and all(p.requires_grad for p in model.parameters())
    assert not any("esft" in n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        layer = next((i for i in selection if name.startswith(f"model.layers.{i}.mlp.experts.")), None)
        if layer is None:
            assert torch.equal(p, before[name]), name
            continue
        picked = torch.zeros(p.shape[0], dtype=torch.bool)
        picked[selection[layer]] = True
        assert torch.equal(p[~picked], before[name][~picked]), f"{name}: an unselected expert changed"
        assert not torch.equal(p[picked], before[name][picked]), f"{name}: the selected experts did not train"


def test_backward_stops_below_lowest_trainable_layer():
    model = tiny_model("deepseek_v2", num_hidden_layers=4)
    esft.apply(model, {3: [1, 4]})
    needs = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, out, i=i: needs.__setitem__(
            i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    b = batch()
    model(**b, labels=_labels(b)).loss.backward()
    assert needs == {0: False, 1: False, 2: False, 3: True}
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert sorted(grads) == ["model.layers.3.mlp.experts.esft_down", "model.layers.3.mlp.experts.esft_gate_up"]


def test_save_load_merge_round_trip_is_bit_exact():
    model = tiny_model("deepseek_v2")
    esft.apply(model, {1: [3], 2: [1, 5, 7]})
    _train(model, steps=2)
    b = batch(seed=9)
    with torch.no_grad():
        want = model(**b).logits
    with tempfile.TemporaryDirectory() as d:
        path = esft.save(model, d)
        saved = json.loads((path.parent / "esft_selection.json").read_text())
        assert saved["selection"] == {"1": [3], "2": [1, 5, 7]}
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            assert sorted(f.keys()) == sorted(f"layers.{i}.{k}" for i in (1, 2) for k in ("expert_ids", "gate_up", "down"))
        loaded = esft.load(tiny_model("deepseek_v2"), d)
    for (n, p), (m, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n == m and torch.equal(p, q) and p.requires_grad == q.requires_grad, n
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, want)
    esft.merge(model)
    esft.merge(loaded)
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n
    model.set_experts_implementation("fastdf")  # same kernels as the ESFT model used: bit-exact
    with torch.no_grad():
        assert torch.equal(model(**b).logits, want)


def test_bad_input():
    model = tiny_model("deepseek_v2")
    with pytest.raises(ValueError, match="decoder layer 0, which has no routed experts"):
        esft.apply(model, {0: [1]})
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        esft.apply(model, {1: [8]})
    with pytest.raises(ValueError, match="lists an expert twice"):
        esft.apply(model, {1: [2, 2]})
    with pytest.raises(TypeError, match="selection must be a dict"):
        esft.apply(model, [[1]])
    stuck = tiny_model("deepseek_v2")
    stuck.set_experts_implementation = lambda name: None  # an experts class that cannot switch
    with pytest.raises(ValueError, match="would not train"):
        esft.apply(stuck, {1: [1]})
    assert all(p.requires_grad for p in stuck.parameters()) and not esft.is_applied(stuck)
    with pytest.raises(ValueError, match="no ESFT state to save"):
        esft.save(model, tempfile.gettempdir())
    with pytest.raises(ValueError, match="no ESFT state to merge"):
        esft.merge(model)
    esft.apply(model, {1: [1]})
    with pytest.raises(ValueError, match="already carries ESFT state"):
        esft.apply(model, {1: [2]})
    with tempfile.TemporaryDirectory() as d, pytest.raises(FileNotFoundError, match="esft_experts.safetensors"):
        esft.load(tiny_model("deepseek_v2"), d)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        esft.collect_routing_stats(None, [])
    with pytest.raises(ValueError, match="no routed experts"):
        esft.collect_routing_stats(torch.nn.Linear(2, 2), [])
    with pytest.raises(TypeError, match=r"batches\[0\] must be a dict"):
        esft.collect_routing_stats(tiny_model("olmoe"), [torch.ones(2, 3, dtype=torch.long)], progress=False)
    with pytest.raises(ValueError, match="no real tokens"):
        esft.collect_routing_stats(tiny_model("olmoe"), [], progress=False)


def test_ddp_two_ranks():
    """DDP over gloo, 2 CPU processes: trainable experts' gradients agree across ranks and
    equal the mean of the ranks' own gradients; frozen parameters never get one."""
    import time

    import torch.multiprocessing as mp

    from tests.esft import _ddp_worker

    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_ddp_worker.run, args=(2, f"{d}/rendezvous"), nprocs=2, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + 180
        try:
            while not ctx.join(timeout=1):  # raises if a rank failed
                if time.monotonic() > deadline:
                    pytest.fail("the DDP ranks did not finish within 180 s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()

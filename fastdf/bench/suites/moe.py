"""Suite ``moe``: routed-experts layers (fastdf.moe_experts) against HF transformers' experts
implementations ("grouped_mm" = torch._grouped_mm, "batched_mm", "eager") at the shapes of
DeepSeek-V2-Lite, Qwen3-30B-A3B and Mixtral-8x7B, with uniform and skewed routing.

Modes per shape:
- ``fwd``: inference forward.
- ``train``: forward + backward with every expert trainable (full fine-tuning).
- ``esft``: the backward alone (forward graph built once, ``retain_graph``) with ~5/64 of
  the experts trainable (the ones the most tokens reach, as ESFT picks them); baselines
  are the full fine-tuning backward, which is all the other implementations can do. The
  ratio is the ESFT speedup.
- ``step``: one whole training step (forward, backward, a fresh AdamW step) to compare
  peak memory: ESFT keeps no gradient or optimizer state for frozen experts.

FLOPs: forward 6*S*H*I (S = T*K routed rows); backward 6*S*H*I for the input gradients plus
6*S_t*H*I for the weight gradients of the S_t rows whose expert trains (``train`` counts
forward + full backward, ``esft`` the backward only). Bytes floor
(forward): hidden in, output out, each used expert's 3*H*I weights read once.
"""

from __future__ import annotations

import torch

import fastdf

from ..core import Case, Skip, suite

# name, E, K, H, I
SHAPES = {
    "dsv2-lite": (64, 6, 2048, 1408),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}


def _plan(device, quick):
    """(shape, tokens, routing, modes) cases."""
    if device.type == "cpu":
        # Peak memory is not measured on the CPU, so no step-memory cases there.
        return [("cpu-small", (8, 2, 128, 256), 512, "uniform", ("fwd", "esft")),
                ("cpu-small", (8, 2, 128, 256), 512, "skewed", ("esft",))]
    if quick:
        return [
            ("dsv2-lite", SHAPES["dsv2-lite"], 16384, "uniform", ("fwd", "esft", "step")),
            ("dsv2-lite", SHAPES["dsv2-lite"], 16384, "skewed", ("fwd", "esft")),
            ("dsv2-lite", SHAPES["dsv2-lite"], 128, "uniform", ("fwd",)),
        ]
    plan = []
    for tokens in (4096, 16384, 32768):
        for routing in ("uniform", "skewed"):
            plan.append(("dsv2-lite", SHAPES["dsv2-lite"], tokens, routing, ("fwd", "train", "esft", "step")))
    plan.append(("dsv2-lite", SHAPES["dsv2-lite"], 128, "uniform", ("fwd",)))
    for routing in ("uniform", "skewed"):
        plan.append(("qwen3-30b-a3b", SHAPES["qwen3-30b-a3b"], 16384, routing, ("fwd", "train", "esft", "step")))
    plan.append(("mixtral-8x7b", SHAPES["mixtral-8x7b"], 4096, "uniform", ("fwd", "train", "esft", "step")))
    return plan


def routing(T, E, K, kind, device, seed=0):
    """topk ids [T, K] (distinct per token) and softmax weights; "skewed" draws experts
    from a Zipf-like popularity (a few experts get most tokens, some none)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if kind == "skewed":
        popularity = 1.0 / torch.arange(1, E + 1, dtype=torch.float32) ** 1.2
        gumbel = -torch.log(-torch.log(torch.rand(T, E, generator=g).clamp_min(1e-9)))
        scores = popularity.log() + gumbel
    else:
        scores = torch.rand(T, E, generator=g)
    ids = scores.topk(K, dim=-1).indices
    weights = logits.gather(1, ids).softmax(-1)
    return ids.to(device), weights.to(device)


def _hf_experts(E, H, I, implementation, gate_up, down):
    """A real HF experts module (DeepSeek-V2's; the math is the same in every family)
    sharing our weights, dispatching to ``implementation``."""
    try:
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts
    except ImportError as err:
        raise Skip(f"transformers with DeepSeek-V2 is not installed ({err})")
    cfg = DeepseekV2Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, hidden_act="silu")
    cfg._experts_implementation = implementation
    with torch.device("meta"):
        module = DeepseekV2Experts(cfg)
    module.gate_up_proj = gate_up
    module.down_proj = down
    return module


def _top_experts(ids, E, n):
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    return counts.topk(n).indices.sort().values


def _case(label, shape, T, kind, mode, device, dtype):
    E, K, H, I = shape
    ids_cpu, _ = routing(T, E, K, kind, "cpu")
    S = T * K
    n_train = max(1, round(E * 5 / 64))
    counts = torch.bincount(ids_cpu.reshape(-1), minlength=E)
    rows_trained = int(counts[_top_experts(ids_cpu, E, n_train)].sum())
    elem = torch.tensor([], dtype=dtype).element_size()
    used = int((counts > 0).sum())
    fwd = 6.0 * S * H * I
    flops = {"fwd": fwd, "train": 3 * fwd, "esft": fwd + 6.0 * rows_trained * H * I, "step": None}[mode]
    nbytes = (2 * T * H + 3 * used * H * I) * elem if mode == "fwd" else None

    def setup(device):
        g = torch.Generator(device="cpu").manual_seed(1)
        hidden = torch.randn(T, H, generator=g).to(device, dtype)
        gate_up = torch.nn.Parameter((torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(device, dtype))
        down = torch.nn.Parameter((torch.randn(E, H, I, generator=g) * I**-0.5).to(device, dtype))
        ids, weights = routing(T, E, K, kind, device)
        weights = weights.to(dtype)
        grad = torch.randn(T, H, generator=g).to(device, dtype)
        train = mode != "fwd"
        hidden.requires_grad_(train)
        weights.requires_grad_(train)
        tids = _top_experts(ids, E, n_train) if mode in ("esft", "step") else None
        tgu = torch.nn.Parameter(gate_up.detach()[tids].clone()) if tids is not None else None
        tdn = torch.nn.Parameter(down.detach()[tids].clone()) if tids is not None else None
        gate_up.requires_grad_(train and tids is None)
        down.requires_grad_(train and tids is None)

        def ours_full():
            return fastdf.moe_experts(hidden, ids, weights, gate_up, down)

        def ours_esft():
            return fastdf.moe_experts(hidden, ids, weights, gate_up, down, trainable_ids=tids, trainable_gate_up=tgu,
                                      trainable_down=tdn)

        def hf(name):
            module = _hf_experts(E, H, I, name, gate_up, down)
            if name == "batched_mm" and device.type == "cuda":
                need = S * 3 * H * I * elem  # it gathers every row's expert weights
                if need > 0.5 * torch.cuda.mem_get_info(device)[0]:
                    raise Skip(f"batched_mm would gather {need / 2**30:.0f} GiB of weights")
            return lambda: module(hidden, ids, weights)

        def trained(forward, params):
            def run():
                for p in params:
                    p.grad = None
                hidden.grad = weights.grad = None
                forward().backward(grad)
            return run

        def backward_only(forward, params):
            graph = []

            def run():
                if not graph:
                    graph.append(forward())
                for p in params:
                    p.grad = None
                hidden.grad = weights.grad = None
                graph[0].backward(grad, retain_graph=True)
            return run

        def stepped(forward, params):
            def run():
                for p in params:
                    p.grad = None
                hidden.grad = weights.grad = None
                opt = torch.optim.AdamW(params, lr=1e-5)  # fresh: its state counts in the peak
                forward().backward(grad)
                opt.step()
                del opt
            return run

        def lazy(make):
            """Build the provider when it first runs, so a Skip lands on that provider only."""
            built = []

            def run():
                if not built:
                    built.append(make())
                return built[0]()
            return run

        full = [gate_up, down]
        # On the CPU batched_mm gathers every row's expert weights (~400 MB a call at cpu-small,
        # 50-150x slower than the rest): timed in the same interleaved rounds, its allocations
        # slowed whichever provider ran next (MoE fwd read 0.53-0.73x in such runs, 1.0-1.1x
        # without it), so the CPU leaves it out.
        names = ["grouped_mm", "batched_mm", "eager"] if device.type == "cuda" else ["grouped_mm", "eager"]
        if mode == "fwd":
            def no_grad(fn):
                def run():
                    with torch.no_grad():
                        return fn()
                return run
            providers = {"fastdf": no_grad(ours_full)}
            providers.update({f"hf-{n}": lazy(lambda n=n: no_grad(hf(n))) for n in names})
        elif mode == "train":
            providers = {"fastdf": trained(ours_full, full)}
            providers.update({f"hf-{n}": lazy(lambda n=n: trained(hf(n), full)) for n in names})
        elif mode == "esft":
            # Baselines run full fine-tuning: none of them can skip frozen experts' dW.
            providers = {"fastdf-esft": backward_only(ours_esft, [tgu, tdn])}
            full_grads = lambda fn: backward_only(fn, full)  # noqa: E731
            gate_up.requires_grad_(True)
            down.requires_grad_(True)
            providers["fastdf-full"] = full_grads(ours_full)
            providers.update({f"hf-{n}-full": lazy(lambda n=n: full_grads(hf(n))) for n in names})
        else:  # step: peak memory of a training step, optimizer state included
            gate_up.requires_grad_(True)
            down.requires_grad_(True)
            providers = {"fastdf-esft": stepped(ours_esft, [tgu, tdn]), "fastdf-full": stepped(ours_full, full),
                         "hf-grouped_mm-full": lazy(lambda: stepped(hf("grouped_mm"), full))}
        return providers

    flops_by = {}
    if mode == "esft":
        flops_by = {p: 2 * fwd for p in ("fastdf-full", "hf-grouped_mm-full", "hf-batched_mm-full", "hf-eager-full")}
    shown = {"esft": "esft-bwd", "step": "step-memory"}.get(mode, mode)
    name = f"{label} T{T} {kind} {shown}" + (f" ({n_train}/{E} train)" if mode in ("esft", "step") else "")
    return Case(name, setup, flops=flops, bytes=nbytes, flops_by=flops_by)


@suite("moe", help="moe_experts fwd / train / ESFT bwd / step memory vs HF experts (grouped_mm, batched_mm, eager)")
def cases(device, quick):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    out = []
    for label, shape, T, kind, modes in _plan(device, quick):
        for mode in modes:
            out.append(_case(label, shape, T, kind, mode, device, dtype))
    return out

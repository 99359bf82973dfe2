"""Suite ``sampling``: batched proof sampling.

- sample: ``fastdf.sample`` vs HF's logits warpers + multinomial and a plain sort + cumsum
  top-k/top-p (fp32 logits shaped like an LLM's: a peaked head over a Gaussian bulk);
  bytes = the logits read once.
- spa: ``shared_prefix_attention`` (one prompt, N samples, prefix P, suffix S) vs
  per-sample decode attention (SDPA over every sample's own copy of prefix + suffix, as
  when the prompt's K/V is stored per sample); FLOPs = 4 D per visible (q, k) pair.
- e2e: ``ProofSampler`` vs HF ``generate(num_return_sequences=k)`` on a random-initialised
  Llama-style model; generated tokens/s = k * new tokens / time.
"""

from __future__ import annotations

import torch

import fastdf

from ..core import Case, Skip, suite, time_once


def llm_like_logits(rows, vocab, device, dtype=torch.float32, seed=0):
    """A Gaussian bulk (std 2.5) with 20 boosted tokens per row (+8..+16): the head holds
    most of the mass, as in a trained LM's next-token distribution."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = 2.5 * torch.randn(rows, vocab, device=device, generator=g)
    head = torch.randint(0, vocab, (rows, 20), device=device, generator=g)
    boost = 8 + 8 * torch.rand(rows, 20, device=device, generator=g)
    return logits.scatter_add_(1, head, boost).to(dtype)


def sort_sample(logits, temperature, top_k, top_p):
    """The usual sort-based sampler (gpt-fast / vLLM style)."""
    probs = torch.softmax(logits / temperature, -1)
    sorted_p, order = torch.sort(probs, -1, descending=True)
    if top_k:
        sorted_p[:, top_k:] = 0
    drop = torch.cumsum(sorted_p, -1) - sorted_p > top_p * sorted_p.sum(-1, keepdim=True)
    sorted_p = sorted_p.masked_fill(drop, 0)
    choice = torch.multinomial(sorted_p, 1)
    return order.gather(-1, choice).squeeze(-1)


def _sample_cases(device, quick):
    if device.type == "cpu":
        shapes = [(16, 32000)]
    elif quick:
        shapes = [(256, 152064), (1, 32000)]
    else:
        shapes = [(b, v) for v in (32000, 128256, 152064) for b in (1, 64, 256, 1024)]
    knob_sets = [(0.8, 0, 0.95)] if quick or device.type == "cpu" else [(0.8, 0, 0.95), (0.8, 50, 0.95)]
    cases = []
    for (b, v), (t, k, p) in ((s, kn) for s in shapes for kn in knob_sets):
        def setup(device, b=b, v=v, t=t, k=k, p=p):
            try:
                from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                                    TopKLogitsWarper, TopPLogitsWarper)
            except ImportError:
                LogitsProcessorList = None
            logits = llm_like_logits(b, v, device)
            gen = torch.Generator(device=device).manual_seed(0)
            providers = {
                "fastdf": lambda: fastdf.sample(logits, temperature=t, top_k=k, top_p=p, generator=gen,
                                                check_nan=False),
                "torch-sort": lambda: sort_sample(logits, t, k, p),
            }
            if LogitsProcessorList is not None:
                warpers = LogitsProcessorList([TemperatureLogitsWarper(t)] + ([TopKLogitsWarper(k)] if k else [])
                                              + [TopPLogitsWarper(p)])
                providers["hf-warpers"] = lambda: torch.multinomial(torch.softmax(warpers(None, logits), -1), 1)
            return providers

        name = f"sample B{b} V{v} T{t} k{k} p{p}"
        cases.append(Case(name, setup, bytes=b * v * 4 + b * 8))
    return cases


def _spa_cases(device, quick):
    if device.type == "cpu":
        shapes, heads, dtype = [(32, 1024, 16)], (8, 2, 64), torch.float32
    else:
        heads, dtype = (32, 8, 128), torch.bfloat16
        shapes = [(128, 2048, 64)] if quick else [(n, p, 64) for n in (16, 64, 128, 256) for p in (512, 2048, 8192)]
        if not quick:
            shapes += [(128, 2048, 512)]
    hq, hkv, d = heads
    elem = torch.tensor([], dtype=dtype).element_size()
    cases = []
    for n, p, s in shapes:
        def setup(device, n=n, p=p, s=s):
            mk = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
            q = mk(1, n, hq, d)
            kp, vp = mk(1, hkv, p, d), mk(1, hkv, p, d)
            ks, vs = mk(1, n, hkv, s, d), mk(1, n, hkv, s, d)
            # The baseline stores the prompt per sample: each sample's own [prefix | suffix].
            k_full = torch.cat([kp.expand(n, -1, -1, -1), ks[0]], 2)
            v_full = torch.cat([vp.expand(n, -1, -1, -1), vs[0]], 2)
            q_b = q[0][:, :, None]  # [n, hq, 1, d]
            return {
                "fastdf": lambda: fastdf.shared_prefix_attention(q, kp, vp, ks, vs),
                "per-sample-sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
                    q_b, k_full, v_full, enable_gqa=True),
            }

        flops = 4 * d * n * hq * (p + s)
        qo = 2 * n * hq * d * elem
        ours = qo + 2 * hkv * p * d * elem + 2 * n * hkv * s * d * elem
        theirs = qo + 2 * n * hkv * (p + s) * d * elem
        cases.append(Case(f"spa N{n} P{p} S{s} Hq{hq} Hkv{hkv} D{d} {str(dtype)[6:]}", setup, flops=flops, bytes=ours,
                          bytes_by={"per-sample-sdpa": theirs}))
    return cases


def _e2e_cases(device, quick):
    if device.type == "cpu":
        cfg = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=4096)
        runs = [(32, 512, 16)]
        dtype = torch.float32
    else:
        cfg = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22 if not quick else 8,
                   num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
        runs = [(32, 1024, 128)] if quick else [(64, 2048, 512)]
        dtype = torch.bfloat16
    cases = []
    for k, prompt_len, new in runs:
        def setup(device, k=k, prompt_len=prompt_len, new=new):
            try:
                from transformers import LlamaConfig, LlamaForCausalLM
            except ImportError:
                raise Skip("transformers is not installed") from None
            from fastdf.prover import ProofSampler

            config = LlamaConfig(**cfg, max_position_embeddings=prompt_len + new + 8, bos_token_id=1,
                                 eos_token_id=None, pad_token_id=0)
            torch.manual_seed(0)
            with torch.device(device):
                model = LlamaForCausalLM(config).to(dtype).eval()
            with torch.no_grad():
                model.lm_head.weight.mul_(30)  # random init is near-uniform; a trained LM is peaked
            model.generation_config.eos_token_id = None
            prompt = torch.randint(2, cfg["vocab_size"], (1, prompt_len), device=device)
            sampler = ProofSampler(model)
            knobs = dict(temperature=1.0, top_p=0.95)
            return {
                "fastdf": lambda: sampler.sample_ids(prompt.tolist(), k, new, top_k=0, eos_token_id=[], seed=0,
                                                     progress=False, **knobs),
                "hf-generate": lambda: model.generate(prompt, do_sample=True, num_return_sequences=k,
                                                      max_new_tokens=new, min_new_tokens=new, top_k=0, **knobs),
            }

        name = (f"e2e llama h{cfg['hidden_size']} L{cfg['num_hidden_layers']} k{k} prompt{prompt_len} "
                f"new{new} (tok/s = {k * new} / s)")
        cases.append(Case(name, setup, timer=time_once))
    return cases


@suite("sampling", help="proof sampling: sorting-free sampling, shared-prefix decode attention, ProofSampler vs HF")
def cases(device, quick):
    return _sample_cases(device, quick) + _spa_cases(device, quick) + _e2e_cases(device, quick)

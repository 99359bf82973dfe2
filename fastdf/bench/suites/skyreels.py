"""Suite ``skyreels``: one SkyReels-V2 DF transformer call, stock diffusers vs
``fastdf.integrations.diffusers.apply`` (diffusion forcing, ``causal_block_size=5``); in the
full set also the whole tiny pipeline (``fastdf.examples.skyreels_df``) stock vs ``apply`` vs
``apply(cache=True)`` for ``ar_step`` 0 and 5, the case name giving the fraction of
frame-block tokens the cache skipped.

The stock forward builds a dense [L, L] boolean mask (SDPA turns it into a bias) and
repeats the per-frame AdaLN table to an fp32 [B, 6, L, C] tensor; fastdf does neither
(frame-block-causal df_attention, per-frame adaln_modulate / gated_residual). On the GPU
the case is the 1.3B-540P shape with random weights (30 layers, 12 heads x 128, dim 1536,
25 latent frames x 2040 tokens, bf16) and the CLI also records peak memory; on the CPU a
reduced width/depth (time only: CPU numbers show the algorithmic difference, not kernels).
The CPU full set also times a cached call (``apply(cache=True)``, the leading 3 of 5 frame
blocks unchanged, as in an asynchronous step) against the same call uncached.

Peak memory on the CPU (the CLI records it on CUDA only): ``python -m
fastdf.bench.suites.skyreels --cpu-memory`` runs one transformer call per variant in a
fresh process, every allocation of 64 KiB or more mmap-ed (glibc ``MALLOC_MMAP_THRESHOLD_``,
so freed memory leaves the resident set), and reports the resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set before the call,
after a warm-up call. Linux only.
Needs diffusers (``pip install fastdf[diffusers]``); without it the cases are skipped.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import torch

from ..core import Case, Skip, suite, time_once

# name: (layers, heads, head_dim, ffn, latent frames, latent H, latent W, block frames)
GPU_SHAPES = {"1.3B-540P 25x2040": (30, 12, 128, 8960, 25, 68, 120, 5)}
CPU_SHAPES = {"reduced 25x80": (2, 4, 32, 256, 25, 16, 20, 5), "reduced 10x80": (2, 4, 32, 256, 10, 16, 20, 5)}
# --cpu-memory: the suite's CPU shape, and the 1.3B model's width (one layer) on 25 frames of
# 170 tokens (a 20x34 latent), where the mask and the per-token table are large enough to see
MEMORY_SHAPES = {"reduced 25x80": CPU_SHAPES["reduced 25x80"],
                 "1.3B width, 1 layer, 25x170": (1, 12, 128, 8960, 25, 20, 34, 5)}


def _build(shape, device):
    """``(stock model, forward kwargs)`` of one diffusion-forcing transformer call at ``shape``
    (random weights; bf16 on CUDA with diffusers' fp32 modules kept, fp32 on the CPU)."""
    from diffusers import SkyReelsV2Transformer3DModel

    layers, heads, head_dim, ffn, frames, height, width, block = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        stock = SkyReelsV2Transformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
            out_channels=16, text_dim=4096 if device.type == "cuda" or heads * head_dim >= 1536 else 64,
            freq_dim=256, ffn_dim=ffn, num_layers=layers, inject_sample_info=True,
            num_frame_per_block=block).eval()
    if dtype != torch.float32:
        stock.to(dtype)
        for n, p in stock.named_parameters():  # what from_pretrained(torch_dtype=...) keeps in fp32
            if any(k in n.split(".") for k in stock._keep_in_fp32_modules):
                p.data = p.data.float()
    g = torch.Generator(device).manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, 16, frames, height, width, device=device, generator=g, dtype=dtype),
              timestep=torch.randint(0, 1000, (1, frames), device=device, generator=g),
              encoder_hidden_states=torch.randn(1, 512, stock.config.text_dim, device=device, generator=g,
                                                dtype=dtype),
              enable_diffusion_forcing=True, fps=[1], return_dict=False)
    return stock, kw


def _twin(stock):
    """A second model sharing ``stock``'s weights (one copy in memory), for fastdf."""
    from diffusers import SkyReelsV2Transformer3DModel

    with torch.device(stock.device):
        fast = SkyReelsV2Transformer3DModel.from_config(stock.config).eval()
    fast.load_state_dict(stock.state_dict(), assign=True)
    return fast


def _case(name, shape, device, quick):
    layers, heads, head_dim, ffn, frames, height, width, block = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def setup(device):
        try:
            import fastdf.integrations.diffusers as fdd
        except ImportError as exc:
            raise Skip(f"diffusers is not installed ({exc})") from exc
        stock, kw = _build(shape, device)
        fast = fdd.apply(_twin(stock))

        def call(model):
            def fn():
                with torch.no_grad():
                    return model(**kw)[0]
            return fn

        return {"fastdf": call(fast), "stock": call(stock)}

    tokens = frames * (height // 2) * (width // 2)
    dt = str(dtype).removeprefix("torch.")
    return Case(f"transformer call {name} L{tokens} layers{layers} {heads}x{head_dim} {dt}", setup, timer=time_once)


def _cached_case(name, shape):
    """One asynchronous-like step: the leading 3 of 5 frame blocks as in the previous call in
    the cache context, the last 2 changed (two alternating tails, so every timed call reuses
    exactly 3 blocks), cached vs the same calls uncached."""
    frames, block = shape[4], shape[7]
    keep = frames // block * 3 // 5 * block

    def setup(device):
        try:
            import fastdf.integrations.diffusers as fdd
        except ImportError as exc:
            raise Skip(f"diffusers is not installed ({exc})") from exc
        stock, kw = _build(shape, device)
        plain, cached = fdd.apply(_twin(stock)), fdd.apply(_twin(stock), cache=True)
        g = torch.Generator(device).manual_seed(2)
        calls = []
        for _ in range(2):
            x, t = kw["hidden_states"].clone(), kw["timestep"].clone()
            x[:, :, keep:] = torch.randn(x[:, :, keep:].shape, device=device, generator=g, dtype=x.dtype)
            t[:, keep:] = torch.randint(0, 1000, t[:, keep:].shape, device=device, generator=g)
            calls.append(dict(kw, hidden_states=x, timestep=t))

        def call(model, context):
            turn = [0]

            def fn():
                turn[0] += 1
                with torch.no_grad(), model.cache_context(context):
                    return model(**calls[turn[0] % 2])[0]
            fn.model = model  # for fastdf.integrations.diffusers.cache_stats
            return fn

        return {"fastdf cache": call(cached, "cond"), "fastdf": call(plain, "cond")}

    tokens = frames * (shape[5] // 2) * (shape[6] // 2)
    return Case(f"cached transformer call {name} L{tokens} leading {keep}/{frames} frames reused", setup,
                timer=time_once)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_child(shape_name: str, variant: str) -> dict:
    """In a fresh process: MiB the resident set grows to during one transformer call
    (``variant`` "stock" or "fastdf") above what it was before, after a warm-up call."""
    import gc

    import fastdf.integrations.diffusers as fdd

    model, kw = _build(MEMORY_SHAPES[shape_name], torch.device("cpu"))
    if variant == "fastdf":
        fdd.apply(model)
    with torch.no_grad():
        model(**kw)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _rss_kib("VmRSS")
        out = model(**kw)[0]
        peak = _rss_kib("VmHWM")
    return {"shape": shape_name, "variant": variant, "peak_MiB": (peak - before) / 1024,
            "out_sum": float(out.double().sum())}


def cpu_peak_memory(shape_names=None) -> list[dict]:
    """Peak resident memory of one transformer call, stock vs fastdf, per shape of
    ``MEMORY_SHAPES`` (see the module docstring for the method)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    rows = []
    for shape_name in shape_names or MEMORY_SHAPES:
        for variant in ("stock", "fastdf"):
            proc = subprocess.run([sys.executable, "-m", "fastdf.bench.suites.skyreels", "--memory-child", shape_name,
                                   variant], env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


# The tiny pipeline of the example, 17 frames 32x32 (5 latent frames of 4 tokens), two-frame
# blocks; the window is the whole video so ar_step > 0 leaves finished blocks in it.
PIPELINE = dict(num_frames=17, base_num_frames=17, causal_block_size=2, steps=4, size=32)
# The 540P schedule's structure at a CPU size: 97 frames (25 latent frames, of 16 tokens at
# 64x64), five-frame blocks, the suite's reduced transformer width (2 layers, 4 heads x 32).
PIPELINE_SMALL = dict(num_frames=97, base_num_frames=97, causal_block_size=5, steps=10, size=64, layers=2, heads=4,
                      head_dim=32)


def _small_pipeline(device):
    """:func:`fastdf.examples.skyreels_df.tiny_pipeline` around a random transformer of
    ``PIPELINE_SMALL``'s width."""
    from diffusers import SkyReelsV2Transformer3DModel

    from fastdf.examples.skyreels_df import tiny_pipeline

    torch.manual_seed(0)
    width = PIPELINE_SMALL["heads"] * PIPELINE_SMALL["head_dim"]
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=PIPELINE_SMALL["heads"], attention_head_dim=PIPELINE_SMALL["head_dim"],
        in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=4 * width, num_layers=PIPELINE_SMALL["layers"],
        inject_sample_info=True, num_frame_per_block=1).eval()
    with torch.no_grad():  # random AdaLN / gate tables, as in the example
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return tiny_pipeline(transformer, device)


def _pipeline_case(ar_step, config=PIPELINE, label="tiny"):
    def setup(device):
        try:
            import fastdf.integrations.diffusers as fdd
            from fastdf.examples.skyreels_df import build_pipeline
        except ImportError as exc:
            raise Skip(f"diffusers is not installed ({exc})") from exc
        pipe, prompt, negative = build_pipeline(device) if config is PIPELINE else _small_pipeline(device)
        stock = pipe.transformer
        models = {"fastdf cache": fdd.apply(copy.deepcopy(stock), cache=True),
                  "fastdf": fdd.apply(copy.deepcopy(stock)), "stock": stock}
        options = {k: config[k] for k in ("num_frames", "base_num_frames", "causal_block_size")}

        def call(model):
            def fn():
                pipe.transformer = model
                with torch.no_grad():
                    return pipe(None, prompt_embeds=prompt, negative_prompt_embeds=negative, height=config["size"],
                                width=config["size"], num_inference_steps=config["steps"], guidance_scale=3.0,
                                max_sequence_length=8, output_type="latent", ar_step=ar_step,
                                generator=torch.Generator(device).manual_seed(0), **options).frames
            return fn

        providers = {name: call(model) for name, model in models.items()}
        providers["fastdf cache"]()  # the skipped fraction is a property of the schedule: one run gives it
        stats = fdd.cache_stats(models["fastdf cache"])
        # the name is read after setup; the fraction is only known once the pipeline has run
        case.name += f" cache skipped {1 - stats['tokens_computed'] / stats['tokens_total']:.0%}"
        return providers

    size = config["size"]
    case = Case(f"{label} pipeline ar_step{ar_step} {config['num_frames']}f {size}x{size} "
                f"block{config['causal_block_size']} steps{config['steps']}", setup, timer=time_once)
    return case


@suite("skyreels", help="SkyReels-V2 DF transformer call: stock diffusers vs fastdf.integrations.diffusers")
def cases(device, quick):
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    names = list(shapes)[-1:] if quick else list(shapes)
    cases = [_case(name, shapes[name], device, quick) for name in names]
    if not quick and device.type == "cpu":  # seconds per case: the full set only
        cases.append(_cached_case("reduced 25x80", CPU_SHAPES["reduced 25x80"]))
        cases += [_pipeline_case(ar_step) for ar_step in (0, 5)]
        cases += [_pipeline_case(ar_step, PIPELINE_SMALL, "small") for ar_step in (0, 5)]
    return cases


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory-child"]:
        torch.set_num_threads(1)
        print(json.dumps(_memory_child(sys.argv[2], sys.argv[3])))
    elif sys.argv[1:2] == ["--cpu-memory"]:
        rows = cpu_peak_memory(sys.argv[2:] or None)
        for shape_name in dict.fromkeys(r["shape"] for r in rows):
            peak = {r["variant"]: r["peak_MiB"] for r in rows if r["shape"] == shape_name}
            print(f"{shape_name}: one transformer call, peak above baseline: stock {peak['stock']:.0f} MiB, "
                  f"fastdf {peak['fastdf']:.0f} MiB ({peak['stock'] / peak['fastdf']:.1f}x less)")
    else:
        sys.exit("usage: python -m fastdf.bench.suites.skyreels --cpu-memory [SHAPE ...]")

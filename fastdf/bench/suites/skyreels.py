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
Needs diffusers (``pip install fastdf[diffusers]``); without it the cases are skipped.
"""

from __future__ import annotations

import copy

import torch

from ..core import Case, Skip, suite, time_once

# name: (layers, heads, head_dim, ffn, latent frames, latent H, latent W, block frames)
GPU_SHAPES = {"1.3B-540P 25x2040": (30, 12, 128, 8960, 25, 68, 120, 5)}
CPU_SHAPES = {"reduced 25x80": (2, 4, 32, 256, 25, 16, 20, 5), "reduced 10x80": (2, 4, 32, 256, 10, 16, 20, 5)}


def _case(name, shape, device, quick):
    layers, heads, head_dim, ffn, frames, height, width, block = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def setup(device):
        try:
            from diffusers import SkyReelsV2Transformer3DModel

            import fastdf.integrations.diffusers as fdd
        except ImportError as exc:
            raise Skip(f"diffusers is not installed ({exc})") from exc
        torch.manual_seed(0)
        with torch.device(device):
            stock = SkyReelsV2Transformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                out_channels=16, text_dim=4096 if device.type == "cuda" else 64, freq_dim=256, ffn_dim=ffn,
                num_layers=layers, inject_sample_info=True, num_frame_per_block=block).eval()
            fast = SkyReelsV2Transformer3DModel.from_config(stock.config).eval()
        if dtype != torch.float32:
            stock.to(dtype)
            for n, p in stock.named_parameters():  # what from_pretrained(torch_dtype=...) keeps in fp32
                if any(k in n.split(".") for k in stock._keep_in_fp32_modules):
                    p.data = p.data.float()
        fast.load_state_dict(stock.state_dict(), assign=True)  # shares the weights: one copy in memory
        fdd.apply(fast)
        g = torch.Generator(device).manual_seed(1)
        kw = dict(hidden_states=torch.randn(1, 16, frames, height, width, device=device, generator=g, dtype=dtype),
                  timestep=torch.randint(0, 1000, (1, frames), device=device, generator=g),
                  encoder_hidden_states=torch.randn(1, 512, stock.config.text_dim, device=device, generator=g,
                                                    dtype=dtype),
                  enable_diffusion_forcing=True, fps=[1], return_dict=False)

        def call(model):
            def fn():
                with torch.no_grad():
                    return model(**kw)[0]
            return fn

        return {"fastdf": call(fast), "stock": call(stock)}

    tokens = frames * (height // 2) * (width // 2)
    dt = str(dtype).removeprefix("torch.")
    return Case(f"transformer call {name} L{tokens} layers{layers} {heads}x{head_dim} {dt}", setup, timer=time_once)


# The tiny pipeline of the example, 17 frames 32x32 (5 latent frames of 4 tokens), two-frame
# blocks; the window is the whole video so ar_step > 0 leaves finished blocks in it.
PIPELINE = dict(num_frames=17, base_num_frames=17, causal_block_size=2, steps=4, size=32)


def _pipeline_case(ar_step):
    def setup(device):
        try:
            import fastdf.integrations.diffusers as fdd
            from fastdf.examples.skyreels_df import build_pipeline
        except ImportError as exc:
            raise Skip(f"diffusers is not installed ({exc})") from exc
        pipe, prompt, negative = build_pipeline(device)
        stock = pipe.transformer
        models = {"fastdf cache": fdd.apply(copy.deepcopy(stock), cache=True),
                  "fastdf": fdd.apply(copy.deepcopy(stock)), "stock": stock}
        options = {k: v for k, v in PIPELINE.items() if k not in ("steps", "size")}

        def call(model):
            def fn():
                pipe.transformer = model
                with torch.no_grad():
                    return pipe(None, prompt_embeds=prompt, negative_prompt_embeds=negative, height=PIPELINE["size"],
                                width=PIPELINE["size"], num_inference_steps=PIPELINE["steps"], guidance_scale=3.0,
                                max_sequence_length=8, output_type="latent", ar_step=ar_step,
                                generator=torch.Generator(device).manual_seed(0), **options).frames
            return fn

        providers = {name: call(model) for name, model in models.items()}
        providers["fastdf cache"]()  # the skipped fraction is a property of the schedule: one run gives it
        stats = fdd.cache_stats(models["fastdf cache"])
        # the name is read after setup; the fraction is only known once the pipeline has run
        case.name += f" cache skipped {1 - stats['tokens_computed'] / stats['tokens_total']:.0%}"
        return providers

    case = Case(f"tiny pipeline ar_step{ar_step} 17f 32x32 block2 steps{PIPELINE['steps']}", setup, timer=time_once)
    return case


@suite("skyreels", help="SkyReels-V2 DF transformer call: stock diffusers vs fastdf.integrations.diffusers")
def cases(device, quick):
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    names = list(shapes)[-1:] if quick else list(shapes)
    cases = [_case(name, shapes[name], device, quick) for name in names]
    if not quick and device.type == "cpu":  # seconds per case: the full set only
        cases += [_pipeline_case(ar_step) for ar_step in (0, 5)]
    return cases

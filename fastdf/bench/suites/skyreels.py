"""Suite ``skyreels``: one SkyReels-V2 DF transformer call, stock diffusers vs
``fastdf.integrations.diffusers.apply`` (diffusion forcing, ``causal_block_size=5``).

The stock forward builds a dense [L, L] boolean mask (SDPA turns it into a bias) and
repeats the per-frame AdaLN table to an fp32 [B, 6, L, C] tensor; fastdf does neither
(frame-block-causal df_attention, per-frame adaln_modulate / gated_residual). On the GPU
the case is the 1.3B-540P shape with random weights (30 layers, 12 heads x 128, dim 1536,
25 latent frames x 2040 tokens, bf16) and the CLI also records peak memory; on the CPU a
reduced width/depth (time only: CPU numbers show the algorithmic difference, not kernels).
Needs diffusers (``pip install fastdf[diffusers]``); without it the cases are skipped.
"""

from __future__ import annotations

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


@suite("skyreels", help="SkyReels-V2 DF transformer call: stock diffusers vs fastdf.integrations.diffusers")
def cases(device, quick):
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    names = list(shapes)[-1:] if quick else list(shapes)
    return [_case(name, shapes[name], device, quick) for name in names]

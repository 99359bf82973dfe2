"""SkyReels-V2 Diffusion Forcing through diffusers, stock vs fastdf, on a tiny random pipeline.

    python -m fastdf.examples.skyreels_df            # ~10-30 s on a 2-core CPU
    python -m fastdf.examples.skyreels_df --help

Builds a ``SkyReelsV2DiffusionForcingPipeline`` from configs in code (tiny random
``SkyReelsV2Transformer3DModel``, ``AutoencoderKLWan``, UniPC flow scheduler, tiny UMT5 text
encoder whose embeddings are passed as ``prompt_embeds``; nothing is downloaded), then runs
the same asynchronous schedule three times: stock, with ``fastdf.integrations.diffusers.apply``
and with ``apply(cache=True)``. Prints the wall times, the max difference of each decoded
video from stock, the fraction of frame-block tokens the cache skipped and the peak memory
(CUDA only), and writes the fastdf video's frames as a PNG strip.

On a real checkpoint the change is two lines::

    import fastdf.integrations.diffusers as fdd
    fdd.apply(pipe.transformer, cache=True)

Exit status 1 when a video differs from stock by more than ``TOLERANCE``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

# Decoded videos are in [0, 1]; fastdf and stock differ by fp32 reassociation only (the
# integration tests bound it by twice torch's own fp32-vs-fp64 error, ~1e-6 here), so a
# difference above this is a bug, not rounding.
TOLERANCE = 1e-4


# kind -> the diffusers pipeline class tiny_pipeline builds
PIPELINES = {"t2v": "SkyReelsV2DiffusionForcingPipeline", "i2v": "SkyReelsV2DiffusionForcingImageToVideoPipeline",
             "v2v": "SkyReelsV2DiffusionForcingVideoToVideoPipeline"}


def tiny_pipeline(transformer, device="cpu", kind="t2v"):
    """``(pipe, prompt_embeds, negative_prompt_embeds)``: ``transformer`` in a SkyReels-V2
    Diffusion Forcing pipeline (``kind``: "t2v" ``SkyReelsV2DiffusionForcingPipeline``, "i2v"
    ``...ImageToVideoPipeline``, "v2v" ``...VideoToVideoPipeline``; all three take the same
    components: the DF I2V pipeline conditions through VAE latents, not an image encoder)
    with a tiny Wan VAE, a UniPC flow scheduler, a tiny UMT5 encoder and a word-level
    tokenizer, all built from configs (no download). The pipelines' own prompt path needs
    ``ftfy``, so the prompts are encoded here."""
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a str, one of {sorted(PIPELINES)}, got {type(kind).__name__}")
    if kind not in PIPELINES:
        raise ValueError(f"kind must be one of {sorted(PIPELINES)}, got {kind!r}")
    import diffusers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = "a cat dog runs on the beach red blue".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=16, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                               relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    pipeline_cls = getattr(diffusers, PIPELINES[kind])
    pipe = pipeline_cls(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                        scheduler=scheduler).to(device)
    pipe.set_progress_bar_config(disable=True)

    def embed(text):
        ids = tokenizer([text], padding="max_length", max_length=8, return_tensors="pt").to(device)
        with torch.no_grad():
            return text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state

    return pipe, embed("a cat runs on the beach"), embed("blue dog")


def build_pipeline(device="cpu", seed=0):
    """:func:`tiny_pipeline` around a tiny random SkyReels-V2 transformer."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(seed)
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=64,
        inject_sample_info=True, num_frame_per_block=1).eval()
    with torch.no_grad():  # random AdaLN / gate tables, so every path contributes to the output
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return tiny_pipeline(transformer, device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastdf.examples.skyreels_df", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--frames", type=int, default=17, help="video frames (the Wan VAE needs 4k + 1)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps")
    p.add_argument("--ar-step", type=int, default=2, help="asynchronous step offset between frame blocks (0 = sync)")
    p.add_argument("--block", type=int, default=2, help="causal_block_size (latent frames per block)")
    p.add_argument("--size", type=int, default=32, help="frame side in pixels (a multiple of 16)")
    p.add_argument("--out", default="skyreels_df.png", help="PNG strip to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.frames < 1 or (args.frames - 1) % 4:
        p.error("--frames must be 4k + 1 (k >= 0)")
    for name in ("steps", "block"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.ar_step < 0:
        p.error("--ar-step must be >= 0")
    if args.ar_step > 0 and args.block < 2:
        p.error("--ar-step > 0 needs --block >= 2 (the pipeline's asynchronous mode)")
    if args.size < 16 or args.size % 16:
        p.error("--size must be a positive multiple of 16")
    return args


def _timed(fn, device):
    """``(result, seconds, peak MiB or None)``; peak memory only where CUDA reports it."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return out, seconds, (torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None)


def write_strip(video, path):
    """``video`` [F, H, W, 3] in [0, 1] -> one PNG row of frames (4x nearest upscale)."""
    from PIL import Image

    frames = torch.as_tensor(video).clamp(0, 1)
    row = torch.cat(list(frames), dim=1)  # [H, F*W, 3]
    img = Image.fromarray((row * 255).round().to(torch.uint8).numpy())
    img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def run(args) -> dict:
    """Runs stock / fastdf / fastdf+cache; returns times (s), peak MiB, max differences from
    stock, the cache's skipped token fraction and the PNG path."""
    import fastdf.integrations.diffusers as fdd

    device = torch.device(args.device)
    pipe, prompt, negative = build_pipeline(device, args.seed)
    stock_transformer = pipe.transformer
    options = dict(num_frames=args.frames, causal_block_size=args.block, ar_step=args.ar_step)
    if args.ar_step > 0:
        # asynchronous mode needs a window of several blocks: the whole latent video here
        options["base_num_frames"] = args.frames

    def generate():
        return pipe(None, prompt_embeds=prompt, negative_prompt_embeds=negative, height=args.size, width=args.size,
                    num_inference_steps=args.steps, guidance_scale=3.0, max_sequence_length=8, output_type="pt",
                    generator=torch.Generator(device).manual_seed(args.seed), **options).frames[0]

    results = {}
    videos = {}
    runs = [("stock", lambda: stock_transformer), ("fastdf", lambda: fdd.apply(copy.deepcopy(stock_transformer))),
            ("fastdf cache", lambda: fdd.apply(copy.deepcopy(stock_transformer), cache=True))]
    for name, make in runs:
        pipe.transformer = make()
        with torch.no_grad():
            generate()  # warm-up: first-call costs (lazy init, kernel selection) are not the method's
            videos[name], seconds, peak = _timed(generate, device)
        results[name] = {"seconds": seconds, "peak_mib": peak}
        if name == "fastdf cache":
            stats = fdd.cache_stats(pipe.transformer)  # warm-up and timed run: the same fraction
            results[name]["skipped"] = 1 - stats["tokens_computed"] / stats["tokens_total"]
    for name in ("fastdf", "fastdf cache"):
        results[name]["max_diff"] = (videos[name].float() - videos["stock"].float()).abs().max().item()
    # output_type="pt": [F, C, H, W] in [0, 1]
    write_strip(videos["fastdf"].float().permute(0, 2, 3, 1).cpu(), args.out)
    results["png"] = str(args.out)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(f"tiny SkyReels-V2 DF pipeline: {args.frames} frames {args.size}x{args.size}, {args.steps} steps, "
          f"ar_step {args.ar_step}, causal_block_size {args.block}, device {args.device}")
    ok = True
    for name in ("stock", "fastdf", "fastdf cache"):
        r = results[name]
        peak = "n/a (CPU)" if r["peak_mib"] is None else f"{r['peak_mib']:.1f} MiB"
        line = f"{name:>13}: {r['seconds']:7.3f} s   peak memory {peak}"
        if "max_diff" in r:
            line += f"   max |video - stock| {r['max_diff']:.2e}"
            ok &= r["max_diff"] <= TOLERANCE
        if "skipped" in r:
            line += f"   cache skipped {100 * r['skipped']:.1f}% of frame-block tokens"
        print(line)
    print(f"wrote {results['png']}")
    if not ok:
        print(f"FAILED: a video differs from stock by more than {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

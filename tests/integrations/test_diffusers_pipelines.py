"""The image-to-video and video-to-video SkyReels-V2 Diffusion Forcing pipelines (diffusers
0.42.1) run unchanged with an applied transformer, with and without ``cache=True``.

Tiny components built from configs in code (the example's ``tiny_pipeline``); nothing is
downloaded. The DF I2V pipeline conditions through VAE latents of the image (a leading
latent frame with timestep 0, and with ``last_image`` a trailing one), not through an image
encoder, so it takes the same components as the T2V pipeline; the V2V pipeline encodes the
last ``overlap_history`` frames of the input video as a finished prefix. Comparisons use
the 2x-torch-error rule (the float64 stock transformer is the reference).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

import fastdf.integrations.diffusers as fdd  # noqa: E402
from fastdf.testing import assert_close_by_rule  # noqa: E402

from .test_diffusers import _model  # noqa: E402

SIZE = 16  # pixels; latent 2x2 with the tiny VAE, 1 token per latent frame after the 2x2 patch

CASES = {
    # name: (kind, pipeline options, whether the cache must skip some frame-block tokens)
    "i2v-sync": ("i2v", dict(num_frames=17, causal_block_size=1, ar_step=0), False),
    "i2v-async-last-image": ("i2v", dict(num_frames=17, causal_block_size=2, ar_step=2, last_image=True), True),
    "i2v-async-long-overlap": ("i2v", dict(num_frames=25, base_num_frames=17, overlap_history=5, causal_block_size=2,
                                           ar_step=2), True),
    # the V2V prefix (overlap_history=5 -> 2 latent frames) is a finished block: reused even in sync mode
    "v2v-sync-block2": ("v2v", dict(num_frames=17, base_num_frames=17, overlap_history=5, causal_block_size=2,
                                    ar_step=0), True),
    "v2v-sync-block1": ("v2v", dict(num_frames=17, base_num_frames=17, overlap_history=5, causal_block_size=1,
                                    ar_step=0), False),
    "v2v-async-long-overlap": ("v2v", dict(num_frames=25, base_num_frames=17, overlap_history=5, causal_block_size=2,
                                           ar_step=2), True),
}


def _conditioning(kind, options):
    g = torch.Generator().manual_seed(11)
    if kind == "i2v":
        cond = dict(image=torch.rand(1, 3, SIZE, SIZE, generator=g))
        if options.pop("last_image", False):
            cond["last_image"] = torch.rand(1, 3, SIZE, SIZE, generator=g)
        return cond
    return dict(video=list(torch.rand(9, 3, SIZE, SIZE, generator=g).unbind(0)))  # 9 frames of [3, H, W]


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_stock_with_and_without_cache(case):
    from fastdf.examples.skyreels_df import tiny_pipeline

    kind, options, must_skip = CASES[case]
    options = dict(options)
    cond = _conditioning(kind, options)
    transformer = _model(inject_sample_info=True)
    torch.manual_seed(3)
    pipe, prompt, negative = tiny_pipeline(transformer, kind=kind)

    def run(model, output_type="latent"):
        pipe.transformer = model
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=SIZE, width=SIZE,
                    num_inference_steps=3, guidance_scale=3.0, max_sequence_length=8, output_type=output_type,
                    generator=torch.Generator().manual_seed(0), **cond, **options).frames

    stock = run(transformer)
    ref = run(copy.deepcopy(transformer).double())
    fast = run(fdd.apply(copy.deepcopy(transformer)))
    cached_model = fdd.apply(copy.deepcopy(transformer), cache=True)
    cached = run(cached_model)
    assert fast.shape == stock.shape == cached.shape
    assert_close_by_rule(fast, ref, stock)
    assert_close_by_rule(cached, ref, stock)
    torch.testing.assert_close(cached, fast, rtol=1e-5, atol=1e-5)  # the cache changes no arithmetic
    stats = fdd.cache_stats(cached_model)
    assert stats["calls"] > 0
    if must_skip:  # finished leading blocks (conditioning prefix, or denoised in async mode) reused
        assert stats["tokens_computed"] < stats["tokens_total"]
    else:  # one-frame blocks attend bidirectionally: nothing is reusable
        assert stats["tokens_computed"] == stats["tokens_total"]
    # maybe_free_model_hooks at the end of __call__ freed the cache
    assert cached_model._diffusers_hook.get_hook(fdd.HOOK_NAME).state_manager._state_cache == {}


@pytest.mark.parametrize("kind", ["i2v", "v2v"])
def test_decoded_video(kind):
    """Decoded through the pipelines' VAE path: same frames as stock (V2V prepends the input
    video's frames to the generated ones)."""
    from fastdf.examples.skyreels_df import tiny_pipeline

    options = dict(num_frames=17, base_num_frames=17, causal_block_size=2, ar_step=2)
    if kind == "v2v":
        options["overlap_history"] = 5
    cond = _conditioning(kind, options)
    transformer = _model(inject_sample_info=True)
    torch.manual_seed(3)
    pipe, prompt, negative = tiny_pipeline(transformer, kind=kind)

    def run(model):
        pipe.transformer = model
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=SIZE, width=SIZE,
                    num_inference_steps=2, guidance_scale=3.0, max_sequence_length=8, output_type="pt",
                    generator=torch.Generator().manual_seed(0), **cond, **options).frames

    stock = run(transformer)
    fast = run(fdd.apply(copy.deepcopy(transformer), cache=True))
    frames = 17 + (9 if kind == "v2v" else 0)
    assert stock.shape == fast.shape == (1, frames, 3, SIZE, SIZE)
    # videos in [0, 1]; the latents agree by the rule above, decoding adds fp32 rounding only
    torch.testing.assert_close(fast, stock, rtol=0, atol=1e-4)
    assert stock.std() > 0


def test_tiny_pipeline_kind_checked():
    from fastdf.examples.skyreels_df import tiny_pipeline

    with pytest.raises(ValueError, match="kind"):
        tiny_pipeline(_model(), kind="t2i")

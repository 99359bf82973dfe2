"""apply(transformer, cache=True): exact reuse of unchanged leading frame blocks within a
cache_context, checked against the uncached fastdf forward (and, end to end, the pipeline)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

import fastdf.integrations.diffusers as fdd  # noqa: E402

from .test_diffusers import _inputs, _model, _tiny_pipeline  # noqa: E402

BLOCK = 2  # num_frame_per_block


def _pair(**overrides):
    model = _model(num_frame_per_block=BLOCK, **overrides)
    return fdd.apply(copy.deepcopy(model)), fdd.apply(model, cache=True)


def _call(model, kw, context="cond"):
    with torch.no_grad():
        if context is None:
            return model(**kw)[0]
        with model.cache_context(context):
            return model(**kw)[0]


def _schedule(kw, steps=4):
    """Async-like calls: block 0 finished (fixed latents, timestep 0), later frames changing;
    then the window grows by a block (prefix unchanged)."""
    g = torch.Generator().manual_seed(7)
    calls = []
    cur = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    cur["timestep"][:, :BLOCK] = 0
    for _ in range(steps):
        cur = dict(cur, hidden_states=cur["hidden_states"].clone(), timestep=cur["timestep"].clone())
        cur["hidden_states"][:, :, BLOCK:] = torch.randn(cur["hidden_states"][:, :, BLOCK:].shape, generator=g)
        cur["timestep"][:, BLOCK:] = torch.randint(1, 1000, cur["timestep"][:, BLOCK:].shape, generator=g)
        calls.append(cur)
    grown = dict(cur, hidden_states=torch.cat([cur["hidden_states"], torch.randn(
        cur["hidden_states"][:, :, :BLOCK].shape, generator=g)], dim=2),
        timestep=torch.cat([cur["timestep"], torch.full_like(cur["timestep"][:, :BLOCK], 999)], dim=1))
    calls.append(grown)
    return calls


@pytest.mark.parametrize("batch", [1, 2])
def test_async_schedule_matches_uncached(batch):
    plain, cached = _pair(inject_sample_info=True)
    kw = _inputs(plain, batch=batch, frames=6, fps=[0] * batch)
    calls = _schedule(kw)
    for c in calls:
        ref = _call(plain, c, None)
        out = _call(cached, c)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    stats = fdd.cache_stats(cached)
    tokens_per_frame = 3 * 4
    # first call full; the changing-tail calls reuse block 0; the grown window's first six
    # frames are exactly the previous call's, so only its new block is computed
    full = [c["hidden_states"].shape[2] * tokens_per_frame for c in calls]
    expected = full[0] + sum(f - BLOCK * tokens_per_frame for f in full[1:-1]) + BLOCK * tokens_per_frame
    assert stats["calls"] == len(calls) and stats["tokens_total"] == sum(full)
    assert stats["tokens_computed"] == expected


def test_changed_leading_block_recomputes_and_identical_call_reuses_all():
    plain, cached = _pair()
    kw = _inputs(plain, frames=6)
    first = _call(cached, kw)
    changed = dict(kw, hidden_states=kw["hidden_states"].clone())
    changed["hidden_states"][:, :, 0, 0, 0] += 1e-3  # block 0 differs: nothing is reusable
    before = fdd.cache_stats(cached)["tokens_computed"]
    torch.testing.assert_close(_call(cached, changed), _call(plain, changed, None), rtol=1e-6, atol=1e-6)
    assert fdd.cache_stats(cached)["tokens_computed"] - before == 6 * 12
    ts = dict(changed, timestep=changed["timestep"].clone())
    ts["timestep"][:, 2] += 1  # block 1's timestep differs: block 0 reused only
    before = fdd.cache_stats(cached)["tokens_computed"]
    torch.testing.assert_close(_call(cached, ts), _call(plain, ts, None), rtol=1e-6, atol=1e-6)
    assert fdd.cache_stats(cached)["tokens_computed"] - before == 4 * 12
    text = dict(ts, encoder_hidden_states=ts["encoder_hidden_states"] + 1)  # text differs: all recomputed
    before = fdd.cache_stats(cached)["tokens_computed"]
    torch.testing.assert_close(_call(cached, text), _call(plain, text, None), rtol=1e-6, atol=1e-6)
    assert fdd.cache_stats(cached)["tokens_computed"] - before == 6 * 12
    before = fdd.cache_stats(cached)["tokens_computed"]
    torch.testing.assert_close(_call(cached, text), _call(plain, text, None), rtol=1e-6, atol=1e-6)
    assert fdd.cache_stats(cached)["tokens_computed"] == before  # identical call: every block reused
    assert first.shape == _call(plain, kw, None).shape


def test_contexts_kept_separate_and_freed():
    plain, cached = _pair()
    kw = _inputs(plain, frames=6)
    neg = dict(kw, encoder_hidden_states=torch.randn_like(kw["encoder_hidden_states"]))
    for c in _schedule(kw, steps=3):
        n = dict(c, encoder_hidden_states=neg["encoder_hidden_states"])
        torch.testing.assert_close(_call(cached, c, "cond"), _call(plain, c, None), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(_call(cached, n, "uncond"), _call(plain, n, None), rtol=1e-6, atol=1e-6)
    stats = fdd.cache_stats(cached)
    # per context: a full call, two calls reusing block 0, the grown call computing its new
    # block only; if the contexts shared a cache, the alternating text would invalidate all
    assert stats["tokens_computed"] == 2 * (6 * 12 + 2 * 4 * 12 + 2 * 12)
    hook = cached._diffusers_hook.get_hook(fdd.HOOK_NAME)
    assert set(hook.state_manager._state_cache) == {"cond", "uncond"}
    # outside a context: the uncached forward, nothing stored or reused
    before = stats["tokens_computed"]
    _call(cached, kw, None)
    _call(cached, kw, None)
    assert fdd.cache_stats(cached)["tokens_computed"] - before == 2 * 6 * 12
    cached._diffusers_hook.reset_stateful_hooks()
    assert hook.state_manager._state_cache == {}
    _call(cached, kw)
    fdd.remove(cached)
    assert hook.state_manager._state_cache == {}
    assert not fdd.is_applied(cached)


def test_autograd_and_single_frame_blocks_bypass_the_cache():
    plain, cached = _pair()
    kw = _inputs(plain, frames=6)
    _call(cached, kw)
    with cached.cache_context("cond"):
        out = cached(**kw)[0]  # grad enabled: no reuse, a graph to the weights
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), _call(plain, kw, None), rtol=1e-6, atol=1e-6)
    assert fdd.cache_stats(cached)["tokens_computed"] == 2 * 6 * 12
    one = fdd.apply(_model(num_frame_per_block=1), cache=True)  # bidirectional: nothing reusable
    kw1 = _inputs(one, frames=4)
    _call(one, kw1)
    _call(one, kw1)
    assert fdd.cache_stats(one)["tokens_computed"] == 2 * 4 * 12
    assert fdd.cache_stats(fdd.apply(_model())) == {}


PIPELINE_CASES = {
    "async": dict(num_frames=17, causal_block_size=2, ar_step=2),
    "async-long-overlap": dict(num_frames=25, base_num_frames=17, overlap_history=5, causal_block_size=2, ar_step=2),
}


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_pipeline_async_cache_matches_uncached_and_skips(case):
    import time

    options = PIPELINE_CASES[case]
    transformer = _model(inject_sample_info=True)
    pipe, prompt, negative = _tiny_pipeline(transformer)

    def run():
        t0 = time.perf_counter()
        out = pipe(None, prompt_embeds=prompt, negative_prompt_embeds=negative, height=16, width=16,
                   num_inference_steps=3, guidance_scale=3.0, max_sequence_length=8, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **options).frames
        return out, time.perf_counter() - t0

    pipe.transformer = fdd.apply(copy.deepcopy(transformer))
    plain, t_plain = run()
    pipe.transformer = fdd.apply(transformer, cache=True)
    cached, t_cached = run()
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    stats = fdd.cache_stats(transformer)
    assert stats["tokens_computed"] < stats["tokens_total"]
    # the pipeline's maybe_free_model_hooks reset the stateful hooks: the cache is freed
    assert transformer._diffusers_hook.get_hook(fdd.HOOK_NAME).state_manager._state_cache == {}
    print(f"pipeline {case}: tokens computed {stats['tokens_computed']}/{stats['tokens_total']}, "
          f"time {t_cached:.3f}s cached vs {t_plain:.3f}s")


def test_triton_backend_cached_matches_uncached():
    """The cached call's Tq < Tk attention through the Triton kernels (interpreted on CPU)."""
    import fastdf

    model = _model(num_frame_per_block=BLOCK, num_layers=1)
    plain, cached = fdd.apply(copy.deepcopy(model)), fdd.apply(model, cache=True)
    kw = _inputs(plain, frames=4, height=4, width=4)
    with fastdf.backend("triton"):
        calls = _schedule(kw, steps=2)
        for c in calls:
            torch.testing.assert_close(_call(cached, c), _call(plain, c, None), rtol=1e-5, atol=1e-5)
    assert fdd.cache_stats(cached)["tokens_computed"] < fdd.cache_stats(cached)["tokens_total"]


def test_image_conditioning_and_lora_scale_are_part_of_the_key():
    plain, cached = _pair(image_dim=8, added_kv_proj_dim=24)
    kw = _inputs(plain, frames=4, height=4, width=4, image=True)
    torch.testing.assert_close(_call(cached, kw), _call(plain, kw, None), rtol=1e-6, atol=1e-6)
    other = dict(kw, encoder_hidden_states_image=kw["encoder_hidden_states_image"] + 1)
    before = fdd.cache_stats(cached)["tokens_computed"]
    torch.testing.assert_close(_call(cached, other), _call(plain, other, None), rtol=1e-6, atol=1e-6)
    assert fdd.cache_stats(cached)["tokens_computed"] - before == 4 * 4  # image differs: all recomputed
    scaled = dict(other, attention_kwargs={"scale": 0.5})
    before = fdd.cache_stats(cached)["tokens_computed"]
    _call(cached, scaled)
    assert fdd.cache_stats(cached)["tokens_computed"] - before == 4 * 4  # LoRA scale differs: all recomputed

"""fastdf.integrations.diffusers against stock diffusers SkyReels-V2 (tiny models built
from configs; nothing is downloaded).

Every comparison uses the 2x-torch-error rule: the stock model run in float64 is the
reference, the stock model in the test dtype is torch's error, fastdf's error may be at
most twice that plus a floor. (The stock model computes its norms and residual sums in
fp32 even in float64, so the reference is only fp32-exact there; the fp16/bf16 cases are
where the rule bites.)
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

import fastdf  # noqa: E402
import fastdf.integrations.diffusers as fdd  # noqa: E402
from diffusers import SkyReelsV2Transformer3DModel  # noqa: E402
from diffusers.hooks import HookRegistry, ModelHook  # noqa: E402
from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2AttnProcessor  # noqa: E402
from fastdf.testing import assert_close_by_rule  # noqa: E402

TEXT_LEN = 512  # the stock processor hard-codes 512 text tokens when image tokens are present


def _config(**overrides):
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, eps=1e-6,
               rope_max_seq_len=64, inject_sample_info=False, num_frame_per_block=1)
    cfg.update(overrides)
    return cfg


def _model(dtype=torch.float32, seed=0, **overrides):
    """A random tiny model; in fp16/bf16 the modules diffusers keeps in fp32 stay fp32, as
    from_pretrained(torch_dtype=...) leaves them."""
    torch.manual_seed(seed)
    model = SkyReelsV2Transformer3DModel(**_config(**overrides)).eval()
    with torch.no_grad():  # scale_shift_table is random already; make the other tables non-trivial too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if dtype != torch.float32:
        model.to(dtype)
        keep = model._keep_in_fp32_modules
        for name, module in model.named_modules():
            if any(k in name.split(".") for k in keep):
                module.float()
        for name, p in model.named_parameters():
            if name.split(".")[-1] in keep:
                p.data = p.data.float()
    return model


def _inputs(model, *, batch=1, frames=4, height=6, width=8, df=True, image=False, fps=None, dtype=torch.float32,
            seed=1, text_len=8):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    kw = dict(hidden_states=torch.randn(batch, cfg.in_channels, frames, height, width, generator=g).to(dtype),
              encoder_hidden_states=torch.randn(batch, TEXT_LEN if image else text_len, cfg.text_dim,
                                                generator=g).to(dtype),
              enable_diffusion_forcing=df, return_dict=False)
    shape = (batch, frames) if df else (batch,)
    kw["timestep"] = torch.randint(0, 1000, shape, generator=g)
    if image:
        kw["encoder_hidden_states_image"] = torch.randn(batch, 3, cfg.image_dim, generator=g).to(dtype)
    if fps is not None:
        kw["fps"] = fps
    return kw


def _to64(kw):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}


def _check_against_stock(model, kw, *, factor=2.0):
    """fastdf on a copy of ``model`` vs the stock model (its dtype and float64)."""
    ref = copy.deepcopy(model).double()(**_to64(kw))[0]
    stock = model(**kw)[0]
    fast = fdd.apply(copy.deepcopy(model))(**kw)[0]
    assert fast.dtype == stock.dtype and fast.shape == stock.shape
    assert_close_by_rule(fast, ref, stock, factor=factor)
    return fast, stock


IMAGE = dict(image_dim=8, added_kv_proj_dim=24)

CASES = {
    # name: (model overrides, input overrides, dtype)
    "df-block2-fps-image": (dict(num_frame_per_block=2, inject_sample_info=True, **IMAGE),
                            dict(df=True, image=True, fps=[1]), torch.float32),
    "df-block1-batch2": (dict(), dict(df=True, batch=2), torch.float32),
    "df-block2-batch2-fps": (dict(num_frame_per_block=2, inject_sample_info=True), dict(df=True, batch=2, fps=[0]),
                             torch.float32),
    "nodf-block1-image-batch2": (dict(**IMAGE), dict(df=False, image=True, batch=2), torch.float32),
    "nodf-block2-fps-batch2": (dict(num_frame_per_block=2, inject_sample_info=True),
                               dict(df=False, batch=2, fps=[0, 1]), torch.float32),
    "df-block3-frames6": (dict(num_frame_per_block=3), dict(df=True, frames=6), torch.float32),
    "fp16-df-block2-fps-image-batch2": (dict(num_frame_per_block=2, inject_sample_info=True, **IMAGE),
                                        dict(df=True, image=True, batch=2, fps=[1]), torch.float16),
    "fp16-nodf-block1": (dict(), dict(df=False), torch.float16),
    "bf16-df-block2": (dict(num_frame_per_block=2), dict(df=True, batch=2), torch.bfloat16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_stock(case):
    overrides, inputs, dtype = CASES[case]
    model = _model(dtype, **overrides)
    kw = _inputs(model, dtype=dtype, **inputs)
    with torch.no_grad():
        fast, stock = _check_against_stock(model, kw)
    assert not torch.equal(fast, torch.zeros_like(fast))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backend_matches_stock(dtype, monkeypatch):
    """The Triton kernels (interpreted on CPU) behind the same integration."""
    import fastdf.kernels.adaln as adaln_kernels
    import fastdf.kernels.attention as attention_kernels

    calls = []
    for module, name in ((attention_kernels, "attention_forward"), (adaln_kernels, "modulate_forward"),
                         (adaln_kernels, "gated_forward")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model = _model(dtype, num_frame_per_block=2, inject_sample_info=True, num_layers=1)
    kw = _inputs(model, dtype=dtype, df=True, frames=4, height=4, width=4, fps=[1])
    with torch.no_grad(), fastdf.backend("triton"):
        _check_against_stock(model, kw)
    # one layer: 1 attention, 2 + 1 (output norm) modulations, 2 gated residuals
    assert sorted(calls) == sorted(["attention_forward"] + ["modulate_forward"] * 3 + ["gated_forward"] * 2)


def test_block_causality():
    """Frames after a block never change the outputs of that block (and do change later ones)."""
    model = fdd.apply(_model(num_frame_per_block=2))
    kw = _inputs(model, df=True, frames=6)
    with torch.no_grad():
        out = model(**kw)[0]
        kw2 = dict(kw, hidden_states=kw["hidden_states"].clone())
        kw2["hidden_states"][:, :, 4:] += 1.0
        out2 = model(**kw2)[0]
    torch.testing.assert_close(out2[:, :, :4], out[:, :, :4], rtol=0, atol=1e-6)
    assert (out2[:, :, 4:] - out[:, :, 4:]).abs().max() > 1e-3


def test_fps_per_row_where_stock_fails():
    """With diffusion forcing and several fps values, the stock forward raises; fastdf gives
    each row its own fps (the same as calling row by row)."""
    model = _model(inject_sample_info=True, num_frame_per_block=2)
    kw = _inputs(model, df=True, batch=2, fps=[0, 1])
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            model(**kw)
        fast = fdd.apply(model)(**kw)[0]
        for b in range(2):
            row = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            row["fps"] = [kw["fps"][b]]
            torch.testing.assert_close(fast[b:b + 1], model(**row)[0], rtol=1e-5, atol=1e-6)


def _grads(model, kw, weight):
    model.zero_grad(set_to_none=True)
    x = kw["hidden_states"].clone().requires_grad_(True)
    out = model(**dict(kw, hidden_states=x))[0]
    (out * weight.to(out.dtype)).sum().backward()
    named = {"hidden_states": x.grad}
    named.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return named


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_match_stock(checkpointing):
    model = _model(num_frame_per_block=2, inject_sample_info=True, **IMAGE).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    kw = _inputs(model, df=True, image=True, batch=2, fps=[1])
    weight = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(5))
    ref = _grads(copy.deepcopy(model).double(), _to64(kw), weight.double())
    stock = _grads(model, kw, weight)
    fast_model = fdd.apply(copy.deepcopy(model))
    fast = _grads(fast_model, kw, weight)
    assert set(fast) == set(stock) == set(ref)
    assert "blocks.0.scale_shift_table" in fast and "fps_projection.net.0.proj.weight" in fast
    for name in ref:
        assert_close_by_rule(fast[name], ref[name], stock[name], name=name)


def test_remove_restores_stock_bitwise():
    model = _model(num_frame_per_block=2, inject_sample_info=True)
    kw = _inputs(model, df=True, batch=2, fps=[1])
    processors = dict(model.attn_processors)
    with torch.no_grad():
        before = model(**kw)[0]
        fdd.apply(model)
        assert fdd.is_applied(model)
        assert all(isinstance(p, fdd.FastdfSkyReelsAttnProcessor)
                   for n, p in model.attn_processors.items() if ".attn1." in n)
        assert all(type(p) is SkyReelsV2AttnProcessor for n, p in model.attn_processors.items() if ".attn2." in n)
        during = model(**kw)[0]
        fdd.remove(model)
        after = model(**kw)[0]
    assert not torch.equal(during, before)  # the fastdf path really ran (different rounding)
    assert torch.equal(after, before)
    assert not fdd.is_applied(model)
    assert all(model.attn_processors[n] is p for n, p in processors.items())
    for module in (model, *model.blocks):
        assert "forward" not in module.__dict__ and not hasattr(module, "_diffusers_hook")
    fdd.apply(model)  # and it can be applied again
    fdd.remove(model)


def test_pipeline_cache_context_and_later_hooks():
    """cache_context (the pipelines wrap each call in one) creates a HookRegistry first;
    apply still works, and a hook registered after apply wraps the fastdf forward and
    survives remove."""

    class Count(ModelHook):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    model = _model(num_frame_per_block=2)
    kw = _inputs(model, df=True)
    with torch.no_grad():
        with model.cache_context("cond"):
            stock = model(**kw)[0]
        fdd.apply(model)
        counter = Count()
        HookRegistry.check_if_exists_or_initialize(model.blocks[0]).register_hook(counter, "count")
        with model.cache_context("cond"):
            fast = model(**kw)[0]
        assert counter.calls == 1
        fdd.remove(model)
        with model.cache_context("cond"):
            again = model(**kw)[0]
    assert counter.calls == 2
    assert torch.equal(again, stock)
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-6)


def _state(model):
    return (dict(model.attn_processors), {id(m): ("forward" in m.__dict__, getattr(m, "_diffusers_hook", None))
                                          for m in (model, *model.blocks)}, fdd.is_applied(model))


def test_refusals_leave_model_unchanged():
    model = _model(num_frame_per_block=2)
    with pytest.raises(TypeError, match="transformer"):
        fdd.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cache"):
        fdd.apply(model, cache=1)
    with pytest.raises(TypeError, match="transformer"):
        fdd.remove(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not applied"):
        fdd.remove(model)

    before = _state(model)
    fdd.remove(fdd.apply(model, cache=True))  # cache=True is served (tests/integrations/test_diffusers_cache.py)
    assert _state(model) == before
    with pytest.raises(ValueError, match="not applied"):
        fdd.cache_stats(model)

    # a custom self-attention processor cannot be served exactly
    custom = {n: (SkyReelsV2AttnProcessor() if n == "blocks.1.attn1.processor" else p)
              for n, p in model.attn_processors.items()}

    class MyProcessor(SkyReelsV2AttnProcessor):
        pass

    custom["blocks.1.attn1.processor"] = MyProcessor()
    model.set_attn_processor(custom)
    before = _state(model)
    with pytest.raises(ValueError, match="MyProcessor"):
        fdd.apply(model)
    assert _state(model) == before

    # hooks already on a block would be bypassed
    model = _model(num_frame_per_block=2)
    HookRegistry.check_if_exists_or_initialize(model.blocks[1]).register_hook(ModelHook(), "other")
    before = _state(model)
    with pytest.raises(ValueError, match="hooks"):
        fdd.apply(model)
    assert _state(model) == before

    model = fdd.apply(_model())
    with pytest.raises(ValueError, match="already applied"):
        fdd.apply(model)


def test_call_time_errors():
    model = fdd.apply(_model(num_frame_per_block=2, inject_sample_info=True))
    kw = _inputs(model, df=True, frames=4, fps=[1])
    with torch.no_grad():
        with pytest.raises(ValueError, match="timestep"):
            model(**dict(kw, timestep=kw["timestep"][:, :3]))
        with pytest.raises(ValueError, match="timestep"):
            model(**dict(kw, enable_diffusion_forcing=False))
        with pytest.raises(ValueError, match="num_frame_per_block"):
            model(**_inputs(model, df=True, frames=5, fps=[1]))
        with pytest.raises(ValueError, match="fps"):
            model(**dict(kw, fps=None))
        with pytest.raises(ValueError, match="fps"):
            model(**dict(kw, fps=[3]))
        with pytest.raises(ValueError, match="encoder_hidden_states_image"):
            model(**dict(kw, encoder_hidden_states_image=torch.randn(1, 3, 8)))


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Largest tensor any top-level aten/custom op returns (fastdf ops are one custom op each,
    so their internals are not looked into)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_mask_or_per_token_table_allocated():
    model = _model(num_frame_per_block=2, attention_head_dim=12, num_attention_heads=2, ffn_dim=32)
    kw = _inputs(model, df=True, frames=4, height=8, width=12)  # L = 4 * 4 * 6 = 96 tokens, C = 24
    L, C = 96, 24
    limit = min(L * L, 6 * L * C)  # the stock mask and per-token table; everything else is smaller
    with torch.no_grad():
        with _Allocations() as stock:
            model(**kw)
        fdd.apply(model)
        with _Allocations() as fast:
            model(**kw)
    assert stock.largest >= limit  # the check sees the stock allocations
    assert fast.largest < limit, fast.largest


def test_float64_matches_stock():
    """In float64 (torch backend) fastdf and the stock model agree to fp32 rounding (the stock
    model casts its norms and residuals to fp32 even in float64)."""
    model = _model(torch.float32, num_frame_per_block=2, inject_sample_info=True).double()
    kw = _to64(_inputs(model, df=True, batch=2, fps=[1]))
    with torch.no_grad():
        stock = model(**kw)[0]
        fast = fdd.apply(copy.deepcopy(model))(**kw)[0]
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- the pipeline


def _tiny_pipeline(transformer):
    """The example's tiny pipeline (tiny Wan VAE, UniPC, tiny UMT5, word-level tokenizer;
    prompts encoded here since the pipeline's prompt path needs ``ftfy``)."""
    from fastdf.examples.skyreels_df import tiny_pipeline

    torch.manual_seed(3)
    return tiny_pipeline(transformer)


PIPELINE_CASES = {
    "sync": dict(num_frames=17, causal_block_size=1, ar_step=0),
    "async": dict(num_frames=17, causal_block_size=2, ar_step=2),
    "long-overlap": dict(num_frames=25, base_num_frames=17, overlap_history=5, causal_block_size=1, ar_step=0),
}


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_pipeline_end_to_end(case):
    """The unchanged pipeline with an applied transformer gives the stock latents (rule:
    float64 stock transformer as reference) and decodes to a video."""
    options = PIPELINE_CASES[case]
    transformer = _model(inject_sample_info=True)
    pipe, prompt, negative = _tiny_pipeline(transformer)

    def run(output_type="latent"):
        return pipe(None, prompt_embeds=prompt, negative_prompt_embeds=negative, height=16, width=16,
                    num_inference_steps=3, guidance_scale=3.0, max_sequence_length=8, output_type=output_type,
                    generator=torch.Generator().manual_seed(0), **options).frames

    stock = run()
    pipe.transformer = copy.deepcopy(transformer).double()
    ref = run()
    pipe.transformer = fdd.apply(transformer)
    fast = run()
    assert fast.shape == stock.shape
    assert_close_by_rule(fast, ref, stock)
    if case == "sync":
        video = run("np")
        assert video.shape == (1, options["num_frames"], 16, 16, 3) and video.min() >= 0 and video.max() <= 1


def test_bench_suite_registers_and_agrees():
    from fastdf.bench import core

    suites = core.load_suites()
    assert "skyreels" in suites
    (case,) = suites["skyreels"].cases(torch.device("cpu"), True)
    providers = case.setup(torch.device("cpu"))
    assert list(providers) == ["fastdf", "stock"]
    fast, stock = providers["fastdf"](), providers["stock"]()
    torch.testing.assert_close(fast, stock, rtol=1e-4, atol=1e-4)

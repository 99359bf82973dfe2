"""attn_implementation="fastdf" against "sdpa" on tiny Llama, Mistral (default and small
sliding windows) and Qwen2 (sliding layers) built from configs: logits under left, right,
both-sided and holed padding; greedy, sampled (fixed seed) and beam generation with dynamic
and static caches (a static sliding cache that rolls); classification heads with pad
masks; output_attentions; prepared 4-D masks (in disguise, and the exact slow path)."""

import copy
import sys
import warnings

import pytest
import torch

_HAD_KERNELS = "kernels" in sys.modules
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _forget_top_level_kernels():
    """As in test_hf_attention.py: drop the stray top-level ``kernels`` module transformers imports."""
    yield
    if not _HAD_KERNELS:
        sys.modules.pop("kernels", None)


import fastdf  # noqa: E402
import fastdf.integrations.hf_attention  # noqa: E402,F401  (registers "fastdf")

V = 97
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
MODELS = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {}),  # default sliding_window=4096: longer than any input
    "mistral-w5": (transformers.MistralConfig, dict(sliding_window=5)),
    "qwen2-w4": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
}


def _pair(name, head="CausalLM"):
    config_cls, overrides = MODELS[name]
    config = config_cls(**COMMON, **overrides)
    cls = getattr(transformers, config_cls.__name__.replace("Config", "For" + head))
    torch.manual_seed(0)
    sdpa = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="fastdf").eval()
    ours.load_state_dict(sdpa.state_dict())
    assert ours.config._attn_implementation == "fastdf"
    return sdpa, ours


def _batch(seed=0, T=12):
    """Rows: left padded, right padded, a hole plus both sides, no padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (4, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, T - 3:] = 0
    mask[2, 0] = mask[2, 5] = mask[2, T - 1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_sdpa_under_any_padding(name, backend):
    if fastdf.ops.unavailable_reason(backend, "cpu"):
        pytest.skip(f"{backend} cannot run CPU tensors here")
    sdpa, ours = _pair(name)
    ids, mask = _batch()
    with torch.no_grad(), fastdf.backend(backend):
        want = sdpa(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", ["llama", "mistral-w5", "qwen2-w4"])
def test_generation_matches_sdpa(name, cache):
    """Greedy, sampled and beam search from a batch with left, right and holed padding;
    12 prompt + 8 new tokens run a window of 4-5 through full and rolling caches."""
    sdpa, ours = _pair(name)
    ids, mask = _batch(seed=1)
    for kw in (dict(do_sample=False), dict(do_sample=True, top_k=5), dict(do_sample=False, num_beams=2)):
        kw.update(attention_mask=mask, max_new_tokens=8, pad_token_id=0, cache_implementation=cache)
        outs = []
        for model in (sdpa, ours):
            torch.manual_seed(3)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outs.append(model.generate(ids, **kw))
        assert torch.equal(outs[1], outs[0]), kw


def test_sequence_classification_with_pad_mask():
    sdpa, ours = _pair("mistral", head="SequenceClassification")
    ids, _ = _batch(seed=2)
    ids[1, 9:] = 0  # right padding only, as a tokenizer makes it: input_ids.ne(pad) is the mask
    mask = ids.ne(0).long()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits,
                                   atol=1e-4, rtol=1e-4)


def test_output_attentions_warns_and_returns_none_like_sdpa():
    _, ours = _pair("llama")
    ids, mask = _batch(seed=3)
    fastdf.integrations.hf_attention._WARNED.discard("output_attentions")
    with torch.no_grad(), pytest.warns(UserWarning, match="output_attentions=True returns None"):
        out = ours(ids, attention_mask=mask, output_attentions=True)
    assert out.attentions is None or all(a is None for a in out.attentions)


def test_prepared_4d_masks():
    """A causal+padding mask in disguise runs the kernel path; a packed-sequence mask (block
    diagonal) warns once and computes exactly through the slow path; both equal sdpa."""
    sdpa, ours = _pair("llama")
    ids, mask = _batch(seed=4)
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    disguised = (causal[None] & mask.bool()[:, None, :])[:, None]
    packed = causal.clone()
    packed[6:, :6] = False  # two packed documents per row
    packed = packed[None, None].expand(4, 1, T, T)
    float_mask = torch.zeros(4, 1, T, T).masked_fill(~disguised, torch.finfo(torch.float32).min)
    fastdf.integrations.hf_attention._WARNED.discard("prepared-mask")
    for m4, warns in ((disguised, False), (float_mask, False), (packed, True)):
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = ours(ids, attention_mask=m4).logits
            want = sdpa(ids, attention_mask=m4).logits
        assert any("prepared 4-D mask" in str(w.message) for w in caught) == warns
        rows = m4.reshape(4, T, T).bool().any(-1) if m4.dtype == torch.bool else disguised[:, 0].any(-1)
        torch.testing.assert_close(got[rows], want[rows], atol=1e-4, rtol=1e-4)

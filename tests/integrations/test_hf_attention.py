"""attn_implementation="fastdf" in HF transformers: same logits as "sdpa" on a tiny random
Llama (no padding, left padding, generation with a KV cache), clear errors otherwise."""

import copy
import sys

import pytest
import torch

_HAD_KERNELS = "kernels" in sys.modules
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _forget_top_level_kernels():
    """transformers probes for the HF ``kernels`` package by importing any top-level
    ``kernels`` it finds, and from a source checkout that is fastdf's ``kernels/`` folder.
    Drop that stray module again so the package-layout test still sees fastdf import none."""
    yield
    if not _HAD_KERNELS:
        sys.modules.pop("kernels", None)

import fastdf  # noqa: E402
import fastdf.integrations.hf_attention  # noqa: E402,F401  (registers "fastdf")
from fastdf.integrations.hf_attention import FastdfMask, fastdf_attention_forward  # noqa: E402


def _models(**overrides):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      **overrides)
    torch.manual_seed(0)
    # One config object each: the attention implementation is stored on it.
    sdpa = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ours = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="fastdf").eval()
    ours.load_state_dict(sdpa.state_dict())
    assert ours.config._attn_implementation == "fastdf" and sdpa.config._attn_implementation == "sdpa"
    return sdpa, ours


def _batch(lengths, total, seed=0):
    """Left-padded input_ids/attention_mask for rows of the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, total - n:] = 1
        ids[b, :total - n] = 0
    return ids, mask


def _compare_logits(ids, mask, name="torch"):
    """Logits of the fastdf model equal sdpa's on every real (unpadded) token."""
    if fastdf.ops.unavailable_reason(name, "cpu"):
        pytest.skip(f"{name} cannot run CPU tensors here")
    sdpa, ours = _models()
    with torch.no_grad(), fastdf.backend(name):
        want = sdpa(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_same_logits_as_sdpa(name):
    _compare_logits(_batch([13, 13], 13)[0], None, name)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_left_padding_matches_sdpa_on_real_tokens(name):
    _compare_logits(*_batch([11, 6, 1], 11), name)


def test_left_padded_generation_matches_sdpa():
    """Greedy decoding with a DynamicCache: prefill with left padding, then one query per step."""
    sdpa, ours = _models()
    ids, mask = _batch([9, 4], 9, seed=1)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = sdpa.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert torch.equal(got, want)


def test_right_padding_keeps_real_tokens_exact():
    ids, _ = _batch([8, 8], 8, seed=2)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    _compare_logits(ids, mask)


def test_gradients_flow_like_sdpa():
    sdpa, ours = _models()
    ids, _ = _batch([10, 10], 10, seed=3)
    sdpa.train()
    ours.train()
    loss_sdpa = sdpa(ids, labels=ids).loss
    loss_ours = ours(ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_sdpa)
    g_sdpa = torch.autograd.grad(loss_sdpa, list(sdpa.parameters()))
    g_ours = torch.autograd.grad(loss_ours, list(ours.parameters()))
    for a, b in zip(g_ours, g_sdpa):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_masks_it_cannot_express_raise():
    _, ours = _models()
    ids, _ = _batch([6, 6], 6)
    holes = torch.ones_like(ids)
    holes[0, 2] = 0
    with pytest.raises(ValueError, match="has holes"):
        ours(ids, attention_mask=holes)
    q = torch.randn(1, 4, 3, 16)
    k = torch.randn(1, 2, 3, 16)
    module = ours.model.layers[0].self_attn
    with pytest.raises(ValueError, match="prepared mask of type Tensor"):
        fastdf_attention_forward(module, q, k, k, torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention dropout"):
        fastdf_attention_forward(module, q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match="sliding_window"):
        fastdf_attention_forward(module, q, k, k, None, sliding_window=2)
    out, weights = fastdf_attention_forward(module, q[:, :, :2], k, k, FastdfMask(causal=True, kv_length=2))
    assert out.shape == (1, 2, 4, 16) and weights is None


def test_sliding_window_models_raise_clearly():
    config = transformers.MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    model = transformers.MistralForCausalLM._from_config(config, attn_implementation="fastdf").eval()
    with pytest.raises(ValueError, match="sliding"):
        model(torch.randint(0, 50, (1, 8)))


def test_mask_builder_cases():
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    from fastdf.integrations.hf_attention import fastdf_mask

    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert fastdf_mask(2, 4, 4, mask_function=causal_mask_function, attention_mask=torch.ones_like(left)) is None
    m = fastdf_mask(2, 4, 4, mask_function=causal_mask_function, attention_mask=left)
    assert m.causal and m.key_start.tolist() == [2, 0] and m.kv_length is None
    m = fastdf_mask(2, 4, 4, mask_function=bidirectional_mask_function, attention_mask=left)
    assert not m.causal and m.key_start.tolist() == [2, 0]
    with pytest.raises(ValueError, match="right padding with bidirectional"):
        fastdf_mask(2, 4, 4, mask_function=bidirectional_mask_function, attention_mask=left.flip(-1))
    m = fastdf_mask(2, 1, 16, q_offset=3, mask_function=causal_mask_function, attention_mask=None)
    assert m.kv_length == 4 and m.key_start is None  # a static cache: only the first 4 keys exist yet
    with pytest.raises(ValueError, match="kv_offset"):
        fastdf_mask(2, 1, 4, kv_offset=3, mask_function=causal_mask_function)

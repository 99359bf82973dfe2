"""attn_implementation="fastdf" in HF transformers: same logits as "sdpa" on a tiny random
Llama (no padding, left/right padding, holes, generation with a KV cache), the mask builder's
products, clear errors for what cannot be expressed. Whole-model paths (static caches,
sliding windows, classification heads, 4-D masks): test_hf_attention_models.py."""

import copy
import sys
import warnings

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
from fastdf.integrations.hf_attention import fastdf_attention_forward  # noqa: E402


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


def test_holes_and_right_padding_match_sdpa():
    ids, _ = _batch([8, 8], 8, seed=4)
    mask = torch.ones_like(ids)
    mask[0, 2] = 0  # a hole
    mask[1, :2] = 0  # both sides
    mask[1, 6:] = 0
    _compare_logits(ids, mask)


def test_what_it_cannot_express_raises_clearly():
    _, ours = _models()
    q = torch.randn(1, 4, 3, 16)
    k = torch.randn(1, 2, 3, 16)
    module = ours.model.layers[0].self_attn
    with pytest.raises(ValueError, match="attention dropout"):
        fastdf_attention_forward(module, q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match="softcap"):
        fastdf_attention_forward(module, q, k, k, None, softcap=30.0)
    with pytest.raises(ValueError, match="s_aux"):
        fastdf_attention_forward(module, q, k, k, None, s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        fastdf_attention_forward(module, q, k, k, None, sliding_window=0)
    with pytest.raises(ValueError, match="mask of type list"):
        fastdf_attention_forward(module, q, k, k, [[1]])


def test_mask_builder_products_survive_create_causal_mask():
    """The builder returns a real 4-D tensor, which HF's create_causal_mask passes through
    unchanged (generate with a compilable cache feeds it back into forward)."""
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function,
                                            sliding_window_causal_mask_function)

    from fastdf.integrations.hf_attention import fastdf_mask

    pad = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    assert fastdf_mask(2, 4, 4, mask_function=causal_mask_function) is None
    m = fastdf_mask(2, 4, 4, mask_function=causal_mask_function, attention_mask=pad)
    assert m.dtype == torch.uint8 and m.shape == (2, 1, 1, 4) and torch.equal(m[:, 0, 0].bool(), pad)
    m = fastdf_mask(2, 4, 4, mask_function=bidirectional_mask_function, attention_mask=pad)
    assert m.dtype == torch.int8 and torch.equal(m[:, 0, 0].bool(), pad)
    # a static cache's prefill: only the 4 keys in use, the unused tail is sliced off
    m = fastdf_mask(2, 4, 16, q_offset=torch.tensor(0), mask_function=causal_mask_function, attention_mask=None)
    assert m.shape == (2, 1, 1, 4) and bool(m.all())
    # a decode step at position 9 of a 16-key static cache with a window of 3: folded into the mask
    m = fastdf_mask(1, 1, 16, q_offset=torch.tensor(9), mask_function=sliding_window_causal_mask_function(3))
    assert m.shape == (1, 1, 1, 16) and m[0, 0, 0].nonzero().flatten().tolist() == [7, 8, 9]
    # a rolled sliding cache (keys start at position kv_offset): relative positions
    m = fastdf_mask(1, 1, 4, q_offset=12, kv_offset=9, mask_function=sliding_window_causal_mask_function(4),
                    attention_mask=torch.ones(1, 13, dtype=torch.bool))
    assert m[0, 0, 0].tolist() == [1, 1, 1, 1]
    # anything else: the exact boolean mask sdpa would get
    m = fastdf_mask(1, 3, 3, mask_function=lambda b, h, q, k: q >= 0, device="cpu")
    assert m.dtype == torch.bool and m.shape == (1, 1, 3, 3) and bool(m.all())


@pytest.mark.parametrize("dims", [(48, 32), (32, 48)], ids=["v-narrower", "v-wider"])
@pytest.mark.parametrize("mask_kind", ["causal", "padded", "custom"])
def test_value_heads_of_another_width(dims, mask_kind):
    """Multi-head latent attention (DeepSeek-V2/V3: v_head_dim != q/k's): out has v's head
    dim, values and gradients those of SDPA (which takes the two widths as they are), on
    the kernel (causal, causal + left padding) and on the exact path for other masks."""
    dqk, dv = dims
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 4, 9, dqk, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(2, 4, 9, dv, generator=g).requires_grad_()
    module = torch.nn.Module()
    rows, mask = torch.ones(2, 9, dtype=torch.bool), None
    if mask_kind == "padded":  # a boolean 4-D mask as HF prepares it: row 1 left-padded
        rows[1, :3] = False
        mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None] & rows[:, None, None, :]
    elif mask_kind == "custom":  # no causal / window / padding rule: the exact torch path
        mask = torch.rand(2, 1, 9, 9, generator=g) < 0.7
        mask[..., 0] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the exact path's one-time notice
        out, weights = fastdf_attention_forward(module, q, k, v, mask, scaling=0.3, is_causal=True)
    assert weights is None and out.shape == (2, 9, 4, dv)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                           scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out[rows], want[rows], atol=1e-5, rtol=1e-5)  # padded queries: sdpa's are not 0
    grad = torch.randn(out.shape, generator=g) * rows[..., None, None]
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_deepseek_v3_latent_attention_matches_sdpa():
    """A tiny DeepSeek-V3 (q/k heads of 48, v heads of 32) with attention forced to fastdf:
    sdpa's logits on real tokens and its greedy continuation (left padding, a DynamicCache)."""
    config = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=16,
        q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32, n_group=2, topk_group=1,
        num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=128)
    torch.manual_seed(0)
    sdpa = transformers.DeepseekV3ForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ours = transformers.DeepseekV3ForCausalLM._from_config(copy.deepcopy(config), attn_implementation="fastdf").eval()
    ours.load_state_dict(sdpa.state_dict())
    ids, mask = _batch([9, 5], 9, seed=6)
    with torch.no_grad():
        want, got = sdpa(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=1e-4)
        kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids, **kw), sdpa.generate(ids, **kw))

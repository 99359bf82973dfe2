"""Tiny random HF MoE models of every family fastdf's experts backend supports (built from
configs, nothing downloaded). Shared by the integration and ESFT tests."""

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")

_COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)


def tiny_config(family, **overrides):
    import transformers as tf

    if family == "mixtral":
        cfg = tf.MixtralConfig(**_COMMON, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                                num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**_COMMON, intermediate_size=16, num_experts=6, num_experts_per_tok=2)
    elif family == "deepseek_v2":
        cfg = tf.DeepseekV2Config(**{**_COMMON, **_MLA}, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                  num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                                  topk_method="greedy")
    elif family == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**{**_COMMON, **_MLA}, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16,
                                  n_group=2, topk_group=1, norm_topk_prob=True)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family, seed=0, **overrides):
    """A causal LM with random weights (std 0.1 for matrices, so routing is far from ties)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def batch(vocab=97, lengths=(11, 7, 9), seed=0):
    """input_ids / attention_mask with right padding (pad id 0) for sequences of ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}

"""HF transformers integration: importing this module registers ``"fastdf"`` everywhere
transformers takes a pluggable implementation.

    import fastdf.integrations.transformers  # noqa: F401
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastdf")
    model.set_experts_implementation("fastdf")   # MoE models

- ``AttentionInterface`` / ``AttentionMaskInterface``: token-causal ``df_attention``
  (``hf_attention``; any 2-D padding mask, sliding windows, static and sliding caches,
  prepared 4-D masks; see its docstring for the exact list).
- ``ExpertsInterface``: ``moe_experts`` (``hf_experts``; Mixtral, Qwen2/3-MoE, OLMoE,
  DeepSeek-V2/V3), which ``fastdf.esft`` uses to train compact expert subsets.
"""

from . import hf_attention, hf_experts

__all__ = ["hf_attention", "hf_experts"]

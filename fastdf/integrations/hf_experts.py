"""fastdf as an HF transformers experts backend.

Importing this module registers ``"fastdf"`` in transformers' ``ExpertsInterface``, so any
model whose experts class uses ``@use_experts_implementation`` (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3, ...) can run its routed experts through
:func:`fastdf.moe_experts`::

    import fastdf.integrations.hf_experts  # noqa: F401  (registers "fastdf")
    model.set_experts_implementation("fastdf")
    # or: AutoModelForCausalLM.from_pretrained(..., experts_implementation="fastdf")

An experts module that carries ESFT state (set by :func:`fastdf.esft.apply`: attributes
``esft_ids``, ``esft_gate_up``, ``esft_down``) runs its selected experts from those compact
trainable weights; the fused 3-D weights stay frozen. An experts module sharded by
:func:`fastdf.integrations.expert_parallel.shard_experts` holds only its rank's experts and
exchanges tokens with the other ranks.
"""

from __future__ import annotations

from torch import nn

from ..ops.moe import moe_experts

NAME = "fastdf"

# ESFT state on an experts module (written by fastdf.esft, read here).
ESFT_IDS = "esft_ids"  # int64 [E_t] buffer: the experts that train
ESFT_GATE_UP = "esft_gate_up"  # Parameter [E_t, 2I, H]
ESFT_DOWN = "esft_down"  # Parameter [E_t, H, I]
# Expert parallelism (written by expert_parallel.shard_experts): (group, num_experts).
EXPERT_PARALLEL = "_fastdf_expert_parallel"

# HF activation classes whose math a fused kernel implements (by class name, so no
# import of transformers.activations is needed and renamed classes simply go unfused).
_FUSED = {
    "SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh", "ReLU": "relu",
}


def experts_act(experts: nn.Module):
    """The ``act`` argument for :func:`fastdf.moe_experts` from an HF experts module: a fused
    kernel's name when its ``act_fn`` is one we implement, else the callable itself."""
    fn = experts.act_fn
    if isinstance(fn, nn.GELU):
        return "gelu_tanh" if fn.approximate == "tanh" else "gelu"
    return _FUSED.get(type(fn).__name__, fn)


def _check_layout(experts: nn.Module):
    unsupported = [
        flag for flag, bad in (
            ("has_bias", getattr(experts, "has_bias", False)),
            ("is_transposed", getattr(experts, "is_transposed", False)),
            ("has_gate=False", not getattr(experts, "has_gate", True)),
            ("is_concatenated=False", not getattr(experts, "is_concatenated", True)),
            ("has_post_expert_norm", getattr(experts, "has_post_expert_norm", False)),
            ("expert parallelism", getattr(experts, "_is_expert_parallel", False)),
        ) if bad
    ]
    if unsupported:
        raise NotImplementedError(
            f"the 'fastdf' experts implementation runs gated, concatenated [E, 2I, H] / [E, H, I] experts without "
            f"bias; {type(experts).__name__} has {', '.join(unsupported)}. Use another experts_implementation for it."
        )


def fastdf_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights):
    """``ExpertsInterface`` entry: HF's experts forward signature, computed by fastdf.moe_experts."""
    _check_layout(self)
    ids = getattr(self, ESFT_IDS, None)
    ep = getattr(self, EXPERT_PARALLEL, None)
    if ep is not None:
        from .expert_parallel import expert_range, moe_experts_ep

        group, num_experts = ep
        # esft_ids are global ids; the compact weights hold this rank's experts only.
        local = ids - expert_range(num_experts, group).start if ids is not None else None
        return moe_experts_ep(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                              num_experts=num_experts, group=group, act=experts_act(self), trainable_ids=local,
                              trainable_gate_up=getattr(self, ESFT_GATE_UP) if ids is not None else None,
                              trainable_down=getattr(self, ESFT_DOWN) if ids is not None else None)
    return moe_experts(
        hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, act=experts_act(self),
        trainable_ids=ids,
        trainable_gate_up=getattr(self, ESFT_GATE_UP) if ids is not None else None,
        trainable_down=getattr(self, ESFT_DOWN) if ids is not None else None,
    )


def register():
    """Register ``"fastdf"`` in transformers' ExpertsInterface (idempotent)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as err:  # transformers < 5 has no experts interface
        raise ImportError(
            "fastdf.integrations.hf_experts needs transformers >= 5 (its ExpertsInterface); "
            f"install it with pip install 'transformers>=5' ({err})"
        ) from err
    ExpertsInterface.register(NAME, fastdf_experts_forward)


register()

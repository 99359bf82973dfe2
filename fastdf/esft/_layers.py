"""Finding the MoE layers of an HF model: the routed-experts module and its router."""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from ..integrations import hf_experts

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclasses.dataclass
class MoELayer:
    index: int  # decoder-layer index
    name: str  # module path of the experts
    experts: nn.Module  # HF experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    router: nn.Module  # returns (router_logits, topk_weights, topk_indices)

    @property
    def num_experts(self) -> int:
        """Routed experts of the layer, over all ranks when expert-parallel (the router
        scores all of them; this rank's fused weights hold its slice only)."""
        ep = getattr(self.experts, hf_experts.EXPERT_PARALLEL, None)
        return ep[1] if ep is not None else self.experts.gate_up_proj.shape[0]


def _is_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3 and down.dim() == 3


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers in model order. Raises ValueError when there are none (the
    model does not keep its experts as HF's fused 3-D tensors)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (an HF MoE model), got {type(model).__name__}")
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        if not _is_experts(module):
            continue
        match = _LAYER.search(name + ".")
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
        router = getattr(parent, "gate", None)
        if match is None or not isinstance(router, nn.Module):
            raise ValueError(f"cannot place the experts at {name!r}: expected '...layers.<i>...experts' beside a "
                             "'gate' router (HF MoE layout)")
        found.append(MoELayer(int(match.group(1)), name, module, router))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no routed experts stored as fused 3-D tensors (gate_up_proj [E, 2I, H], "
            "down_proj [E, H, I]); fastdf.esft supports HF MoE models such as DeepSeek-V2/V3, Qwen2/3-MoE, "
            "Mixtral and OLMoE"
        )
    indices = [layer.index for layer in found]
    if len(set(indices)) != len(indices):
        raise ValueError(f"found several experts modules in one decoder layer: {[layer.name for layer in found]}")
    return found


def score_function(layer: MoELayer, config) -> str:
    """'sigmoid' for routers that score experts independently (DeepSeek-V3 style, with a
    score-correction bias), else 'softmax'."""
    if getattr(config, "scoring_func", None) == "sigmoid" or hasattr(layer.router, "e_score_correction_bias"):
        return "sigmoid"
    return "softmax"

"""Freezing, saving, loading and merging the experts ESFT trains.

``apply`` freezes every parameter of the model and gives each MoE layer with selected
experts three new attributes on its experts module: ``esft_ids`` (int64 buffer),
``esft_gate_up [E_t, 2I, H]`` and ``esft_down [E_t, H, I]`` (trainable copies of those
experts' slices). The model then runs its experts through the "fastdf" backend, which uses
the compact weights for the selected experts and computes weight gradients for them only;
the fused 3-D weights stay as they are (no gradient, no optimizer state). Nothing below
the lowest layer with a trainable expert requires grad, so autograd never runs there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..integrations import hf_experts
from ._layers import MoELayer, moe_layers

STATE_ATTR = "_fastdf_esft"  # on the model: what apply changed, so merge can undo it
WEIGHTS_FILE = "esft_experts.safetensors"
SELECTION_FILE = "esft_selection.json"


def _selection(selection, layers: dict[int, MoELayer]) -> dict[int, list[int]]:
    if not isinstance(selection, dict):
        raise TypeError(f"selection must be a dict {{decoder-layer index: [expert ids]}}, got {type(selection).__name__}")
    out = {}
    for key, ids in selection.items():
        layer = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"selection keys must be decoder-layer indices (int), got {key!r}")
        if layer not in layers:
            raise ValueError(f"selection names decoder layer {layer}, which has no routed experts "
                             f"(MoE layers: {sorted(layers)})")
        try:
            ids = [int(e) for e in ids]
        except (TypeError, ValueError):
            raise TypeError(f"selection[{layer}] must be a list of expert ids, got {ids!r}") from None
        E = layers[layer].num_experts
        if any(e < 0 or e >= E for e in ids):
            raise ValueError(f"selection[{layer}] has expert ids outside [0, {E}): {ids}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"selection[{layer}] lists an expert twice: {ids}")
        if ids:
            out[layer] = sorted(ids)
    return out


def _trained(model: nn.Module) -> dict[int, MoELayer]:
    return {layer.index: layer for layer in moe_layers(model) if hasattr(layer.experts, hf_experts.ESFT_IDS)}


def is_applied(model: nn.Module) -> bool:
    """Whether ``model`` carries ESFT state (from :func:`apply` or :func:`load`)."""
    return hasattr(model, STATE_ATTR)


def apply(model: nn.Module, selection: dict[int, list[int]]) -> nn.Module:
    """Make only the selected experts trainable (``selection``: {decoder-layer index:
    [expert ids]}, e.g. from :func:`select_experts`). Every other parameter is frozen; the
    selected experts become compact ``[E_t, ...]`` parameters that the "fastdf" experts
    backend (switched on here) reads. Returns ``model``."""
    layers = {layer.index: layer for layer in moe_layers(model)}
    if not hasattr(model, "set_experts_implementation"):
        raise TypeError(f"model must be an HF PreTrainedModel (set_experts_implementation), got {type(model).__name__}")
    if is_applied(model):
        raise ValueError("model already carries ESFT state: merge(model) first, or load onto a fresh base model")
    chosen = _selection(selection, layers)
    state = {
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }
    model.set_experts_implementation(hf_experts.NAME)  # first: a model that cannot switch stays untouched
    if getattr(model.config, "_experts_implementation", None) != hf_experts.NAME:
        raise ValueError(f"{type(model).__name__} did not switch to the 'fastdf' experts implementation (its experts "
                         "class does not use transformers' @use_experts_implementation), so the selected experts "
                         "would not train")
    for p in model.parameters():
        p.requires_grad_(False)
    for index, ids in chosen.items():
        experts = layers[index].experts
        t = torch.tensor(ids, dtype=torch.int64, device=experts.gate_up_proj.device)
        experts.register_buffer(hf_experts.ESFT_IDS, t)
        setattr(experts, hf_experts.ESFT_GATE_UP, nn.Parameter(experts.gate_up_proj.detach()[t].clone()))
        setattr(experts, hf_experts.ESFT_DOWN, nn.Parameter(experts.down_proj.detach()[t].clone()))
    setattr(model, STATE_ATTR, state)
    return model


def _require_state(model, what):
    if not is_applied(model):
        raise ValueError(f"model carries no ESFT state to {what}: call fastdf.esft.apply (or load) first")


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write only what ESFT trains: the selected experts' weights and the selection
    (``esft_experts.safetensors``, plus ``esft_selection.json`` for people). Returns the
    weights file's path."""
    from safetensors.torch import save_file

    _require_state(model, "save")
    trained = _trained(model)
    tensors, selection = {}, {}
    for index, layer in trained.items():
        ids = getattr(layer.experts, hf_experts.ESFT_IDS)
        selection[str(index)] = ids.tolist()
        tensors[f"layers.{index}.expert_ids"] = ids.detach().cpu().contiguous()
        tensors[f"layers.{index}.gate_up"] = getattr(layer.experts, hf_experts.ESFT_GATE_UP).detach().cpu().contiguous()
        tensors[f"layers.{index}.down"] = getattr(layer.experts, hf_experts.ESFT_DOWN).detach().cpu().contiguous()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "fastdf.esft", "fastdf": __version__, "selection": json.dumps(selection),
            "model_type": str(getattr(model.config, "model_type", ""))}
    path = out / WEIGHTS_FILE
    save_file(tensors, str(path), metadata=meta)
    (out / SELECTION_FILE).write_text(json.dumps({"selection": selection, "model_type": meta["model_type"],
                                                  "fastdf": __version__}, indent=1) + "\n")
    return path


def load(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Restore ESFT state saved by :func:`save` onto a fresh copy of the base model: apply
    the saved selection, then copy in the trained experts. Returns ``model``."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {str(directory)!r} (write it with fastdf.esft.save)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "fastdf.esft":
            raise ValueError(f"{path} is not a fastdf.esft checkpoint (metadata format={meta.get('format')!r})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    selection = {int(k): v for k, v in json.loads(meta["selection"]).items()}
    apply(model, selection)
    with torch.no_grad():
        for index, layer in _trained(model).items():
            for name, attr in (("gate_up", hf_experts.ESFT_GATE_UP), ("down", hf_experts.ESFT_DOWN)):
                param = getattr(layer.experts, attr)
                saved = tensors[f"layers.{index}.{name}"]
                if saved.shape != param.shape:
                    raise ValueError(f"{path}: layers.{index}.{name} has shape {tuple(saved.shape)}, the model's "
                                     f"experts need {tuple(param.shape)} (a different base model?)")
                param.copy_(saved)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Write the trained experts back into the model's fused 3-D weights and remove the
    ESFT state: afterwards ``model`` is a plain HF model again (requires_grad flags and
    experts implementation as before :func:`apply`). Save first if you want the experts
    on their own. Returns ``model``."""
    _require_state(model, "merge")
    with torch.no_grad():
        for layer in _trained(model).values():
            experts = layer.experts
            ids = getattr(experts, hf_experts.ESFT_IDS)
            experts.gate_up_proj[ids] = getattr(experts, hf_experts.ESFT_GATE_UP).to(experts.gate_up_proj.dtype)
            experts.down_proj[ids] = getattr(experts, hf_experts.ESFT_DOWN).to(experts.down_proj.dtype)
            for attr in (hf_experts.ESFT_IDS, hf_experts.ESFT_GATE_UP, hf_experts.ESFT_DOWN):
                delattr(experts, attr)
    state = getattr(model, STATE_ATTR)
    for name, p in model.named_parameters():
        p.requires_grad_(state["requires_grad"].get(name, p.requires_grad))
    previous = state["experts_implementation"]
    if previous is not None and previous != model.config._experts_implementation:
        model.set_experts_implementation(previous)
    delattr(model, STATE_ATTR)
    return model

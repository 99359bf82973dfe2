"""Expert relevance on task data (ESFT, Wang et al. 2024) and the selection rule.

For MoE layer l, expert i, N_s sequences, sequence j with L_j real (non-padding) tokens, and
g_{i,k} the router score of expert i for token k (zero when i is not among the token's
top-K; the score *before* any top-k renormalisation or scaling):

    gate score       g_i = (1/N_s) sum_j (1/L_j) sum_k g_{i,k}
    token ratio      r_i = (1/N_s) sum_j (1/L_j) sum_k 1[g_{i,k} > 0] / K

Scores come from hooks on the routers, which all return ``(router_logits, topk_weights,
topk_indices)`` in HF's MoE models: softmax (or, for DeepSeek-V3-style routers, sigmoid)
of the logits, kept at the chosen experts.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import Tensor, nn

from ..ops import _checks
from ._layers import moe_layers, score_function


@dataclasses.dataclass
class RoutingStats:
    """Per-layer expert relevance. ``gate_scores``/``token_ratios`` are float64
    ``[len(layers), E]``; row l belongs to decoder layer ``layers[l]``."""

    layers: list[int]
    gate_scores: Tensor
    token_ratios: Tensor
    num_sequences: int
    num_tokens: int

    def __repr__(self):
        return (f"RoutingStats({len(self.layers)} MoE layers x {self.gate_scores.shape[1]} experts, "
                f"{self.num_sequences} sequences, {self.num_tokens} tokens)")


def _vocab_size(model: nn.Module) -> int | None:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embed, "num_embeddings", None)
    if size is None:
        size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def _batch_tensors(i: int, batch, device, vocab: int | None):
    """batches[i]'s input_ids [B, T] (int64) and attention_mask [B, T], checked."""
    name = f"batches[{i}]"
    if not isinstance(batch, dict):
        raise TypeError(f"{name} must be a dict with input_ids (and attention_mask), got {type(batch).__name__}")
    if "input_ids" not in batch:
        raise ValueError(f"{name} needs input_ids, got keys {sorted(map(str, batch))}")
    ids = _checks.tensor(f"{name}['input_ids']", batch["input_ids"], ndim=(1, 2))
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise ValueError(f"{name}['input_ids'] must hold integer token ids, got {str(ids.dtype).removeprefix('torch.')}")
    if ids.device.type == "meta":
        raise ValueError(f"{name}['input_ids'] is on the meta device (it holds no token ids)")
    ids = ids if ids.dim() == 2 else ids[None]
    if ids.numel() == 0:
        raise ValueError(f"{name}['input_ids'] is empty (shape {tuple(ids.shape)})")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"{name}['input_ids'] holds token ids in [{low}, {high}], outside the model's vocabulary "
                         f"[0, {vocab})")
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    _checks.tensor(f"{name}['attention_mask']", mask, ndim=(1, 2))
    if mask.dtype.is_complex:
        raise ValueError(f"{name}['attention_mask'] must be bool, integer or float 0/1, got complex")
    mask = mask if mask.dim() == 2 else mask[None]
    _checks.shape(f"{name}['attention_mask']", mask, tuple(ids.shape), what="(the shape of input_ids)")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name}['attention_mask'] must hold only 0 and 1 (1 = a real token)")
    return ids.to(device=device, dtype=torch.int64), mask.to(device)


def collect_routing_stats(model: nn.Module, batches: Iterable[dict], progress: bool = True) -> RoutingStats:
    """Run ``model`` over ``batches`` (dicts with ``input_ids`` [B, T] and optionally
    ``attention_mask``; padding is excluded) without gradients and return the paper's
    average gate score and token selection ratio of every expert in every MoE layer.

    Each batch is checked as it comes: input_ids must be integer token ids inside the
    model's vocabulary, attention_mask (bool/int/float) must hold only 0 and 1 and have
    input_ids' shape; errors name the batch (``batches[i]``). The model's train/eval mode
    is restored and the hooks are removed even when a batch is refused."""
    from tqdm.auto import tqdm

    layers = moe_layers(model)
    if isinstance(batches, dict):  # iterating a dict would give its keys
        raise TypeError("batches must be an iterable of dicts (a list of batches); got a single dict: wrap it in a list")
    try:
        batches = iter(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of dicts, got {type(batches).__name__}") from None
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    vocab = _vocab_size(model)
    sizes = {layer.num_experts for layer in layers}
    if len(sizes) != 1:
        raise ValueError(f"MoE layers with different expert counts ({sorted(sizes)}) are not supported")
    E = sizes.pop()
    gate_sum = torch.zeros(len(layers), E, dtype=torch.float64)
    ratio_sum = torch.zeros(len(layers), E, dtype=torch.float64)
    current = {}

    def hook(row, score):
        def fn(module, args, output):
            if not (isinstance(output, tuple) and len(output) == 3):
                raise TypeError(f"{type(module).__name__} must return (router_logits, topk_weights, topk_indices)")
            logits, _, topk = output
            mask, lengths = current["mask"], current["lengths"]
            B, T = mask.shape
            if logits.shape[0] != B * T:
                raise ValueError(f"the router of layer {layers[row].index} saw {logits.shape[0]} tokens, the batch has "
                                 f"{B} x {T}")
            probs = torch.sigmoid(logits.float()) if score == "sigmoid" else torch.softmax(logits.float(), dim=-1)
            chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, topk.long(), True)
            real = mask.reshape(-1, 1)
            g = (probs * chosen * real).view(B, T, E).sum(1, dtype=torch.float64)
            r = (chosen * real).view(B, T, E).sum(1, dtype=torch.float64) / topk.shape[-1]
            keep = lengths > 0
            gate_sum[row] += (g[keep] / lengths[keep, None]).sum(0).cpu()
            ratio_sum[row] += (r[keep] / lengths[keep, None]).sum(0).cpu()
        return fn

    device = next(model.parameters()).device
    handles = [layer.router.register_forward_hook(hook(i, score_function(layer, getattr(model, "config", None))))
               for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    num_sequences = num_tokens = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(tqdm(batches, desc="fastdf.esft routing stats", unit="batch", disable=not progress)):
                ids, mask = _batch_tensors(i, batch, device, vocab)
                current["mask"] = (mask != 0).float()
                current["lengths"] = (mask != 0).sum(1).to(torch.float64)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                num_sequences += int((current["lengths"] > 0).sum())
                num_tokens += int((mask != 0).sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if num_sequences == 0:
        raise ValueError("batches held no real tokens (all attention_mask entries were 0, or no batches)")
    return RoutingStats([layer.index for layer in layers], gate_sum / num_sequences, ratio_sum / num_sequences,
                        num_sequences, num_tokens)


def _check_stats(stats: RoutingStats, field: str) -> Tensor:
    """stats.<field> checked against stats.layers: a finite, non-negative [len(layers), E] tensor."""
    layers = stats.layers
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TypeError(f"stats.layers must be a list of decoder-layer indices (int), got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"stats.layers lists a decoder layer twice: {list(layers)}")
    scores = _checks.tensor(f"stats.{field}", getattr(stats, field), ndim=2)
    if not scores.dtype.is_floating_point:
        raise ValueError(f"stats.{field} must be a float tensor, got {str(scores.dtype).removeprefix('torch.')}")
    _checks.shape(f"stats.{field}", scores, (len(layers), None), what="(one row per entry of stats.layers)")
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise ValueError(f"stats.{field} must be finite and non-negative")
    return scores


def select_experts(stats: RoutingStats, method: str = "gate", p: float = 0.1) -> dict[int, list[int]]:
    """Per MoE layer, the experts to train: sorted by score (``method`` "gate": average gate
    score, "token": token selection ratio), taken until their running sum reaches ``p``
    (the paper: p = 0.1 for gate scores, 0.2 for token ratios). Returns
    ``{decoder-layer index: sorted expert ids}``. ``p`` must be finite, in (0, 1]; the
    chosen scores must be a finite, non-negative ``[len(stats.layers), E]`` tensor."""
    if not isinstance(stats, RoutingStats):
        raise TypeError(f"stats must be the RoutingStats from collect_routing_stats, got {type(stats).__name__}")
    if not isinstance(method, str):
        raise TypeError(f"method must be a str ('gate' or 'token'), got {type(method).__name__}")
    if method not in ("gate", "token"):
        raise ValueError(f"method must be 'gate' or 'token', got {method!r}")
    _checks.finite_float("p", p, low=0, high=1, low_open=True)
    scores = _check_stats(stats, "gate_scores" if method == "gate" else "token_ratios")
    selection = {}
    for layer, row in zip(stats.layers, scores):
        order = torch.sort(row, descending=True, stable=True).indices.tolist()
        chosen, total = [], 0.0
        for e in order:
            if total >= p:
                break
            chosen.append(e)
            total += float(row[e])
        selection[layer] = sorted(chosen)
    return selection

"""Expert parallelism for the routed experts: each rank of a torch.distributed group holds a
contiguous slice of the experts and the tokens travel to them with ``all_to_all_single``.

For ``hidden [T, H]`` routed by ``topk_ids``/``topk_weights [T, K]`` on every rank, and
experts ``[r * E_l, (r + 1) * E_l)`` on rank ``r`` (``E = world * E_l``):

1. route: the (token, slot) pairs sorted by global expert id with the stable counting sort
   (:func:`fastdf.ops.moe.moe_route`); experts are contiguous per rank, so the sorted rows
   are already grouped by destination rank;
2. send each pair's token row to the rank owning its expert (``all_to_all_single``; the
   per-expert counts travel first, so every rank knows which local expert each received row
   is for);
3. the receiving rank runs its experts on the rows it got (:func:`fastdf.moe_experts`, one
   slot of weight 1 per row, so the routing weight is not applied twice);
4. the results travel back on the reverse exchange, into the sorted order of step 1, and
   :func:`fastdf.ops.moe.moe_combine` sums each token's slots with their weights in fp32,
   in slot order: the same deterministic combine as one process.

Backward runs the same exchanges in reverse (:class:`_AllToAll`). Weight gradients are
computed for the local trainable experts only (ESFT: ``trainable_ids`` etc. are this
rank's share, see :func:`local_trainable`).

Every rank must call :func:`moe_experts_ep` for every layer, in the same order, with the
same ``requires_grad`` on ``hidden`` (a collective); the backward likewise runs on every
rank. A rank may send or receive no token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import _checks
from ..ops.grouped_mm import check_trainable
from ..ops.moe import moe_combine, moe_experts, moe_gather, moe_route, resolve_act


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return dist


def _world(group) -> tuple[int, int]:
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of the rows of ``x`` with autograd: the backward sends the
    gradient rows back along the reverse exchange. ``anchor`` (a scalar that requires grad)
    makes the output require grad on every rank whenever grad mode is on, so the backward
    exchange runs on every rank even where nothing local needs a gradient (e.g. a rank whose
    experts are all frozen): a rank that skipped it would leave the others waiting."""

    @staticmethod
    def forward(ctx, x, anchor, out_splits, in_splits, group):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        _dist().all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        dx = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        _dist().all_to_all_single(dx, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return (dx if ctx.needs_input_grad[0] else None), None, None, None, None


def _exchange(x, out_splits, in_splits, group, *, anchored):
    # Only the return trip is anchored: whether the tokens need a gradient is the same on
    # every rank (hidden.requires_grad), whether the expert outputs do is not (it depends
    # on which experts this rank holds), and an anchored first trip would make every rank
    # run the experts' input gradient even below the lowest trainable layer.
    anchor = None
    if anchored and torch.is_grad_enabled():
        anchor = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
    return _AllToAll.apply(x, anchor, out_splits, in_splits, group)


def expert_range(num_experts: int, group=None) -> range:
    """The global expert ids this rank holds: ``num_experts / world`` contiguous ids."""
    _checks.number("num_experts", num_experts, low=1, integer=True)
    rank, world = _world(group)
    if num_experts % world:
        raise ValueError(f"num_experts ({num_experts}) must be a multiple of the group size ({world})")
    per = num_experts // world
    return range(rank * per, (rank + 1) * per)


def local_trainable(trainable_ids: Tensor, num_experts: int, group=None) -> tuple[Tensor, Tensor]:
    """This rank's share of ``trainable_ids`` (global ids): ``(positions, local_ids)``, with
    ``positions`` indexing the rows of the compact ``[E_t, ...]`` weights that belong here
    and ``local_ids`` the same experts numbered within this rank's slice."""
    _checks.index_tensor("trainable_ids", trainable_ids, ndim=1, dtypes=(torch.int64,), low=0, high=num_experts)
    mine = expert_range(num_experts, group)
    keep = (trainable_ids >= mine.start) & (trainable_ids < mine.stop)
    positions = keep.nonzero().reshape(-1)
    return positions, trainable_ids[positions] - mine.start


def moe_experts_ep(hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Tensor, down: Tensor, *,
                   num_experts: int, group=None, act="silu", trainable_ids: Tensor | None = None,
                   trainable_gate_up: Tensor | None = None, trainable_down: Tensor | None = None) -> Tensor:
    """:func:`fastdf.moe_experts` with the experts spread over the ranks of ``group``.

    Args:
        hidden, topk_ids, topk_weights: this rank's tokens, as for ``moe_experts``
            (``topk_ids`` are global ids in ``[0, num_experts)``).
        gate_up ``[E_l, 2I, H]``, down ``[E_l, H, I]``: this rank's experts, global ids
            ``expert_range(num_experts, group)``.
        num_experts: ``E`` over all ranks (a multiple of the group size).
        trainable_ids, trainable_gate_up, trainable_down: this rank's trainable experts in
            local numbering (from :func:`local_trainable`), as for ``moe_experts``.

    Returns ``[T, H]``: what ``moe_experts`` returns on one process holding all experts
    (each token's slots combined in fp32 in slot order). A collective: see the module notes.
    """
    mine = expert_range(num_experts, group)  # num_experts checked first: it bounds topk_ids
    _checks.tensor("hidden", hidden, ndim=2, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    topk_ids = _checks.index_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int64, torch.int32), low=0,
                                    high=num_experts)
    _checks.tensor("topk_weights", topk_weights, ndim=2, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    _checks.shape("topk_ids", topk_ids, (hidden.shape[0], None), what="([T, K] with T = hidden.shape[0])")
    _checks.shape("topk_weights", topk_weights, tuple(topk_ids.shape), what="(the shape of topk_ids)")
    _checks.tensor("gate_up", gate_up, ndim=3)
    _checks.tensor("down", down, ndim=3)
    if gate_up.shape[0] != len(mine):
        raise ValueError(f"gate_up holds {gate_up.shape[0]} experts; this rank's slice of num_experts={num_experts} "
                         f"over the group is {len(mine)} (ids {mine.start}..{mine.stop - 1})")
    # Everything moe_experts would refuse is refused here, before the first exchange: a rank
    # that raised between two exchanges would leave the others waiting in the second.
    _checks.same_device(hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights, gate_up=gate_up, down=down)
    _checks.same_dtype(hidden=hidden, gate_up=gate_up, down=down)
    H, two_i = hidden.shape[1], gate_up.shape[1]
    if two_i % 2:
        raise ValueError(f"gate_up must have shape [E_l, 2I, H], got {tuple(gate_up.shape)}")
    _checks.shape("gate_up", gate_up, (len(mine), two_i, H), what="([E_l, 2I, H] with H = hidden.shape[1])")
    _checks.shape("down", down, (len(mine), H, two_i // 2), what="([E_l, H, I] matching gate_up [E_l, 2I, H])")
    check_trainable(len(mine), ids_name="trainable_ids", ids=trainable_ids, ref=("hidden", hidden), pairs=[
        ("trainable_gate_up", trainable_gate_up, tuple(gate_up.shape[1:]), gate_up.dtype),
        ("trainable_down", trainable_down, tuple(down.shape[1:]), down.dtype),
    ])
    if trainable_ids is not None:
        _checks.index_tensor("trainable_ids", trainable_ids, ndim=1, dtypes=(torch.int64,), low=0, high=len(mine))
        if trainable_ids.unique().numel() != trainable_ids.numel():
            raise ValueError(f"trainable_ids lists an expert twice: {trainable_ids.tolist()}")
    resolve_act(act)
    _, world = _world(group)
    per = len(mine)
    order, inverse, offs = moe_route(topk_ids, num_experts)
    # Rows per expert in sorted order; experts are contiguous per rank, so per rank too.
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())
    send = counts.view(world, per).sum(1).tolist()
    recv_counts = torch.empty_like(counts)
    _dist().all_to_all_single(recv_counts, counts, group=group)  # [source, local expert]
    recv = recv_counts.view(world, per).sum(1).tolist()

    rows = moe_gather(hidden, order, inverse)  # [T*K, H] sorted
    x = _exchange(rows, recv, send, group, anchored=False)
    local_ids = torch.arange(per, device=hidden.device).repeat(world).repeat_interleave(recv_counts)
    ones = torch.ones((x.shape[0], 1), dtype=hidden.dtype, device=hidden.device)
    y = moe_experts(x, local_ids.view(-1, 1), ones, gate_up, down, act=act, trainable_ids=trainable_ids,
                    trainable_gate_up=trainable_gate_up, trainable_down=trainable_down)
    back = _exchange(y, send, recv, group, anchored=True)
    return moe_combine(back, inverse, topk_weights)


# ---------------------------------------------------------------------------- HF models

def _experts_modules(model):
    for name, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter) and gate_up.dim() == 3 \
                and down.dim() == 3:
            yield name, module


def shard_experts(model: torch.nn.Module, group=None) -> torch.nn.Module:
    """Expert parallelism for an HF MoE model on the "fastdf" experts backend: every experts
    module keeps only this rank's slice of its routed experts (:func:`expert_range`) and,
    from then on, exchanges tokens with the other ranks of ``group`` (everything else stays
    replicated: routers, attention, shared experts). Every rank calls it on the same model
    with the same weights, and then runs every forward/backward (a collective).

    Gradients: an expert slice receives every rank's tokens, so its gradient is already the
    sum over the ranks' losses; the replicated parameters need the usual data-parallel
    reduction (DDP, which averages: divide the expert gradients by the world size, or the
    loss, to match). Call before wrapping the model.

    ESFT (:func:`fastdf.esft.apply` or ``load`` first, then this): each rank keeps the trained
    experts of its slice only (``esft_ids`` then lists those, in global ids). Every other
    parameter is frozen, so no data-parallel wrapper is needed at all; ``esft.save`` gathers
    the experts from every rank (every rank calls it) and ``esft.merge`` writes each rank's
    own into its slice. Returns ``model``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (an HF MoE model), got {type(model).__name__}")
    if not hasattr(model, "set_experts_implementation"):
        raise TypeError(f"model must be an HF PreTrainedModel (set_experts_implementation), got {type(model).__name__}")
    found = list(_experts_modules(model))
    if not found:
        raise ValueError(f"{type(model).__name__} has no routed experts stored as fused 3-D tensors")
    from . import hf_experts

    for name, experts in found:
        if getattr(experts, hf_experts.EXPERT_PARALLEL, None) is not None:
            raise ValueError(f"{name} is already sharded over the ranks (shard_experts ran twice?)")
        hf_experts._check_layout(experts)
        expert_range(experts.gate_up_proj.shape[0], group)  # divisibility, before anything changes
    previous = getattr(model.config, "_experts_implementation", None)
    model.set_experts_implementation(hf_experts.NAME)
    if getattr(model.config, "_experts_implementation", None) != hf_experts.NAME:
        model.set_experts_implementation(previous)
        raise ValueError(f"{type(model).__name__} did not switch to the 'fastdf' experts implementation")
    for _, experts in found:
        E = experts.gate_up_proj.shape[0]
        mine = expert_range(E, group)
        for attr in ("gate_up_proj", "down_proj"):
            full = getattr(experts, attr)
            setattr(experts, attr, torch.nn.Parameter(full.detach()[mine.start:mine.stop].clone(),
                                                      requires_grad=full.requires_grad))
        if hasattr(experts, hf_experts.ESFT_IDS):
            ids = getattr(experts, hf_experts.ESFT_IDS)
            keep = ((ids >= mine.start) & (ids < mine.stop)).nonzero().reshape(-1)
            experts.register_buffer(hf_experts.ESFT_IDS, ids[keep].clone())
            for attr in (hf_experts.ESFT_GATE_UP, hf_experts.ESFT_DOWN):
                compact = getattr(experts, attr)
                setattr(experts, attr, torch.nn.Parameter(compact.detach()[keep].clone(),
                                                          requires_grad=compact.requires_grad))
        setattr(experts, hf_experts.EXPERT_PARALLEL, (group, E))
    return model

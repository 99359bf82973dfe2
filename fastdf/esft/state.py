"""Freezing, saving, loading and merging the experts ESFT trains.

``apply`` freezes every parameter of the model and gives each MoE layer with selected
experts three new attributes on its experts module: ``esft_ids`` (int64 buffer),
``esft_gate_up [E_t, 2I, H]`` and ``esft_down [E_t, H, I]`` (trainable copies of those
experts' slices). The model then runs its experts through the "fastdf" backend, which uses
the compact weights for the selected experts and computes weight gradients for them only;
the fused 3-D weights stay as they are (no gradient, no optimizer state). Nothing below
the lowest layer with a trainable expert requires grad, so autograd never runs there.

Every function checks all of its input before it changes anything, and ``apply``/``load``
undo their partial work if something still fails, so a failed call leaves the model as
it was.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import secrets
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..integrations import hf_experts
from ._layers import MoELayer, moe_layers

STATE_ATTR = "_fastdf_esft"  # on the model: what apply changed, so merge can undo it
WEIGHTS_FILE = "esft_experts.safetensors"
SELECTION_FILE = "esft_selection.json"
FORMAT = "fastdf.esft"
CHECKSUMS = "sha256"  # metadata key: JSON {tensor name: sha256 of its bytes}; absent in old checkpoints
_ESFT_ATTRS = (hf_experts.ESFT_IDS, hf_experts.ESFT_GATE_UP, hf_experts.ESFT_DOWN)
_ID_CONTAINERS = (list, tuple, range, set, frozenset)


def _is_int(value) -> bool:
    # numbers.Integral takes numpy integers too; bool is an int to Python but never an id.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _layer_key(key) -> int:
    # Digit strings are what a selection read back from JSON (esft_selection.json) has as keys.
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    if _is_int(key):
        return int(key)
    raise TypeError(f"selection keys must be decoder-layer indices (int), got {key!r} ({type(key).__name__})")


def _expert_ids(layer: int, ids, num_experts: int) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
            dtype = str(ids.dtype).removeprefix("torch.")
            raise TypeError(f"selection[{layer}] must hold integer expert ids, got a {dtype} tensor")
        if ids.dim() != 1:
            raise ValueError(f"selection[{layer}] must be a 1-D tensor of expert ids, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    elif not isinstance(ids, _ID_CONTAINERS):
        # A str is iterable too: "12" would otherwise select experts 1 and 2.
        raise TypeError(f"selection[{layer}] must be a list of expert ids (int), got {type(ids).__name__} {ids!r}")
    ids = list(ids)
    for e in ids:
        if not _is_int(e):
            raise TypeError(f"selection[{layer}] has expert id {e!r} of type {type(e).__name__}; expert ids must be ints")
    ids = [int(e) for e in ids]
    outside = [e for e in ids if not 0 <= e < num_experts]
    if outside:
        raise ValueError(f"selection[{layer}] has expert ids outside [0, {num_experts}): {outside}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"selection[{layer}] lists an expert twice: {ids}")
    return sorted(ids)


def _selection(selection, layers: dict[int, MoELayer]) -> dict[int, list[int]]:
    """``selection`` checked against the model's MoE layers: {layer: sorted ids}, layers
    without ids dropped. Raises TypeError/ValueError naming the entry at fault."""
    if not isinstance(selection, dict):
        raise TypeError(f"selection must be a dict {{decoder-layer index: [expert ids]}}, got {type(selection).__name__}")
    out, seen = {}, set()
    for key, ids in selection.items():
        layer = _layer_key(key)
        if layer in seen:
            raise ValueError(f"selection names decoder layer {layer} twice (keys {key!r} and {layer!r}?)")
        seen.add(layer)
        if layer not in layers:
            raise ValueError(f"selection names decoder layer {layer}, which has no routed experts "
                             f"(MoE layers: {sorted(layers)})")
        ids = _expert_ids(layer, ids, layers[layer].num_experts)
        if ids:
            out[layer] = ids
    if not out:
        raise ValueError(f"selection selects no expert, so nothing would train: {selection!r}")
    return out


def _trained(model: nn.Module) -> dict[int, MoELayer]:
    return {layer.index: layer for layer in moe_layers(model) if hasattr(layer.experts, hf_experts.ESFT_IDS)}


def is_applied(model: nn.Module) -> bool:
    """Whether ``model`` carries ESFT state (from :func:`apply` or :func:`load`)."""
    return hasattr(model, STATE_ATTR)


def _check_unsharded(model: nn.Module, what: str) -> None:
    # FSDP2 manages only the parameters it found at fully_shard time: new trainable experts
    # added later would never have their gradients reduced, and writing into a shard
    # through global expert ids would hit the wrong rows.
    sharded = next((name for name, p in model.named_parameters() if _is_dtensor(p)), None)
    if sharded is not None:
        raise ValueError(f"model is sharded (parameter {sharded!r} is a DTensor, e.g. after FSDP2 fully_shard): "
                         f"{what} before fully_shard" + (", or on a gathered copy (full state dict)"
                                                         if what == "merge" else ""))
    if what != "merge":  # merge writes each rank's own experts into its slice
        # Under expert parallelism the fused weights hold one rank's slice: global expert
        # ids would pick the wrong rows.
        ep = next((name for name, m in model.named_modules() if _expert_parallel(m) is not None), None)
        if ep is not None:
            raise ValueError(f"model's experts are spread over ranks ({ep!r}, by expert_parallel.shard_experts): "
                             f"{what} before shard_experts")


def _expert_parallel(experts: nn.Module):
    """(group, num_experts) when shard_experts spread these experts over ranks, else None."""
    return getattr(experts, hf_experts.EXPERT_PARALLEL, None)


def _gather_experts(experts: nn.Module, ids, gate_up, down):
    """Every rank's trained experts of one layer, sorted by id (a collective on the expert-
    parallel group: every rank of it must get here, in the same order)."""
    import torch.distributed as dist

    group, _ = _expert_parallel(experts)
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, (ids, gate_up, down), group=group)
    ids = torch.cat([p[0] for p in parts])
    order = torch.argsort(ids)
    return ids[order], torch.cat([p[1] for p in parts])[order], torch.cat([p[2] for p in parts])[order]


def _check_model(model, what) -> dict[int, MoELayer]:
    layers = {layer.index: layer for layer in moe_layers(model)}
    if not hasattr(model, "set_experts_implementation"):
        raise TypeError(f"model must be an HF PreTrainedModel (set_experts_implementation), got {type(model).__name__}")
    if is_applied(model):
        raise ValueError("model already carries ESFT state: merge(model) first, or load onto a fresh base model")
    _check_unsharded(model, what)
    return layers


def _undo(model: nn.Module, state: dict, layers) -> None:
    """Remove the ESFT attributes and restore requires_grad flags and experts implementation."""
    for layer in layers:
        for attr in _ESFT_ATTRS:
            if hasattr(layer.experts, attr):
                delattr(layer.experts, attr)
    for name, p in model.named_parameters():
        p.requires_grad_(state["requires_grad"].get(name, p.requires_grad))
    previous = state["experts_implementation"]
    if previous is not None and previous != getattr(model.config, "_experts_implementation", None):
        model.set_experts_implementation(previous)
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)


def _install(model: nn.Module, layers: dict[int, MoELayer], chosen: dict[int, list[int]], weights=None) -> None:
    """Freeze the model and give the chosen experts trainable copies (or ``weights[layer]`` =
    (gate_up, down), already checked). All or nothing: on any error the model is restored."""
    state = {
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }
    try:
        model.set_experts_implementation(hf_experts.NAME)
        if getattr(model.config, "_experts_implementation", None) != hf_experts.NAME:
            raise ValueError(f"{type(model).__name__} did not switch to the 'fastdf' experts implementation (its experts "
                             "class does not use transformers' @use_experts_implementation), so the selected experts "
                             "would not train")
        for p in model.parameters():
            p.requires_grad_(False)
        for index, ids in chosen.items():
            experts = layers[index].experts
            device = experts.gate_up_proj.device
            t = torch.tensor(ids, dtype=torch.int64, device=device)
            if weights is None:
                gate_up, down = experts.gate_up_proj.detach()[t].clone(), experts.down_proj.detach()[t].clone()
            else:
                gate_up, down = (w.to(device=device, copy=True).contiguous() for w in weights[index])
            experts.register_buffer(hf_experts.ESFT_IDS, t)
            setattr(experts, hf_experts.ESFT_GATE_UP, nn.Parameter(gate_up))
            setattr(experts, hf_experts.ESFT_DOWN, nn.Parameter(down))
        setattr(model, STATE_ATTR, state)
    except BaseException:
        _undo(model, state, layers.values())
        raise


def apply(model: nn.Module, selection: dict[int, list[int]]) -> nn.Module:
    """Make only the selected experts trainable (``selection``: {decoder-layer index:
    [expert ids]}, e.g. from :func:`select_experts`; ids are ints, each at most once, in
    range; at least one expert overall). Every other parameter is frozen; the selected
    experts become compact ``[E_t, ...]`` parameters that the "fastdf" experts backend
    (switched on here) reads. Returns ``model``; on error the model is left unchanged.

    With FSDP2, apply before ``fully_shard`` (a sharded model is refused: FSDP manages only
    the parameters it found when sharding)."""
    layers = _check_model(model, "apply")
    _install(model, layers, _selection(selection, layers))
    return model


def _require_state(model, what):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (an HF MoE model), got {type(model).__name__}")
    if not is_applied(model):
        raise ValueError(f"model carries no ESFT state to {what}: call fastdf.esft.apply (or load) first")


def _directory(directory) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    path = Path(directory)
    if str(directory) == "":
        raise ValueError("directory must not be empty")
    return path


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _host(t: torch.Tensor) -> torch.Tensor:
    """The full tensor on the CPU. A DTensor (FSDP2) is gathered: a collective, so every
    rank must get here, in the same order."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().cpu().contiguous()


def _check_target(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} exists and is not a directory")
    existing = [name for name in (WEIGHTS_FILE, SELECTION_FILE) if os.path.lexists(directory / name)]
    for name in existing:
        if (directory / name).is_dir():
            raise ValueError(f"directory {str(directory)!r} has a folder named {name}; remove it first")
    if existing and not overwrite:
        raise ValueError(f"directory {str(directory)!r} already holds an ESFT checkpoint ({', '.join(existing)}); "
                         "pass overwrite=True to replace it")


def _reserve(directory: Path, name: str) -> Path:
    """A fresh temporary path beside ``name`` (same filesystem, so os.replace is atomic)."""
    while True:
        path = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # some platforms cannot open a directory; the files themselves are synced
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def save(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write only what ESFT trains: the selected experts' weights, the selection and a
    sha256 of every tensor (``esft_experts.safetensors``, which :func:`load` reads, plus
    ``esft_selection.json`` for people). Returns the weights file's path.

    A directory that already holds a checkpoint is refused unless ``overwrite=True``. The
    write is atomic: both files go to temporary names in ``directory`` first (fsynced),
    then replace the old ones, the weights file last, so a crash at any point leaves a
    complete loadable checkpoint (the old one until the final rename). Inside an
    initialised torch.distributed process group only rank 0 writes; with FSDP2
    (DTensor) parameters every rank must call it, since the shards are gathered first, and
    then a refusal or a failed write on rank 0 raises on every rank (the same type and
    message), so no rank runs on alone into its next collective."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
    directory = _directory(directory)
    _require_state(model, "save")
    trained = _trained(model)
    if not trained:
        raise ValueError("model carries ESFT state but no experts module has ESFT weights (were they deleted?)")
    rank = _rank()
    sharded = any(_is_dtensor(getattr(layer.experts, attr)) for layer in trained.values() for attr in _ESFT_ATTRS) \
        or any(_expert_parallel(layer.experts) is not None for layer in trained.values())
    path = directory / WEIGHTS_FILE
    if not sharded:  # refuse before any copy; with shards only after the collectives every rank joins
        if rank != 0:
            return path
        _check_target(directory, overwrite)
    tensors, selection = {}, {}
    for index in sorted(trained):
        experts = trained[index].experts
        ids = _host(getattr(experts, hf_experts.ESFT_IDS))
        gate_up = _host(getattr(experts, hf_experts.ESFT_GATE_UP))
        down = _host(getattr(experts, hf_experts.ESFT_DOWN))
        if _expert_parallel(experts) is not None:
            ids, gate_up, down = _gather_experts(experts, ids, gate_up, down)
        selection[str(index)] = ids.tolist()
        tensors[f"layers.{index}.expert_ids"] = ids
        tensors[f"layers.{index}.gate_up"] = gate_up
        tensors[f"layers.{index}.down"] = down
    if not sharded:
        _write(model, directory, tensors, selection)
        return path
    # Every rank joined the gathers and returns together: rank 0 writes and tells the others
    # how it went, so a refused target or a failed write raises on every rank (not only on
    # rank 0 while the others run on into the next collective and wait there).
    failure = None
    if rank == 0:
        try:
            _check_target(directory, overwrite)
            _write(model, directory, tensors, selection)
        except Exception as err:  # re-raised below, after the others have heard of it
            failure = err
    failure = _share_outcome(failure, rank)
    if failure is not None:
        raise failure
    return path


def _share_outcome(failure, rank):
    """Rank 0's exception (or None) on every rank of the default group: the same type and
    message elsewhere, the original object on rank 0."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return failure
    box = [None if failure is None else (type(failure).__name__, str(failure))]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None or rank == 0:
        return failure
    kind, message = box[0]
    known = {cls.__name__: cls for cls in (ValueError, TypeError, FileNotFoundError, PermissionError, OSError)}
    return known.get(kind, RuntimeError)(f"rank 0 could not save the ESFT checkpoint: {message}")


def _write(model, directory: Path, tensors, selection) -> None:
    """Write the checkpoint atomically (see :func:`save`); the target was checked."""
    from safetensors.torch import save_file

    path = directory / WEIGHTS_FILE
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    meta = {"format": FORMAT, "fastdf": __version__, "selection": json.dumps(selection), "model_type": model_type,
            CHECKSUMS: json.dumps({key: _sha256(t) for key, t in tensors.items()})}
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights, tmp_selection = _reserve(directory, WEIGHTS_FILE), _reserve(directory, SELECTION_FILE)
    try:
        save_file(tensors, str(tmp_weights), metadata=meta)
        _fsync(tmp_weights)
        with open(tmp_selection, "w") as f:
            f.write(json.dumps({"selection": selection, "model_type": model_type, "fastdf": __version__}, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        # load reads only the weights file (it carries the selection too): replacing it last
        # makes that rename the commit point.
        os.replace(tmp_selection, directory / SELECTION_FILE)
        os.replace(tmp_weights, path)
        _fsync(directory, directory=True)
    finally:
        for tmp in (tmp_weights, tmp_selection):
            if os.path.lexists(tmp):
                os.unlink(tmp)


def _read_checkpoint(path: Path, model: nn.Module, layers: dict[int, MoELayer]):
    """Everything in ``path`` checked against the model: (selection, {layer: (gate_up, down)}).
    Raises ValueError naming the file and the tensor at fault; changes nothing."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            tensors = {}
            for key in keys:
                try:
                    tensors[key] = f.get_tensor(key)
                except Exception as err:  # safetensors' own SafetensorError, or OSError, on damaged data
                    raise ValueError(f"{path}: cannot read tensor {key!r} (truncated or corrupted file?): {err}") from err
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"{path}: cannot read it as safetensors (truncated or corrupted file?): {err}") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastdf.esft checkpoint (metadata format={meta.get('format')!r})")
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    if meta.get("model_type") and model_type and meta["model_type"] != model_type:
        raise ValueError(f"{path} was saved from a {meta['model_type']!r} model; this model is {model_type!r} "
                         "(load onto the base model the experts were trained on)")
    if "selection" not in meta:
        raise ValueError(f"{path}: the metadata has no 'selection' (not written by fastdf.esft.save?)")
    try:
        raw = json.loads(meta["selection"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the metadata's 'selection' is not valid JSON: {err}") from None
    try:
        selection = _selection(raw, layers)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the metadata's 'selection' does not fit this model: {err}") from None

    if CHECKSUMS in meta:  # checkpoints from before checksums load without this check
        try:
            sums = json.loads(meta[CHECKSUMS])
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: the metadata's {CHECKSUMS!r} is not valid JSON: {err}") from None
        if not isinstance(sums, dict) or set(sums) != set(tensors):
            raise ValueError(f"{path}: the metadata's {CHECKSUMS!r} does not list exactly the stored tensors "
                             f"({sorted(tensors)})")
        for key, t in tensors.items():
            if _sha256(t) != sums[key]:
                raise ValueError(f"{path}: tensor {key!r} does not match its sha256 checksum (corrupted file)")

    expected = {f"layers.{i}.{name}" for i in selection for name in ("expert_ids", "gate_up", "down")}
    for key in sorted(expected - set(tensors)):
        raise ValueError(f"{path}: tensor {key!r} is missing (the selection names layer {key.split('.')[1]})")
    for key in sorted(set(tensors) - expected):
        raise ValueError(f"{path}: unexpected tensor {key!r} (not in the metadata's selection {sorted(selection)})")

    weights = {}
    for index, ids in selection.items():
        experts = layers[index].experts
        key = f"layers.{index}.expert_ids"
        stored = tensors[key]
        if stored.dtype != torch.int64 or stored.dim() != 1 or stored.tolist() != ids:
            raise ValueError(f"{path}: tensor {key!r} ({str(stored.dtype).removeprefix('torch.')} "
                             f"{tuple(stored.shape)}) disagrees with the metadata's selection {ids}")
        pair = []
        for name, full in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
            key = f"layers.{index}.{name}"
            stored = tensors[key]
            want = (len(ids), *full.shape[1:])
            if stored.dtype != full.dtype:
                raise ValueError(f"{path}: tensor {key!r} has dtype {str(stored.dtype).removeprefix('torch.')}, the "
                                 f"model's experts are {str(full.dtype).removeprefix('torch.')} (refused, not cast: "
                                 "load onto the base model in the dtype it was trained in)")
            if tuple(stored.shape) != want:
                raise ValueError(f"{path}: tensor {key!r} has shape {tuple(stored.shape)}, the model's experts need "
                                 f"{want} (a different base model?)")
            if not torch.isfinite(stored).all():
                raise ValueError(f"{path}: tensor {key!r} holds NaN or Inf (the training diverged?)")
            pair.append(stored)
        weights[index] = tuple(pair)
    return selection, weights


def load(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Restore ESFT state saved by :func:`save` onto a fresh copy of the base model: apply
    the saved selection with the trained experts. Returns ``model``.

    The whole checkpoint is checked first (format, selection, checksums when present,
    every tensor's presence, dtype, shape and finiteness); a damaged or mismatched one
    raises ValueError naming the file and the tensor, and a failed load leaves the model
    exactly as it was. A missing weights file raises FileNotFoundError. With FSDP2, load
    before ``fully_shard`` (a sharded model is refused, as in :func:`apply`)."""
    layers = _check_model(model, "load")
    directory = _directory(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {str(directory)!r} (write it with fastdf.esft.save)")
    selection, weights = _read_checkpoint(path, model, layers)
    _install(model, layers, selection, weights)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Write the trained experts back into the model's fused 3-D weights and remove the
    ESFT state: afterwards ``model`` is a plain HF model again (requires_grad flags and
    experts implementation as before :func:`apply`). Save first if you want the experts
    on their own. Returns ``model``. A sharded (FSDP2) model is refused: merge a gathered
    copy (e.g. the full state dict loaded into an unsharded model with the same selection).
    Under expert parallelism (``shard_experts``) each rank writes its own experts into its
    slice and the model stays on the "fastdf" backend."""
    _require_state(model, "merge")
    _check_unsharded(model, "merge")
    trained = _trained(model)
    for index, layer in trained.items():  # all checked before the first write
        experts = layer.experts
        ids = getattr(experts, hf_experts.ESFT_IDS)
        for attr, full in ((hf_experts.ESFT_GATE_UP, experts.gate_up_proj), (hf_experts.ESFT_DOWN, experts.down_proj)):
            want = (ids.numel(), *full.shape[1:])
            if tuple(getattr(experts, attr).shape) != want:
                raise ValueError(f"layer {index}: {attr} has shape {tuple(getattr(experts, attr).shape)}, expected {want} "
                                 "(was the ESFT state changed by hand?)")
    with torch.no_grad():
        for layer in trained.values():
            experts = layer.experts
            ids = getattr(experts, hf_experts.ESFT_IDS)
            ep = _expert_parallel(experts)
            if ep is not None:  # global ids; this rank's fused weights start at its first expert
                from ..integrations.expert_parallel import expert_range

                ids = ids - expert_range(ep[1], ep[0]).start
            experts.gate_up_proj[ids] = getattr(experts, hf_experts.ESFT_GATE_UP).to(experts.gate_up_proj.dtype)
            experts.down_proj[ids] = getattr(experts, hf_experts.ESFT_DOWN).to(experts.down_proj.dtype)
    state = getattr(model, STATE_ATTR)
    if any(_expert_parallel(layer.experts) is not None for layer in trained.values()):
        # Spread experts run only through the fastdf backend: keep it.
        state = {**state, "experts_implementation": None}
    _undo(model, state, trained.values())
    return model

"""Sharding work over the ranks of an initialised torch.distributed process group.

Every rank runs its shard, then the ranks exchange a status before any result: one rank's
failure (bad arguments included) raises on every rank instead of leaving the others
waiting in a gather that never completes.
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Callable


def world() -> tuple[int, int] | None:
    """(rank, world size) of the default process group, or None outside one (or with one
    rank, where there is nothing to shard)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size()
    return (dist.get_rank(), size) if size > 1 else None


def shard(n: int, rank: int, size: int) -> list[int]:
    """The items of ``rank``: round-robin, so neighbouring items (often alike in
    difficulty, e.g. theorems of one file) spread over the ranks."""
    return list(range(rank, n, size))


def _digest(obj) -> str:
    try:
        return hashlib.sha256(pickle.dumps(obj)).hexdigest()
    except Exception:  # an unpicklable argument: nothing to compare
        return ""


def run_and_gather(fn: Callable[[], tuple], what: str) -> list:
    """Run ``fn()``, which returns ``(fingerprint, local result)``, and gather every rank's
    local result.

    ``fingerprint``: the (checked) arguments all ranks must share, compared by digest:
    ranks given different inputs would merge results of different problems, so that
    raises ValueError on every rank. Argument checks belong inside ``fn``, so that bad
    arguments on one rank reach the others through the status exchange. A rank whose ``fn`` raised re-raises its error; the others
    raise RuntimeError naming the rank and its error."""
    import torch.distributed as dist

    error = fingerprint = local = None
    try:
        fingerprint, local = fn()
    except BaseException as err:  # KeyboardInterrupt too: the peers must not wait for it
        error = err
    status = (_digest(fingerprint), None if error is None else f"{type(error).__name__}: {error}")
    statuses = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, status)
    failed = [(r, s[1]) for r, s in enumerate(statuses) if s[1] is not None]
    if error is not None:
        raise error
    if failed:
        r, message = failed[0]
        raise RuntimeError(f"{what} failed on rank {r}: {message}")
    if len({s[0] for s in statuses}) > 1:
        raise ValueError(f"{what}: the ranks were given different arguments (every rank must make the same call)")
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return parts


def merge(parts: list[list], n: int) -> list:
    """The inverse of :func:`shard`: item i is ``parts[i % size][i // size]``."""
    size = len(parts)
    return [parts[i % size][i // size] for i in range(n)]

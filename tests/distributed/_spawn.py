"""Spawning a few gloo CPU ranks with a deadline, so a stuck rank fails the test instead of
hanging CI. One spawned job runs several checks (process start-up is the slow part)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest


def _entry(rank, fn, world, init_file, args):
    import datetime
    import os
    import traceback

    import torch
    import torch.distributed as dist

    # Two cores shared by all ranks: one thread each, or the ranks fight over the cores.
    torch.set_num_threads(1)
    # The torch backend whatever the parent asked for: the ranks run bf16, which the Triton
    # interpreter gets wrong, and the checks are about distribution, not kernels.
    os.environ["FASTDF_BACKEND"] = "torch"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
        dist.barrier()  # nobody tears down while another rank still needs the group
    except BaseException:
        # Written before teardown: a failing rank often makes its peer abort inside gloo
        # first, and then only that abort would be reported.
        with open(f"{init_file}.rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes in one gloo group;
    re-raises the first rank failure, fails the test when ``timeout`` seconds pass."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_entry, args=(fn, world, f"{d}/rendezvous", args), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):  # raises if a rank failed
                if time.monotonic() > deadline:
                    pytest.fail(f"the {world} ranks did not finish within {timeout:.0f} s")
        except Exception as err:
            time.sleep(1)  # let a rank that raised finish writing its traceback
            errors = [Path(f"{d}/rendezvous.rank{r}.err") for r in range(world)]
            found = "\n".join(f"--- rank {r}:\n{e.read_text()}" for r, e in enumerate(errors) if e.exists())
            if found:
                pytest.fail(f"{err}\n{found}", pytrace=False)
            raise
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
                if p.is_alive():
                    p.kill()

"""FSDP2 (fully_shard) on 2 gloo CPU ranks against one process on the same global batch."""

import pytest
import torch.distributed as dist

from tests.distributed import _fsdp_worker
from tests.distributed._spawn import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


def test_fsdp2_two_ranks(tmp_path):
    """ESFT under fully_shard (per decoder layer + root), DeepSeek-V2 and Qwen2-MoE: loss,
    trained-expert gradients and one AdamW step equal one process; frozen weights get no
    gradient or optimizer state; autograd stops below the lowest trainable layer; esft.save
    writes what one process writes; load before sharding, merge on a gathered copy;
    apply/load/merge on a sharded model refused. Then MixedPrecisionPolicy(param_dtype=bf16):
    the fastdf experts run in bf16, gradients reduce in fp32, and agree with fp32 one-process
    training to bf16 rounding. Diffusion Forcing: DFTransformer + training_step (independent
    per-frame levels) under fully_shard per block + root: loss and every gradient equal one
    process; the sharded model under torch.compile (aot_eager) gives the same loss. One
    spawned group for all of it (process start-up dominates)."""
    run_ranks(_fsdp_worker.all_checks, 2, str(tmp_path))

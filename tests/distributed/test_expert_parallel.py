"""Expert parallelism (fastdf.integrations.expert_parallel) on gloo CPU ranks against one
process holding every expert."""

import pytest
import torch.distributed as dist

from tests.distributed import _ep_worker
from tests.distributed._spawn import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_one_process(world, tmp_path):
    """Output, token/routing-weight gradients and expert weight gradients (all experts, or an
    ESFT subset some ranks hold none of) equal one process, for uniform routing, routing that
    sends every token to the first rank's experts (the other ranks receive none) and a rank
    with no tokens at all; forward under no_grad too. On 2 ranks also an HF Qwen2-MoE
    sharded by shard_experts: logits and all gradients equal the unsharded model's; and ESFT
    on top (apply, then shard_experts): the experts each rank keeps get one process's
    gradients, esft.save gathers them into one process's checkpoint, esft.merge fills each
    rank's slice."""
    run_ranks(_ep_worker.check, world, str(tmp_path))


def test_needs_a_process_group():
    import torch

    from fastdf.integrations.expert_parallel import moe_experts_ep

    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        moe_experts_ep(torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1),
                       torch.zeros(2, 6, 4), torch.zeros(2, 4, 3), num_experts=2)

"""One rank of the ESFT DDP check (spawned by test_esft.py::test_ddp_two_ranks, CPU + gloo)."""

import torch
import torch.distributed as dist

SELECTION = {1: [0, 5], 2: [3]}


def _loss(model, b):
    return model(**b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)).loss


def run(rank, world, init_file):
    import datetime
    import gc

    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastdf import esft
    from tests.hf_tiny import batch, tiny_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        b = batch(lengths=(9, 6), seed=rank)  # each rank its own data

        # What DDP must produce: the mean over ranks of each rank's own gradients.
        local = esft.apply(tiny_model("deepseek_v2"), SELECTION)
        _loss(local, b).backward()
        want = {n: p.grad.clone() for n, p in local.named_parameters() if p.grad is not None}
        for g in want.values():
            dist.all_reduce(g)
            g /= world

        model = esft.apply(tiny_model("deepseek_v2"), SELECTION)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".esft_" in n for n in trainable), trainable
        ddp = DDP(model)
        _loss(ddp, b).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(grads) == trainable, f"frozen parameters got gradients: {set(grads) - trainable}"
        assert set(grads) == set(want)
        for name, g in grads.items():
            gathered = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(gathered, g)
            assert all(torch.equal(gathered[0], other) for other in gathered[1:]), f"{name} differs across ranks"
            torch.testing.assert_close(g, want[name], atol=1e-6, rtol=1e-5, msg=name)
            assert g.abs().sum() > 0, f"{name} got a zero gradient"
        # Tear down in order: DDP's reducer before the process group, both ranks together
        # (destroying gloo under a live reducer can deadlock its threads against the GIL).
        del ddp, model, local, grads, want
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()

"""One training run with jumps, for tests/integrations/test_sharded.py: under torchrun with
several ranks the model is sharded with FSDP2 (fully_shard, gloo, CPU); with one rank it is not.

    torchrun --standalone --nproc-per-node=2 tests/integrations/fsdp_jump.py OUT.pt BUDGET SCRATCH

Every rank trains on the same batch, so FSDP2's averaged gradients equal the single process'
and the runs differ only in how the Gram matrices are summed (per shard, then all-reduced).
Rank 0 saves the full weights after every step and the jumps' history to OUT.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 5)  # 5 rows: uneven over 2 ranks
        self.b = torch.nn.Linear(5, 1)  # 1 row: rank 1's shards are empty

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def main() -> None:
    out, budget, scratch = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    from relex_merge.integrations.jumps import Jumper

    torch.manual_seed(0)
    model = Net()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.a, mesh=mesh)
        fully_shard(model.b, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    jumper = Jumper(every=5, ahead=5, guard=False, memory_budget=budget, scratch_dir=scratch)
    jumper.begin(model, 0)
    weights = []
    for step in range(1, 11):
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        jumper.after_step(step)
        full = {}
        for name, p in model.named_parameters():
            full[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        weights.append(full)
    jumper.close()
    rank = dist.get_rank() if world > 1 else 0
    if rank == 0:
        torch.save({"weights": weights, "history": jumper.history, "spilled": jumper.store.spilled}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

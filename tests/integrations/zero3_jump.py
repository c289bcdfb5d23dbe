"""One training run with jumps under DeepSpeed ZeRO-3, for tests/integrations/test_sharded.py
(run with a venv that has DeepSpeed, under torchrun, DS_ACCELERATOR=cpu, gloo):

    torchrun --standalone --nproc-per-node=2 tests/integrations/zero3_jump.py OUT.pt PRECISION

The model, data and schedule are tests/integrations/fsdp_jump.py's (every rank trains on the same
batch; DeepSpeed's AdamW with torch_adam and no weight decay is Adam), so in fp32 the weights must
equal fsdp_jump.py's single process. In bf16 the model computes with bf16 partitions of fp32
master weights. Every rank saves, before and after the jumper ran at each step, its slices of the
master weights (what the next step starts from), the bf16 copies, and the gathered weights the
model computes with, to OUT.pt.rankR; the test joins the slices.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsdp_jump import Net  # noqa: E402


def main() -> None:
    import deepspeed

    out, precision = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    from relex_merge.integrations.jumps import Jumper

    torch.manual_seed(0)
    model = Net()
    config = {
        "train_micro_batch_size_per_gpu": 32,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-2, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10**6,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    if precision == "bf16":
        x, y = x.bfloat16(), y.bfloat16()
    jumper = Jumper(every=5, ahead=5, guard=False)
    jumper.begin(engine.module, 0, optimizer)

    def masters():
        return {t.name: t.local.detach().clone() for t in jumper.tensors}

    def mirrors():
        return {t.name: t.mirror.detach().clone() for t in jumper.tensors if t.mirror is not None}

    def gathered():
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}

    pre, post, copies, full = {0: masters()}, {0: masters()}, {}, {}
    for step in range(1, 11):
        loss = ((engine(x) - y) ** 2).float().mean()
        engine.backward(loss)
        engine.step()
        pre[step] = masters()
        jumper.after_step(step)
        post[step], copies[step], full[step] = masters(), mirrors(), gathered()
    jumper.close()
    rank = torch.distributed.get_rank()
    shapes = {name: tuple(p.ds_shape) for name, p in engine.module.named_parameters()}
    torch.save(
        {"pre": pre, "post": post, "mirrors": copies, "full": full, "shapes": shapes, "history": jumper.history},
        f"{out}.rank{rank}",
    )
    torch.distributed.barrier()


if __name__ == "__main__":
    main()

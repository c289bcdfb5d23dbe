"""Write REAL distributed checkpoints of planted HF checkpoints, as verl and DCP lay them out.

    python -m tests.make_shards RUN_DIR OUT_DIR STEP [STEP ...]

Spawns 2 CPU processes (gloo). For each step, rank r builds the model from
RUN_DIR/checkpoint-STEP, shards it with FSDP2 ``fully_shard`` and saves its state dict as
OUT_DIR/global_step_STEP/actor/model_world_size_2_rank_r.pt (verl's names, plus
fsdp_config.json and huggingface/ with config and tokenizer). The first step is also saved
with torch.distributed.checkpoint to OUT_DIR/dcp-STEP (nested {"model": ..., "optim": ...}).
Then 4 processes save the first step on a ("ddp", "fsdp") 2x2 mesh to OUT_DIR/ddp-STEP.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_for(run_dir: Path, step: int):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = run_dir / f"checkpoint-{step}"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    model.tie_weights()
    return model


def _fsdp_worker(rank: int, world: int, port: int, run_dir: str, out_dir: str, steps: list[int]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    run, out = Path(run_dir), Path(out_dir)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    for i, step in enumerate(steps):
        model = _model_for(run, step)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        actor = out / f"global_step_{step}" / "actor"
        if rank == 0:
            (actor / "huggingface").mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
                src = run / "base" / name
                if src.is_file():
                    shutil.copy(src, actor / "huggingface" / name)
            (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world}))
        dist.barrier()
        state = model.state_dict()
        torch.save(state, actor / f"model_world_size_{world}_rank_{rank}.pt")
        if i == 0:
            dcp.save({"model": state, "optim": {"step": torch.tensor(step)}}, checkpoint_id=str(out / f"dcp-{step}"))
        dist.barrier()
    dist.destroy_process_group()


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, out_dir: str, step: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ddp", "fsdp"))
    full = _model_for(Path(run_dir), step).state_dict()
    state = {k: distribute_tensor(v.detach(), mesh, [Replicate(), Shard(0)]) for k, v in full.items()}
    actor = Path(out_dir) / f"ddp-{step}"
    actor.mkdir(parents=True, exist_ok=True)
    torch.save(state, actor / f"model_world_size_{world}_rank_{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    run_dir, out_dir, *steps = argv
    step_list = [int(s) for s in steps]
    mp.spawn(_fsdp_worker, args=(2, _free_port(), run_dir, out_dir, step_list), nprocs=2)
    mp.spawn(_ddp_worker, args=(4, _free_port(), run_dir, out_dir, step_list[0]), nprocs=4)


if __name__ == "__main__":
    main(sys.argv[1:])

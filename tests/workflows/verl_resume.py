"""verl resumes from a ``relex-merge jump --resume-layout verl`` output: run with verl's own venv
under torchrun (tests/workflows/test_jump_verl.py does), on CPU with gloo.

    torchrun --standalone --nproc-per-node=W tests/workflows/verl_resume.py FSDP OUT HF TEMPLATE RESULT.json

The model is wrapped the way tests/fixtures/real_writers/make_real_checkpoints.py wraps it for verl
(verl's FSDP engine needs CUDA), then verl's own pieces resume it: ``find_latest_ckpt_path(OUT)``
and the trainer's rule for the step (``int(folder.split("global_step_")[-1])``), and
``FSDPCheckpointManager.load_checkpoint`` (model, optimizer, extra state). Rank 0 writes whether
the resumed weights equal the jump's HF output exactly, whether the optimizer state equals the
last window checkpoint's, and the loss of one more training step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real_writers"
sys.path.insert(0, str(REAL))

import make_real_checkpoints as writers  # noqa: E402


def main() -> None:
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    fsdp, out, hf, template, result_file = (
        int(sys.argv[1]),
        Path(sys.argv[2]),
        Path(sys.argv[3]),
        Path(sys.argv[4]),
        sys.argv[5],
    )
    writers.init_gloo()
    rank, world = writers.rank_world()
    torch.manual_seed(999)  # not the run's initial weights: everything must come from the checkpoint
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(writers.tiny_config()).float()
    model.config.use_cache = False
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    if fsdp == 1:
        from torch.distributed.fsdp import FullStateDictConfig, MixedPrecision, ShardingStrategy, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from verl.utils.fsdp_utils import get_fsdp_wrap_policy

        module = FSDP(
            model,
            auto_wrap_policy=get_fsdp_wrap_policy(module=model, config={}),
            device_id=torch.device("cpu"),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            mixed_precision=MixedPrecision(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32
            ),
            device_mesh=mesh,
            use_orig_params=False,
        )
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from verl.utils.fsdp_utils import apply_fsdp2

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=True)
        apply_fsdp2(
            model, {"mesh": mesh, "mp_policy": policy, "offload_policy": None, "reshard_after_forward": True}, {}
        )
        module = model
    optimizer = torch.optim.AdamW(module.parameters(), lr=writers.LR, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    manager = FSDPCheckpointManager(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        processing_class=None,
        checkpoint_config=OmegaConf.create(
            {"save_contents": ["model", "optimizer", "extra"], "load_contents": ["model", "optimizer", "extra"]}
        ),
    )
    folder = find_latest_ckpt_path(str(out))  # resume_mode=auto
    global_step = int(folder.split("global_step_")[-1])  # RayPPOTrainer._load_checkpoint's rule
    manager.load_checkpoint(str(Path(folder) / "actor"))

    if fsdp == 1:
        with FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    else:
        state = writers.full_state_from_dtensors(module)
    expected = load_file(str(hf / "model.safetensors"))
    weights_equal = sorted(state) == sorted(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    # the optimizer state verl loaded is the last window checkpoint's, shard for shard
    saved = torch.load(template / f"optim_world_size_{world}_rank_{rank}.pt", weights_only=False)
    loaded = optimizer.state_dict()

    def tensors(tree):
        if isinstance(tree, torch.Tensor):
            return [tree._local_tensor if hasattr(tree, "_local_tensor") else tree]
        if isinstance(tree, dict):
            return [t for k in sorted(tree, key=str) for t in tensors(tree[k])]
        if isinstance(tree, (list, tuple)):
            return [t for v in tree for t in tensors(v)]
        return []

    a, b = tensors(saved["state"]), tensors(loaded["state"])
    optimizer_equal = len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))
    ids = writers.local_batch(1, rank, world)
    optimizer.zero_grad()
    loss = module(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    flags = torch.tensor([float(weights_equal), float(optimizer_equal)])
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    if rank == 0:
        Path(result_file).write_text(
            json.dumps(
                {
                    "folder": folder,
                    "global_step": global_step,
                    "weights_equal": bool(flags[0]),
                    "optimizer_equal": bool(flags[1]),
                    "loss_after": float(loss),
                    "scheduler_last_epoch": scheduler.last_epoch,
                }
            )
        )
    torch.distributed.barrier()


if __name__ == "__main__":
    main()

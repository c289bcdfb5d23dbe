"""A DeepSpeed ZeRO-3 window of the benchmark's model, for ``bench.py --zero`` (needs DeepSpeed;
the benchmark itself runs without it).

    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 bench/make_zero_window.py WORK --size 130m --window 8
    python bench/make_zero_window.py WORK --consolidate

The first command (every rank) builds bench.py's Qwen2-shaped model (``--size``, fp32, seeded),
saves it as ``WORK/base`` (save_pretrained), and trains it with DeepSpeed ZeRO-3 (gloo, CPU,
AdamW lr 1e-4 on random tokens) for ``--window`` steps, ``engine.save_checkpoint`` after each:
``WORK/ckpt/global_step1 .. global_stepT``, as OpenRLHF and HF Trainer write them. The second
(one process) consolidates every save with DeepSpeed's own ``zero_to_fp32`` into
``WORK/consolidated/step_K`` (safetensors, plus base's config.json): what a merge of the ZeRO
window must equal. It also records, in ``WORK/deepspeed.json``, the wall time and peak RSS of
consolidating one save in memory (``get_fp32_state_dict_from_zero_checkpoint``), which is what
each ZeRO input of a merge held before relex-merge read ZeRO files itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench():
    spec = importlib.util.spec_from_file_location("relex_bench", HERE / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(work: Path, size: str, window: int) -> None:
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    config = _bench().make_config(size)
    config.architectures = ["Qwen2ForCausalLM"]
    config.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    if rank == 0:
        model.save_pretrained(work / "base")
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10**6,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    gen = torch.Generator().manual_seed(1 + rank)
    for step in range(1, window + 1):
        ids = torch.randint(0, config.vocab_size, (1, 32), generator=gen)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        engine.save_checkpoint(str(work / "ckpt"))  # tag global_step{step}
        if rank == 0:
            print(f"saved global_step{step}", flush=True)
    torch.distributed.barrier()


def consolidate(work: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    tags = sorted((p.name for p in (work / "ckpt").glob("global_step*")), key=lambda t: int(t[len("global_step") :]))
    for tag in tags:
        out = work / "consolidated" / f"step_{tag[len('global_step') :]}"
        if (out / "config.json").is_file():
            continue
        convert_zero_checkpoint_to_fp32_state_dict(str(work / "ckpt"), str(out), safe_serialization=True, tag=tag)
        shutil.copy(work / "base" / "config.json", out / "config.json")
        print(f"consolidated {tag}", flush=True)
    # one save consolidated in memory, in a process of its own: what each ZeRO input used to hold
    code = (
        "import resource,sys,time;t=time.perf_counter();"
        "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as f;"
        "sd=f(sys.argv[1],tag=sys.argv[2]);"
        "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024, "
        "sum(v.numel() for v in sd.values()))"
    )
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", code, str(work / "ckpt"), tags[-1]], capture_output=True, text=True, check=True
    )
    wall, rss, params = proc.stdout.split()[-3:]
    import deepspeed

    (work / "deepspeed.json").write_text(
        json.dumps(
            {
                "consolidate_one_save": {"tag": tags[-1], "wall_s": float(wall), "peak_rss": int(rss)},
                "params": int(params),
                "deepspeed": deepspeed.__version__,
            },
            indent=2,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--size", default="130m")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--consolidate", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.consolidate:
        consolidate(args.work)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        start = time.perf_counter()
        train(args.work, args.size, args.window)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{time.perf_counter() - start:.0f} s, peak RSS {peak:.1f} GiB")


if __name__ == "__main__":
    main()

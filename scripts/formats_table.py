"""The "Checkpoint formats" table of docs/formats.md (trainer -> layout -> what to point
``trajectory:`` at -> tested with which version), generated from the real-writer fixtures'
manifest.json, so that it says what the committed fixtures are and nothing else.

    python scripts/formats_table.py            # print the table
    python scripts/formats_table.py --write    # write tests/fixtures/real_writers/formats_table.md
    python scripts/formats_table.py --check    # exit 1 if that file is not what --write would write

docs/formats.md includes the file between ``<!-- include: ... -->`` markers;
tests/workflows/test_real_writers.py checks both, and runs every row's writer through convert,
explicit and ``trajectory:`` merges and analyze against its references.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "real_writers"
TABLE = FIXTURES / "formats_table.md"

# writer family -> (trainer as users know it, what `trajectory: run_dir` is in its terms, the
# libraries whose versions matter)
TRAINERS = [
    ("deepspeed_zero3_bf16", "DeepSpeed ZeRO-3, bf16", "the `save_dir` of `engine.save_checkpoint`", ("deepspeed",)),
    (
        "deepspeed_zero1_bf16_optimizer",
        "DeepSpeed bf16 with fp32 grad accumulation (BF16_Optimizer)",
        "the `save_dir` of `engine.save_checkpoint`",
        ("deepspeed",),
    ),
    ("deepspeed_zero3", "OpenRLHF (DeepSpeed ZeRO-3)", "`--ckpt_path`", ("deepspeed",)),
    ("deepspeed_zero", "DeepSpeed ZeRO-{stage}", "the `save_dir` of `engine.save_checkpoint`", ("deepspeed",)),
    ("hf_trainer_zero3", "HF Trainer / TRL + DeepSpeed ZeRO-3", "`output_dir`", ("transformers", "deepspeed")),
    ("torchtitan", "torchtitan `CheckpointManager`", "the job's dump folder", ("torchtitan",)),
    (
        "accelerate_fsdp2_sharded",
        "accelerate FSDP2, sharded state dict (`save_state(dir)`)",
        "the folder holding the `step_N/` folders",
        ("accelerate",),
    ),
    ("accelerate_fsdp2_full", "accelerate FSDP2, full state dict, automatic checkpoint naming", "", ("accelerate",)),
    ("verl_fsdp", "verl FSDP{fsdp} `FSDPCheckpointManager`", "`trainer.default_local_dir`", ("verl",)),
    ("dcp_model", 'torch DCP `dcp.save({{"model": ...}})`', "the folder holding the `step_N/` folders", ()),
]


def _trainer(name: str, info: dict) -> tuple[str, str, tuple[str, ...]]:
    for prefix, label, run_dir, libraries in TRAINERS:
        if name.startswith(prefix):
            fsdp = name[len("verl_fsdp")] if name.startswith("verl_fsdp") else ""
            return label.format(stage=info.get("zero_stage"), fsdp=fsdp), run_dir, libraries
    raise SystemExit(f"{name}: no trainer label in scripts/formats_table.py")


def _generic(path: str, step: str) -> str:
    """A save's folder with its step written N (checkpoint-2/global_step2 -> checkpoint-N/global_stepN)."""
    return re.sub(rf"(?<![0-9]){step}(?![0-9])", "N", path)


def _files(info: dict, save: str) -> str:
    """The file names of one save, rank numbers written R."""
    names = []
    for file in info["files_of_first_save"]:
        if file.startswith(save + "/"):
            name = file[len(save) + 1 :]
            name = re.sub(r"^__\d+_0\.distcp$", "__R_0.distcp", name)
            name = re.sub(r"zero_pp_rank_\d+", "zero_pp_rank_R", re.sub(r"_rank_\d+\.pt$", "_rank_R.pt", name))
            if name not in names:
                names.append(name)
    return ", ".join(f"`{n}`" for n in names)


def table() -> str:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    rows = [
        "| trainer | one save, inside `run_dir` | its files | point `trajectory: run_dir` at | tested with |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(w for w in manifest if not w.startswith("_")):
        info = manifest[name]
        label, run_dir_is, libraries = _trainer(name, info)
        first = min(info["checkpoints"], key=int)
        save = info["checkpoints"][first]
        run_dir = info["trajectory"]
        if run_dir is None:  # folders numbered by save: the step is not in the name
            layout = f"`{re.sub(r'_0$', '_K', str(Path(save).relative_to('run')))}/` (K counts saves, from 0)"
            where = "nothing: the folder names do not carry the step; list the saves under `models:`"
        else:
            layout = f"`{_generic(str(Path(save).relative_to(run_dir)), first)}/`"
            where = run_dir_is
        versions = ", ".join(f"{lib} {info['libraries'][lib]}" for lib in (*libraries, "torch"))
        tested = f"{versions}; {info['ranks']} rank{'s' if info['ranks'] > 1 else ''} (`{name}`)"
        rows.append(f"| {label} | {layout} | {_files(info, save)} | {where} | {tested} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = table()
    if args.write:
        TABLE.write_text(text)
    elif args.check:
        if not TABLE.is_file() or TABLE.read_text() != text:
            print(f"{TABLE.relative_to(ROOT)} is out of date: run python scripts/formats_table.py --write")
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

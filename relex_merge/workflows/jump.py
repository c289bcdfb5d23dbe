"""``jump``: one relex merge to one target step, written where the trainer resumes from.

``resume_layout="hf"`` writes the Hugging Face folder ``merge`` writes. ``resume_layout="verl"``
writes a verl checkpoint root that ``trainer.resume_mode=auto`` (``default_local_dir=OUT``) or
``resume_mode=resume_path`` (``resume_from_path=OUT/global_step_N``) continues from:

    OUT/latest_checkpointed_iteration.txt      N
    OUT/global_step_N/actor/                   model_world_size_W_rank_R.pt: the jumped weights, cut
                                               exactly like the last window checkpoint's shards
                                               (same DTensor mesh, placements, world size, dtypes);
                                               optim_*, extra_state_*, fsdp_config.json,
                                               huggingface/ copied from it (the optimizer state and
                                               the lr scheduler carry on from the last real step)
    OUT/global_step_N/<other>                  data.pt (the dataloader), critic/, ... copied unchanged
    OUT/README.md, OUT/relex_config.yml        the merge's card and config, with the verdict
    OUT/hf/                                    the same jump as a HF folder (--keep-hf)

N is the target step by default (verl then counts the jumped steps as done: its lr schedule and
``total_training_steps`` see step N), or the last window step with ``resume_step="last"`` (the
jump costs no steps of the schedule). The last window checkpoint must be a verl actor folder.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from relex_merge.common.errors import RelexError
from relex_merge.common.progress import NullProgress, Progress
from relex_merge.config.options import Options
from relex_merge.config.schema import load_config
from relex_merge.engine import process_group
from relex_merge.io import verl
from relex_merge.io.formats import detect, open_checkpoint
from relex_merge.output.folders import atomic_output_dir, check_output_path
from relex_merge.workflows.merge import MergeResult, execute_merge
from relex_merge.workflows.plan import MergePlan, plan_merge

__all__ = ["JumpResult", "jump", "verl_template"]

log = logging.getLogger(__name__)

Layout = Literal["hf", "verl"]
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


@dataclass
class JumpResult:
    """What ``jump`` wrote."""

    out: Path
    target: int
    merge: MergeResult
    layout: str
    resume_step: int | None = None  # verl: the global_step_N folder written
    rank_files: list[Path] | None = None
    copied: list[str] | None = None  # verl: what came unchanged from the last window checkpoint


def verl_template(plan: MergePlan) -> Path:
    """The last window checkpoint's verl actor folder (RelexError naming it if it is not one)."""
    last = Path(plan.config.models[-1].model)
    if detect(last).name != "fsdp":
        raise RelexError(
            f"--resume-layout verl: the window's last checkpoint {last} is not a verl actor folder "
            "(model_world_size_W_rank_R.pt files)"
        )
    if last.name != "actor" or not _STEP_DIR.match(last.parent.name):
        raise RelexError(
            f"--resume-layout verl: the window's last checkpoint {last} is not global_step_N/actor "
            "(verl's layout: its optimizer and extra state are carried over from there)"
        )
    verl.world_size(last)
    return last


def jump(
    config: str | Path,
    out: str | Path,
    options: Options = Options(),
    *,
    resume_layout: Layout = "hf",
    resume_step: Literal["target", "last"] = "target",
    keep_hf: bool = False,
    progress: Progress = NullProgress(),
) -> JumpResult:
    """Merge ``config`` (one target step) into ``out`` in the given layout."""
    out = Path(out)
    group = process_group.current()
    with group.step("planning the jump"):
        plan = plan_merge(load_config(config), options.allow_unsafe_pickle)
        targets = list(plan.job.targets)
        if len(targets) != 1:
            raise RelexError(f"{config}: jump writes one target step; the config has {len(targets)} ({targets})")
        template = verl_template(plan) if resume_layout == "verl" else None
        check_output_path(out, plan.model_paths, options.overwrite)
    for warning in plan.warnings:
        progress.note(f"warning: {warning}")
    engine = options.engine()
    merge_args = dict(
        shard_size=options.shard_size,
        full_hash=options.full_hash,
        when_unsupported=options.unsupported_policy,
        tolerance=options.tolerance,
        progress=progress,
    )
    if template is None:
        result = execute_merge(plan, out, engine, overwrite=options.overwrite, **merge_args)
        return JumpResult(out, targets[0], result, "hf")
    if group.distributed:
        raise RelexError("--resume-layout verl: run jump as one process (the merge is small next to training)")
    step = targets[0] if resume_step == "target" else plan.job.steps[-1]
    with atomic_output_dir(out, options.overwrite) as tmp:
        result = execute_merge(plan, tmp / "hf", engine, overwrite=False, **merge_args)
        step_dir = tmp / f"global_step_{step}"
        source = open_checkpoint(tmp / "hf")
        try:
            written = verl.write_actor(template, source, step_dir / "actor", options.allow_unsafe_pickle)
        finally:
            source.close()
        copied = [f"actor/{p.name}" for p in sorted(template.iterdir()) if not verl.MODEL_FILE.match(p.name)]
        _replace_hf_weights(step_dir / "actor" / "huggingface", tmp / "hf")
        for entry in sorted(template.parent.iterdir()):  # data.pt, critic/, ...: as they were
            if entry.name == "actor":
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, step_dir / entry.name)
            copied.append(entry.name)
        (tmp / "latest_checkpointed_iteration.txt").write_text(str(step))
        for name in ("README.md", "relex_config.yml"):
            shutil.copy2(tmp / "hf" / name, tmp / name)
        if not keep_hf:
            shutil.rmtree(tmp / "hf")
    final = [(t, s, out / "hf") for t, s, _ in result.outputs] if keep_hf else []
    result = MergeResult(final, result.stats, result.summary, result.seconds, result.bytes_written, result.assessment)
    return JumpResult(
        out, targets[0], result, "verl", step, [out / f"global_step_{step}" / "actor" / p.name for p in written], copied
    )


def _replace_hf_weights(folder: Path, hf: Path) -> None:
    """verl's ``huggingface/`` holds config and tokenizer, and model weights when verl saved them:
    stale weights (the last real step's) are replaced by the jump's."""
    if not folder.is_dir():
        return
    stale = [p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json")]
    stale += [p for p in folder.iterdir() if re.match(r"pytorch_model.*\.bin(\.index\.json)?$", p.name)]
    if not stale:
        return
    for p in stale:
        p.unlink()
    for p in hf.iterdir():
        if p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"):
            shutil.copy2(p, folder / p.name)
    log.debug("%s: replaced %d weight file(s) with the jump's", folder, len(stale))

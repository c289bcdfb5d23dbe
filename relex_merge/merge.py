"""Run a planned merge into an output folder: one HF model per target, written atomically."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from relex_merge.engine import EngineOptions, EngineStats, ProgressFn, run_merge
from relex_merge.io.writer import ShardedModelWriter
from relex_merge.output import (
    atomic_output_dir,
    check_output_path,
    copy_side_files,
    write_model_config,
)
from relex_merge.plan import MergePlan
from relex_merge.report import FitSummary, model_card, summarize


@dataclass(frozen=True)
class MergeResult:
    outputs: list[tuple[int, float, Path]]  # (target step, scale, model folder)
    stats: EngineStats
    summary: FitSummary
    seconds: float
    bytes_written: int


def output_names(targets: list[int], scales: list[float] | None) -> list[str]:
    """Folder names of the outputs: step-500, or step-500-scale-0.5 in a sweep."""
    if scales is None:
        return [f"step-{t}" for t in targets]
    return [f"step-{t}-scale-{s:g}" for t, s in zip(targets, scales)]


def target_folders(root: Path, names: list[str]) -> list[Path]:
    return [root] if len(names) == 1 else [root / name for name in names]


def execute_merge(
    plan: MergePlan,
    out: Path,
    options: EngineOptions,
    *,
    overwrite: bool = False,
    shard_size: int = 5 * 1024**3,
    full_hash: bool = False,
    progress: ProgressFn = lambda nbytes, done: None,
) -> MergeResult:
    check_output_path(out, plan.model_paths, overwrite)
    job = plan.job
    targets = list(job.targets)
    start = time.perf_counter()
    sweep_scales = list(job.scales) if job.scales is not None else None
    names = output_names(targets, sweep_scales)
    scales = sweep_scales or [plan.config.parameters.scale] * len(targets)
    with atomic_output_dir(out) as tmp:
        folders = target_folders(tmp, names)
        tensors = job.output_tensors()
        writers = []
        for folder in folders:
            folder.mkdir(exist_ok=True)
            writers.append(ShardedModelWriter(folder, tensors, shard_size))
        try:
            stats = run_merge(job, writers, options, progress)
            for writer in writers:
                writer.close()
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        summary = summarize(stats.tensors)
        inputs = plan.fingerprints(full_hash)
        tokenizer_source = Path(plan.config.tokenizer_source) if plan.config.tokenizer_source else None
        for target, scale, folder in zip(targets, scales, folders):
            config = plan.config.for_output(target, scale)
            write_model_config(plan.base_config, folder, config.out_dtype)
            copy_side_files(Path(config.base_path), tokenizer_source, folder)
            (folder / "relex_config.yml").write_text(config.to_yaml())
            card = model_card(config, target, list(job.steps), summary, inputs, plan.warnings)
            (folder / "README.md").write_text(card)
        written = sum(f.stat().st_size for f in tmp.rglob("*.safetensors"))
    final = [(t, s, out / f.relative_to(tmp)) for t, s, f in zip(targets, scales, folders)]
    return MergeResult(final, stats, summary, time.perf_counter() - start, written)

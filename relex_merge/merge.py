"""Run a planned merge into an output folder: one HF model per target, written atomically, each
with the backtest's verdict on its target."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from relex_merge.backtest import DEFAULT_TOLERANCE, Assessment, assess
from relex_merge.engine import EngineOptions, EngineStats, ProgressFn, run_merge
from relex_merge.errors import UnsupportedTarget
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
    assessment: Assessment


def output_names(targets: list[int]) -> list[str]:
    """Folder names of the outputs (when there are several): step-500, step-1000."""
    return [f"step-{t}" for t in targets]


def target_folders(root: Path, names: list[str]) -> list[Path]:
    return [root] if len(names) == 1 else [root / name for name in names]


def decides_first(plan: MergePlan, require_supported: bool) -> bool:
    """Whether the whole model's Gram matrices are needed before any output is written: a fit
    the backtest chooses (auto, or a shape not given), or --require-supported."""
    if plan.job.gram_cache is not None:
        return False  # already known
    return require_supported or any(spec.fit.resolved is None for spec in plan.job.output_specs())


def _combine(first: EngineStats, second: EngineStats) -> EngineStats:
    """A Gram pass and an output pass run apart, reported as one merge."""
    passes = {r.name: r.passes for r in first.tensors}
    tensors = [replace(r, passes=r.passes + passes.get(r.name, 0)) for r in second.tensors]
    return EngineStats(
        bytes_read=first.bytes_read + second.bytes_read,
        tensors=tensors,
        workers=second.workers,
        read_seconds=first.read_seconds + second.read_seconds,
        math_seconds=first.math_seconds + second.math_seconds,
        write_seconds=first.write_seconds + second.write_seconds,
        fit_seconds=first.fit_seconds + second.fit_seconds,
    )


def execute_merge(
    plan: MergePlan,
    out: Path,
    options: EngineOptions,
    *,
    overwrite: bool = False,
    shard_size: int = 5 * 1024**3,
    full_hash: bool = False,
    require_supported: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    names: list[str] | None = None,
    progress: ProgressFn = lambda nbytes, done: None,
) -> MergeResult:
    """Merge ``plan`` into ``out`` (one folder per output when several; with ``names``, one
    folder per output by those names, however many). The reads are the same whether the Gram pass runs first (a fit the backtest
    chooses, --require-supported) or interleaved with the outputs: every input twice, or once
    with a fit cache."""
    check_output_path(out, plan.model_paths, overwrite)
    job = plan.job
    targets = list(job.targets)
    start = time.perf_counter()
    gram_stats = None
    assessment = None
    if decides_first(plan, require_supported):
        gram_stats = run_merge(job.gram_only(), [], options, progress)
        job = replace(job, gram_cache={r.name: r.gram for r in gram_stats.tensors if r.gram is not None})
    if job.gram_cache is not None:
        assessment = assess(job.gram_cache.values(), job.steps, targets, job.output_specs(), tolerance)
        if require_supported and assessment.unsupported:
            first = assessment.unsupported[0]
            more = len(assessment.unsupported) - 1
            raise UnsupportedTarget(
                f"--require-supported: {first.line()}" + (f" ({more} more target(s) unsupported)" if more else "")
                + " Nothing was written."
            )
        job = replace(job, fits=assessment.fits)
    with atomic_output_dir(out) as tmp:
        folders = [tmp / name for name in names] if names else target_folders(tmp, output_names(targets))
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
        if gram_stats is not None:
            stats = _combine(gram_stats, stats)
        if assessment is None:  # the fits were fixed: the verdict needs only this pass's Gram matrices
            grams = [r.gram for r in stats.tensors if r.gram is not None]
            assessment = assess(grams, job.steps, targets, job.output_specs(), tolerance)
        summary = summarize(stats.tensors)
        inputs = plan.fingerprints(full_hash)
        tokenizer_source = Path(plan.config.tokenizer_source) if plan.config.tokenizer_source else None
        for spec, target, verdict, folder in zip(job.output_specs(), targets, assessment.verdicts, folders):
            config = plan.config.for_output(target, spec.scale, spec.fit)
            write_model_config(plan.base_config, folder, config.out_dtype)
            copy_side_files(Path(config.base_path), tokenizer_source, folder)
            header = "".join(f"# {line}\n" for line in _verdict_comment(verdict))
            (folder / "relex_config.yml").write_text(header + config.to_yaml())
            card = model_card(config, target, list(job.steps), summary, inputs, plan.warnings, verdict)
            (folder / "README.md").write_text(card)
        written = sum(f.stat().st_size for f in tmp.rglob("*.safetensors"))
    scales = [spec.scale for spec in job.output_specs()]
    final = [(t, s, out / f.relative_to(tmp)) for t, s, f in zip(targets, scales, folders)]
    return MergeResult(final, stats, summary, time.perf_counter() - start, written, assessment)


def _verdict_comment(verdict) -> list[str]:
    if verdict is None:
        return []
    return ["relex-merge verdict (from the backtest inside the window; see README.md):", verdict.line()]

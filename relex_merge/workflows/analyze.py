"""``analyze``: read the window once (Gram matrices only), analyse it (core.analysis), and write
analysis.json, the fit cache and the plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from relex_merge.common.progress import NullProgress, Progress
from relex_merge.config.options import Options
from relex_merge.config.schema import load_config
from relex_merge.core.analysis import Analysis, analyze_grams, representative_curves
from relex_merge.engine import EngineOptions, EngineStats, planned_read_bytes, process_group, run_job, share_of
from relex_merge.output import plots
from relex_merge.output.folders import atomic_output_dir, check_output_path
from relex_merge.workflows.fit_cache import CACHE_NAME, write_fit_cache
from relex_merge.workflows.plan import MergePlan, plan_merge

__all__ = ["AnalyzeResult", "analyze", "run_analysis"]


@dataclass
class AnalyzeResult:
    """What ``analyze`` returns: the analysis, the engine's statistics and the files written."""

    analysis: Analysis
    stats: EngineStats
    written: list[Path]  # files written into the --out folder (none without one)
    plots_available: bool  # matplotlib importable (plots written, or writable with --out)


def analyze(
    config: str | Path,
    options: Options = Options(),
    out_dir: str | Path | None = None,
    *,
    progress: Progress = NullProgress(),
) -> AnalyzeResult:
    """Analyse the window of a relex config (targets optional); with ``out_dir``, write
    analysis.json, the fit cache and (matplotlib installed) the plots there, atomically."""
    group = process_group.current()
    out = Path(out_dir) if out_dir is not None else None
    with group.step("planning and checking the output folder"):  # a failure on one rank stops all
        plan = plan_merge(
            load_config(config),
            options.allow_unsafe_pickle,
            require_targets=False,
            source=str(config),
            writes_models=False,
        )
        engine = options.engine()
        if out is not None:
            check_output_path(out, plan.model_paths, options.overwrite)
    for warning in plan.warnings:
        progress.note(f"warning: {warning}")
    mine = share_of(plan.job)
    progress.start("analyze", planned_read_bytes(plan.job.gram_only().share(mine)), len(mine))
    # every rank reads its share; the Gram matrices of all are exchanged; rank 0 writes
    analysis, stats = run_analysis(
        plan, engine, options.tolerance, progress=lambda nbytes, finished: progress.advance(nbytes, int(finished))
    )
    progress.finish()
    written: list[Path] = []
    with group.step("writing the analysis"):
        if out is not None and group.main:
            with atomic_output_dir(out, options.overwrite) as tmp:
                (tmp / "analysis.json").write_text(analysis.to_json())
                write_fit_cache(tmp / CACHE_NAME, plan, stats.tensors)
                names = ["analysis.json", CACHE_NAME]
                if plots.available():
                    names += [p.name for p in plots.write_plots(analysis, tmp)]
            written = [out / name for name in names]
    return AnalyzeResult(analysis, stats, written, plots.available())


def run_analysis(
    plan: MergePlan, options: EngineOptions, tolerance: float | None = None, progress=lambda n, d: None
) -> tuple[Analysis, EngineStats]:
    """Read the window once (Gram matrices only) and analyse."""
    stats = run_job(plan.job.gram_only(), [], options, progress)
    reports = [r for r in stats.tensors if r.gram is not None]
    analysis = analyze_grams(
        [r.name for r in reports],
        [r.numel for r in reports],
        [r.gram for r in reports],
        list(plan.job.steps),
        list(plan.job.targets),
        plan.job.spec,
        tolerance,
    )
    analysis.coefficients = representative_curves(
        {r.name: r.gram for r in reports}, analysis, plan.job.steps, plan.job.spec
    )
    return analysis, stats

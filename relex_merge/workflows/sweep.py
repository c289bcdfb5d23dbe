"""Choose the horizon, shrink and fit by measurement: build every (target, scale, fit) candidate
from ONE read of the window (each is only another weight vector), score each and the last window
checkpoint with lm-eval, keep the best."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from relex_merge.common.errors import RelexError
from relex_merge.common.progress import NullProgress, Progress
from relex_merge.config.options import Options
from relex_merge.config.schema import load_config
from relex_merge.core import fits
from relex_merge.core.relex import FitSpec
from relex_merge.engine import EngineOptions, process_group
from relex_merge.evaluation.lm_eval import EvalResult, check_tasks, evaluate, task_manager
from relex_merge.io.hf import is_hf_model
from relex_merge.output.folders import atomic_output_dir, check_output_path
from relex_merge.workflows.convert import plan_convert, write_converted
from relex_merge.workflows.merge import execute_merge
from relex_merge.workflows.plan import MergePlan, check_targets, plan_merge

__all__ = ["sweep", "run_sweep", "parse_fits", "SweepResult", "Candidate"]


def parse_fits(text: str, configured: FitSpec) -> list[FitSpec]:
    """``linear,auto,log``: family names or auto; the config's own family keeps its shape, the
    others' shapes are chosen by the backtest."""
    out = []
    for name in (v.strip() for v in text.split(",") if v.strip()):
        if name != fits.AUTO and name not in fits.names():
            raise RelexError(f"--fits: unknown fit {name!r}; choose {', '.join(fits.names())} or {fits.AUTO}")
        out.append(configured if name == configured.family else FitSpec(name, None, configured.origin_step))
    if not out:
        raise RelexError("--fits: give at least one fit")
    return out


def sweep(
    config: str | Path,
    out: str | Path,
    targets: Sequence[int],
    scales: Sequence[float],
    tasks: Sequence[str],
    options: Options = Options(),
    *,
    fits: str | None = None,
    include_path: str | Path | None = None,
    limit: int | None = None,
    keep_all: bool = False,
    progress: Progress = NullProgress(),
) -> SweepResult:
    """Every (target, scale, fit) candidate of a relex config from one read of the window,
    scored with lm-eval against the last window checkpoint; the best is kept as OUT/best."""
    with process_group.current().step("planning the sweep"):  # a failure on one rank stops all
        plan = plan_merge(load_config(config), options.allow_unsafe_pickle, require_targets=False, source=str(config))
        fit_list = parse_fits(fits, plan.job.spec.fit) if fits else None
        engine = options.engine()
    return run_sweep(
        plan,
        Path(out),
        targets,
        scales,
        tasks,
        engine,
        fits=fit_list,
        include_path=Path(include_path) if include_path else None,
        limit=limit,
        keep_all=keep_all,
        overwrite=options.overwrite,
        allow_unsafe_pickle=options.allow_unsafe_pickle,
        progress=progress,
    )


@dataclass(frozen=True)
class Candidate:
    """One scored model of a sweep (a built candidate, or the last window checkpoint)."""

    label: str  # "step-400-scale-0.5-fit-log" or "last window checkpoint (step 20)"
    target: int | None
    scale: float | None  # None: the baseline
    result: EvalResult
    fit: str | None = None  # the fit the candidate used (auto: what the backtest chose)
    verdict: str | None = None  # the backtest's line; None for the baseline and reconstruct modes


@dataclass(frozen=True)
class SweepResult:
    """What ``sweep`` returns: every candidate's score, the baseline's, and the one kept."""

    candidates: list[Candidate]  # in build order
    baseline: Candidate  # the last window checkpoint
    best: Candidate  # the highest-scoring candidate (on a tie, the first built)
    kept: Path  # OUT/best
    tied: list[Candidate] = field(default_factory=list)  # others with exactly the best score

    def tie(self) -> str:
        """How a tie for the best score was broken ("" when there was none)."""
        if not self.tied:
            return ""
        others = ", ".join(c.label for c in self.tied)
        return (
            f"tied with {others} (same score, {self.best.result.mean:.4f}): a tie goes to the candidate built "
            "first (targets in the order given, then scales, then fits)"
        )

    def outcome(self) -> str:
        """How the best candidate compares with the last window checkpoint, noise included: a
        margin within two standard errors of the difference is not called a win."""
        best, baseline = self.best.result, self.baseline.result
        margin = best.mean - baseline.mean
        noise = 2 * math.hypot(best.mean_stderr, baseline.mean_stderr)
        if margin <= 0:
            verdict = "does NOT beat"
        elif margin > noise:
            verdict = f"beats (by {margin:.4f}, more than two standard errors)"
        else:
            verdict = f"scores {margin:.4f} above, within two standard errors ({noise:.4f}): not a clear win over"
        return f"{verdict} the last window checkpoint ({baseline.mean:.4f} ± {baseline.mean_stderr:.4f})"


def run_sweep(
    plan: MergePlan,
    out: Path,
    targets: Sequence[int],
    scales: Sequence[float],
    tasks: Sequence[str],
    options: EngineOptions,
    *,
    fits: Sequence[FitSpec] | None = None,
    include_path: Path | None = None,
    limit: int | None = None,
    keep_all: bool = False,
    overwrite: bool = False,
    allow_unsafe_pickle: bool = False,
    progress: Progress = NullProgress(),
) -> SweepResult | None:
    """Build, score and rank the candidates of a planned merge (see ``sweep``). Under torchrun
    every rank builds its share of the candidates' tensors, then rank 0 alone scores them (the
    others return None)."""
    say = progress.note
    for warning in plan.warnings:
        say(f"warning: {warning}")
    group = process_group.current()
    with group.step("checking the sweep"):  # a failure on one rank stops all
        targets, scales = _check_grid(plan, targets, scales, say)
        manager = task_manager(include_path)
        check_tasks(tasks, manager)  # before any tensor is read
        check_output_path(out, plan.model_paths, overwrite)
    fits = list(fits or [plan.job.spec.fit])
    triples = [(t, s, f) for t in targets for s in scales for f in fits]
    job = replace(
        plan.job, targets=[t for t, _, _ in triples], scales=[s for _, s, _ in triples], fits=[f for _, _, f in triples]
    )
    names = [f"step-{t}-scale-{s:g}" + (f"-fit-{f.family}" if len(fits) > 1 else "") for t, s, f in triples]
    # the build (and the baseline's conversion) are the distributed part: into hidden siblings,
    # moved into the output after
    staging = out.parent / f".{out.name}.relex-candidates"
    converted = out.parent / f".{out.name}.relex-baseline"
    try:
        say(f"building {len(triples)} candidates from one read of the window")
        built = execute_merge(replace(plan, job=job), staging, options, overwrite=True, names=names, progress=progress)
        baseline = Path(plan.config.models[-1].model)
        if not is_hf_model(baseline):
            # lm-eval needs an HF folder; every rank converts its share (the converter's steps are
            # collectives, so rank 0 cannot convert alone after the others returned)
            say(f"converting the last window checkpoint {baseline} for scoring")
            with group.step("checking the last window checkpoint's conversion"):
                conversion = plan_convert(
                    baseline,
                    converted,
                    config_from=Path(plan.config.base_path),
                    overwrite=True,
                    allow_unsafe_pickle=allow_unsafe_pickle,
                )
            write_converted(conversion, max_memory=options.max_memory)
            baseline = converted
        if not group.main:
            return None
        return _score_candidates(
            built,
            plan,
            baseline,
            staging,
            out,
            tasks,
            manager,
            include_path,
            limit,
            keep_all,
            str(options.device),
            say,
            overwrite,
        )
    finally:
        for folder in (staging, converted):
            if group.main and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)


def _check_grid(plan: MergePlan, targets: Sequence[int], scales: Sequence[float], say) -> tuple[list, list]:
    """The sweep's targets and scales, each once, checked like the config's (one-line errors)."""
    mode = plan.job.spec.mode
    if mode != "extrapolate":
        raise RelexError(
            f"sweep: the config's mode is {mode}; sweep chooses how far to extrapolate, so it needs mode: extrapolate"
        )
    # a repeated value would build (and score) the same candidate twice, under one folder name
    targets, scales = list(dict.fromkeys(targets)), list(dict.fromkeys(scales))
    if not targets or not scales:
        raise RelexError("--targets and --scales: give at least one value each")
    if not all(s > 0 and math.isfinite(s) for s in scales):
        raise RelexError("--scales: every scale must be a finite number > 0")
    targets, warnings = check_targets(targets, plan.config.parameters, list(plan.job.steps), where="--targets")
    for warning in warnings:
        say(f"warning: {warning}")
    return targets, scales


def _score_candidates(
    built, plan, baseline_dir, staging, out, tasks, manager, include_path, limit, keep_all, device, say, overwrite
) -> SweepResult:
    baseline_step = plan.config.models[-1].parameters.step
    with atomic_output_dir(out, overwrite) as tmp:
        staging.rename(tmp / "candidates")
        built = replace(built, outputs=[(t, s, tmp / "candidates" / f.name) for t, s, f in built.outputs])
        results = []
        for (target, scale, folder), fit, verdict in zip(
            built.outputs, built.assessment.fits, built.assessment.verdicts
        ):
            say(f"scoring {folder.name}")
            result = _score(folder, tasks, manager, include_path, limit, device)
            results.append(
                Candidate(folder.name, target, scale, result, fit.describe(), verdict.line() if verdict else None)
            )
        say(f"scoring the last window checkpoint (step {baseline_step})")
        baseline = Candidate(
            f"last window checkpoint (step {baseline_step})",
            baseline_step,
            None,
            # never write into the user's checkpoint: its results go beside the sweep's
            _score(baseline_dir, tasks, manager, include_path, limit, device, tmp / "baseline_lm_eval_results.json"),
        )
        best = max(results, key=lambda c: c.result.mean)  # the first of equals: build order breaks ties
        tied = [c for c in results if c is not best and c.result.mean == best.result.mean]
        best_dir = tmp / "best"
        (tmp / "candidates" / best.label).rename(best_dir)
        if not keep_all:
            shutil.rmtree(tmp / "candidates")
        summary = {
            "tasks": list(tasks),
            "limit": limit,
            "best": best.label,
            "tied_with": [c.label for c in tied],
            "baseline": {"label": baseline.label, "score": baseline.result.mean, "stderr": baseline.result.mean_stderr},
            "candidates": [
                {
                    "label": c.label,
                    "target_step": c.target,
                    "scale": c.scale,
                    "fit": c.fit,
                    "score": c.result.mean,
                    "stderr": c.result.mean_stderr,
                    "verdict": c.verdict,
                }
                for c in results
            ],
        }
        (tmp / "sweep_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return SweepResult(results, baseline, best, out / "best", tied)


def _score(
    folder: Path, tasks, manager, include_path, limit, device: str, results_file: Path | None = None
) -> EvalResult:
    return evaluate(
        folder, tasks, include_path=include_path, limit=limit, device=device, manager=manager, results_file=results_file
    )

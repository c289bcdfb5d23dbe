"""The merge API: ``run_merge`` runs any config (relex, any mergekit method, several stages);
``execute_merge`` runs one planned relex merge into an output folder: one HF model per target,
written atomically, each with the backtest's verdict on its target."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from relex_merge.common.errors import RelexError, UnsupportedTarget
from relex_merge.common.progress import NullProgress, Progress
from relex_merge.config.options import Options
from relex_merge.config.schema import load_documents, parse_config
from relex_merge.config.stages import model_references, parse_stages, substitute
from relex_merge.core.summary import FitSummary, summarize
from relex_merge.core.verdict import Assessment, assess
from relex_merge.engine import (
    EngineOptions,
    EngineStats,
    MergeJob,
    chunk_rows,
    planned_read_bytes,
    process_group,
    row_ranges,
    run_job,
    share_of,
)
from relex_merge.interop.mergekit_runner import check_mergekit_inputs, known_methods, run_mergekit
from relex_merge.io.fingerprints import input_record
from relex_merge.io.hf import is_hf_model
from relex_merge.output.card import model_card
from relex_merge.output.folders import check_output_path, copy_side_files, shared_output_dir, write_model_config
from relex_merge.output.provenance import Provenance
from relex_merge.output.sinks import open_sinks, written_bytes
from relex_merge.workflows.fit_cache import load_fit_cache
from relex_merge.workflows.plan import MergePlan, plan_merge

__all__ = ["run_merge", "execute_merge", "RunResult", "StageResult", "MergeResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeResult:
    """What ``execute_merge`` wrote and what the run learned (every rank gets it)."""

    outputs: list[tuple[int, float, Path]]  # (target step, scale, model folder)
    stats: EngineStats
    summary: FitSummary
    seconds: float  # wall time of the merge
    bytes_written: int  # safetensors bytes (0 on ranks other than 0)
    assessment: Assessment  # each output's fit and the backtest's verdict on it
    stopped: list[int] = field(default_factory=list)  # targets written as the last window checkpoint (stop)


def output_names(targets: list[int]) -> list[str]:
    """Folder names of the outputs (when there are several): step-500, step-1000."""
    return [f"step-{t}" for t in targets]


def target_folders(root: Path, names: list[str]) -> list[Path]:
    """Where the outputs go: ``root`` itself for a single output, else one subfolder each."""
    return [root] if len(names) == 1 else [root / name for name in names]


WHEN_UNSUPPORTED = ("write", "stop", "refuse")  # what a merge does with a target its verdict does not support


def decides_first(plan: MergePlan, when_unsupported: str) -> bool:
    """Whether the whole model's Gram matrices are needed before any output is written: a fit
    the backtest chooses (auto, or a shape not given), or a verdict that decides what is written
    (--when-unsupported stop or refuse)."""
    if plan.job.gram_cache is not None:
        return False  # already known
    return when_unsupported != "write" or any(spec.fit.resolved is None for spec in plan.job.output_specs())


def _outputs(job: MergeJob, chosen: Sequence[int]) -> MergeJob:
    """The job restricted to some of its outputs (by position), each with its own fit and scale."""
    specs = job.output_specs()
    return replace(
        job,
        targets=[job.targets[j] for j in chosen],
        fits=[specs[j].fit for j in chosen],
        scales=[specs[j].scale for j in chosen],
    )


def copy_last_checkpoint(job: MergeJob, mine: Sequence[str], sinks, max_memory: int, progress: Progress) -> None:
    """Write the window's last checkpoint, as it is (in the outputs' dtypes), into every sink: what
    --when-unsupported stop leaves in place of a prediction its verdict does not support."""
    last = job.checkpoints[-1]
    for name in mine:
        meta = job.output_meta(name)
        rows = chunk_rows(meta, 2 * max(meta.dtype.itemsize, 4), max_memory)
        for span in row_ranges(meta.rows, rows):
            chunk = last.read(name, span if meta.shape else None).to(meta.dtype)
            progress.advance(chunk.nbytes)
            for sink in sinks:
                sink.write(name, chunk)


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
    shard_size: int = 5 * 1000**3,
    output_format: str = "safetensors",
    full_hash: bool = False,
    when_unsupported: str = "write",
    tolerance: float | None = None,
    names: list[str] | None = None,
    provenance: Provenance | None = None,
    progress: Progress = NullProgress(),
) -> MergeResult:
    """Merge ``plan`` into ``out`` (one folder per output when several; with ``names``, one
    folder per output by those names, however many). The reads are the same whether the Gram
    pass runs first (a fit the backtest chooses, --when-unsupported stop/refuse) or interleaved
    with the outputs: every input twice, or once with a fit cache.

    ``when_unsupported``: ``write`` every prediction whatever its verdict (the verdict is printed
    and recorded); ``refuse`` to write anything when a target is not supported (UnsupportedTarget,
    exit 3); ``stop``: write the window's last checkpoint in place of each unsupported prediction,
    so an output is never a prediction its verdict rejects.

    Under torchrun/srun every rank calls this with the same plan: each runs its share of the
    tensors and writes it into the shared output files, rank 0 writes the rest (index, configs,
    cards) and renames the output into place; every rank returns the same result."""
    group = process_group.current()
    with group.step("checking the output folder"):
        check_output_path(out, plan.model_paths, overwrite)
    job = plan.job
    targets = list(job.targets)
    start = time.perf_counter()
    gram_stats = None
    assessment = None
    mine = share_of(job)
    progress.start("merge", planned_read_bytes(job.share(mine)), len(mine))
    if when_unsupported not in WHEN_UNSUPPORTED:
        raise ValueError(f"when_unsupported: expected one of {', '.join(WHEN_UNSUPPORTED)}, got {when_unsupported!r}")
    if decides_first(plan, when_unsupported):
        log.debug("Gram pass first: the backtest chooses the fit or gates the outputs")
        gram_stats = run_job(job.gram_only(), [], options, _engine_progress(progress, items=False))
        job = replace(job, gram_cache={r.name: r.gram for r in gram_stats.tensors if r.gram is not None})
    if job.gram_cache is not None:
        # every rank has every Gram matrix, and the same arithmetic gives every rank the same answer
        assessment = assess(job.gram_cache.values(), job.steps, targets, job.output_specs(), tolerance)
        if when_unsupported == "refuse" and assessment.unsupported:
            first = assessment.unsupported[0]
            more = len(assessment.unsupported) - 1
            raise UnsupportedTarget(
                f"--when-unsupported refuse: {first.line()}"
                + (f" ({more} more target(s) unsupported)" if more else "")
                + " Nothing was written."
            )
        job = replace(job, fits=assessment.fits)
    stopped = (
        []
        if assessment is None or when_unsupported != "stop"
        else [j for j, verdict in enumerate(assessment.verdicts) if verdict is not None and not verdict.supported]
    )
    predicted = [j for j in range(len(targets)) if j not in stopped]
    with shared_output_dir(out, group, overwrite) as tmp:
        folders = [tmp / name for name in names] if names else target_folders(tmp, output_names(targets))
        stats = gram_stats
        with open_sinks(
            folders, job.output_tensors(), mine, shard_size=shard_size, output_format_name=output_format, group=group
        ) as sinks:
            if predicted:
                chosen = [sinks[j] for j in predicted]
                stats = run_job(_outputs(job, predicted), chosen, options, _engine_progress(progress))
                if gram_stats is not None:
                    stats = _combine(gram_stats, stats)
            if stopped:
                log.debug(
                    "--when-unsupported stop: the last window checkpoint for step(s) %s", [targets[j] for j in stopped]
                )
                copy_last_checkpoint(job, mine, [sinks[j] for j in stopped], options.max_memory, progress)
        if assessment is None:  # the fits were fixed: the verdict needs only this pass's Gram matrices
            grams = [r.gram for r in stats.tensors if r.gram is not None]
            assessment = assess(grams, job.steps, targets, job.output_specs(), tolerance)
        for target, spec, fit, verdict in zip(targets, plan.job.output_specs(), assessment.fits, assessment.verdicts):
            how = "as configured" if spec.fit.resolved is not None else "chosen by the backtest"
            said = "" if verdict is None else "; SUPPORTED" if verdict.supported else "; NOT SUPPORTED"
            log.debug("step %d: fit %s (%s)%s", target, fit.describe(), how, said)
        if group.main:
            for note in assessment.notes:
                progress.note(f"warning: {note}")
        summary = summarize(stats.tensors)
        with group.step("writing the model cards"):
            if group.main:
                _write_side_files(plan, job, assessment, summary, folders, full_hash, provenance, stopped)
        written = written_bytes(sinks) if group.main else 0
    progress.finish()
    scales = [spec.scale for spec in job.output_specs()]
    final = [(t, s, out / f.relative_to(tmp)) for t, s, f in zip(targets, scales, folders)]
    return MergeResult(
        final, stats, summary, time.perf_counter() - start, written, assessment, [targets[j] for j in stopped]
    )


def _write_side_files(
    plan: MergePlan,
    job: MergeJob,
    assessment: Assessment,
    summary: FitSummary,
    folders: list[Path],
    full_hash: bool,
    provenance: Provenance | None,
    stopped: Sequence[int] = (),
) -> None:
    """Each output's config.json, tokenizer, relex_config.yml and model card (``stopped``: the
    positions of the outputs that hold the last window checkpoint instead of a prediction)."""
    inputs = plan.fingerprints(full_hash)
    tokenizer_source = Path(plan.config.tokenizer_source) if plan.config.tokenizer_source else None
    last = int(job.steps[-1])
    for j, (spec, target, verdict, folder) in enumerate(
        zip(job.output_specs(), job.targets, assessment.verdicts, folders)
    ):
        config = plan.config.for_output(target, spec.scale, spec.fit)
        write_model_config(plan.base_config, folder, config.out_dtype)
        copy_side_files(Path(config.base_path), tokenizer_source, folder)
        stop = last if j in stopped else None
        header = "".join(f"# {line}\n" for line in _verdict_comment(verdict, stop))
        config_text = config.to_yaml()
        card = model_card(config, target, list(job.steps), summary, inputs, plan.warnings, verdict, stopped_at=stop)
        if provenance is not None:  # earlier stages by their names, not their deleted folders
            header += provenance.config_header
            config_text = provenance.restore_names(config_text)
            card = provenance.restore_names(card) + provenance.card_section
            (folder / provenance.file_name).write_text(provenance.documents_yaml)
        (folder / "relex_config.yml").write_text(header + config_text)
        (folder / "README.md").write_text(card)


def _engine_progress(progress: Progress, items: bool = True):
    """The engine's (bytes, tensor finished) callback onto a Progress."""
    return lambda nbytes, finished: progress.advance(nbytes, int(finished and items))


def _verdict_comment(verdict, stopped_at: int | None = None) -> list[str]:
    if verdict is None:
        return []
    lines = ["relex-merge verdict (from the backtest inside the window; see README.md):", verdict.line()]
    if stopped_at is not None:
        lines.append(
            f"--when-unsupported stop: this folder holds the last window checkpoint (step {stopped_at}), not the "
            "prediction this config describes; rerun without --when-unsupported stop to write the prediction."
        )
    return lines


# ---- any config: relex, mergekit methods, several stages ---------------------------------


@dataclass
class StageResult:
    """One stage of ``run_merge`` (a single-document config is one stage)."""

    name: str | None  # None: the final output
    method: str  # "relex" or a mergekit method
    out: Path
    reused: bool = False  # --lazy found it finished
    merge: MergeResult | None = None  # relex stages
    plan: MergePlan | None = None  # relex stages that ran


@dataclass
class RunResult:
    """What ``run_merge`` returns: every stage, in the order they ran (the final one last)."""

    out: Path
    stages: list[StageResult] = field(default_factory=list)

    @property
    def final(self) -> StageResult:
        """The stage that wrote ``out``."""
        return self.stages[-1]


def _stage_line(stage, result: StageResult) -> str:
    label = f"stage '{stage.name}' ({stage.method})"
    if result.reused:
        return f"{label}: reused from {result.out} (--lazy)"
    if result.merge is None or result.plan is None:
        models = [str(m) for m in _model_names(stage.document)]
        return f"{label}: {', '.join(models)}"
    steps = list(result.plan.job.steps)
    parts = []
    for (target, scale, _), fit, verdict in zip(
        result.merge.outputs, result.merge.assessment.fits, result.merge.assessment.verdicts
    ):
        text = f"target step {target}, scale {scale:g}, fit {fit.describe()}"
        parts.append(text + (f"; {verdict.line()}" if verdict is not None else ""))
    return (
        f"{label}: base {result.plan.config.base_path}, window steps {steps[0]}..{steps[-1]} "
        f"({len(steps)} checkpoints), mode {result.plan.job.spec.mode}; " + " | ".join(parts)
    )


def _model_names(document: dict) -> list[str]:
    return list(dict.fromkeys(model_references(document)))


def run_merge(
    config: str | Path | Sequence[Any],
    out: str | Path,
    options: Options = Options(),
    *,
    progress: Progress = NullProgress(),
    source: str | None = None,
) -> RunResult:
    """Run a merge config into ``out``: a relex config (streaming engine), any mergekit method
    (mergekit's runner, relex registered), or several YAML documents as stages. ``config`` is a
    file or its parsed documents. Nothing is read before every stage is checked; intermediates
    go to a hidden folder beside ``out`` (removed afterwards) or ``options.intermediate_dir``."""

    out = Path(out)
    group = process_group.current()
    with group.step("checking the config"):  # every rank checks; a failure on one stops all
        if isinstance(config, (str, Path)):
            source = source or str(config)
            documents = load_documents(config)
            as_given = Path(config).read_text()  # comments and all, for the provenance of multi-stage outputs
        else:
            documents, source = list(config), source or "<config>"
            as_given = "---\n".join(yaml_dump(d) for d in documents)
        # mergekit (and transformers behind it) takes seconds to import: only when a stage needs it
        only_relex = all(isinstance(d, dict) and d.get("merge_method") == "relex" for d in documents)
        stages = parse_stages(documents, source, ["relex"] if only_relex else known_methods())
        for stage in stages:  # every document's keys and values now, not when its turn comes; the
            # paths a stage reads (earlier stages' outputs among them) are checked when it runs
            where = f"{source}: {stage.label}" if len(stages) > 1 else source
            if stage.method == "relex":
                parsed = parse_config(stage.document, where)
                if stage.name is not None and len(stages) > 1:
                    _check_one_target(parsed.parameters, where)
            else:
                check_mergekit_inputs(stage.document, where, [s.name for s in stages if s.name])
        if options.lazy and options.intermediate_dir is None:
            raise RelexError("--lazy: give --intermediate-dir, where finished stages are kept")
        check_output_path(out, [], options.overwrite)
        multi = len(stages) > 1
        if options.fit_cache is not None and (multi or stages[0].method != "relex"):
            raise RelexError("--fit-cache: only for a single-stage relex config")
        engine = options.engine()
    stage_root = options.intermediate_dir or out.parent / f".{out.name}.relex-stages"
    result = RunResult(out)
    paths: dict[str, str] = {}
    lines: list[str] = []
    try:
        for stage in stages:
            final = stage.name is None or not multi
            target = out if final else stage_root / stage.name
            where = f"{source}: {stage.label}" if multi else source
            if not final:
                paths[stage.name] = str(target)
                stamp = stage_fingerprint(substitute(stage.document, paths), source)
                if options.lazy and is_hf_model(target):  # stage outputs appear only when complete
                    if _read_stamp(target) == stamp:
                        progress.note(f"stage '{stage.name}': reusing {target}")
                        result.stages.append(StageResult(stage.name, stage.method, target, reused=True))
                        lines.append(_stage_line(stage, result.stages[-1]))
                        continue
                    progress.note(
                        f"stage '{stage.name}': {target} was made from another config or other inputs; rebuilding it"
                    )
                with group.step("creating the stage folder"):
                    if group.main:
                        stage_root.mkdir(parents=True, exist_ok=True)
                progress.note(f"stage '{stage.name}' ({stage.method}) -> {target}")
            provenance = None
            if final and multi:
                provenance = Provenance(source, as_given, tuple(lines), dict(paths))
            document = substitute(stage.document, paths)
            overwrite = options.overwrite if final else True
            if stage.method == "relex":
                with group.step("planning the stage"):
                    plan = plan_merge(parse_config(document, where), options.allow_unsafe_pickle, source=where)
                    if options.fit_cache is not None:
                        plan = replace(plan, job=replace(plan.job, gram_cache=load_fit_cache(options.fit_cache, plan)))
                    check_output_path(target, plan.model_paths, overwrite)
                for warning in plan.warnings:
                    progress.note(f"warning: {warning}")
                merged = execute_merge(
                    plan,
                    target,
                    engine,
                    overwrite=overwrite,
                    shard_size=options.shard_size,
                    output_format=options.output_format,
                    full_hash=options.full_hash,
                    when_unsupported=options.unsupported_policy,
                    tolerance=options.tolerance,
                    provenance=provenance,
                    progress=progress,
                )
                result.stages.append(StageResult(stage.name, "relex", target, merge=merged, plan=plan))
            else:
                # mergekit's runner is one process: rank 0 runs the stage, the others wait
                shown = not isinstance(progress, NullProgress) and not getattr(progress, "quiet", False)
                with group.step(f"running the {stage.method} stage"):
                    if group.main:
                        run_mergekit(
                            document,
                            where,
                            target,
                            device=engine.device.type,
                            shard_size=options.shard_size,
                            quiet=not shown,
                            overwrite=overwrite,
                            provenance=provenance,
                        )
                result.stages.append(StageResult(stage.name, stage.method, target))
            if not final and group.main:  # what --lazy compares before reusing the folder
                (target / STAMP).write_text(stamp + "\n")
            lines.append(_stage_line(stage, result.stages[-1]))
    finally:
        if multi and options.intermediate_dir is None and stage_root.exists() and group.main:
            shutil.rmtree(stage_root, ignore_errors=True)
    return result


def _check_one_target(parameters, where: str) -> None:
    """A stage that later stages read is one model: one target (reconstruct modes default to the
    window's last checkpoint)."""
    targets = parameters.targets() or ([] if parameters.mode == "extrapolate" else ["the last checkpoint"])
    if len(targets) != 1:
        raise RelexError(
            f"{where}: parameters.target_step: a stage used by later stages needs exactly one target step "
            f"(found {len(targets)})"
        )


STAMP = ".relex-stage"  # in a finished stage's folder: the fingerprint of what made it
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".metadata", ".json")
# files without those suffixes that choose which weights are read (DeepSpeed's tag, verl's step)
_POINTERS = ("latest", "latest_checkpointed_iteration.txt")


def _paths_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _paths_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _paths_in(item)


def stage_fingerprint(document: Any, source: str) -> str:
    """A stage's config (its document, earlier stages' folders substituted) and the fast
    fingerprints of the weight and config files under every path it names: ``--lazy`` reuses a
    stage folder only when this matches the one stored in it."""
    import yaml

    digest = hashlib.sha256(yaml.safe_dump(document, sort_keys=True).encode())
    here = Path(source).parent if source and Path(source).is_file() else Path.cwd()
    for value in sorted(set(_paths_in(document))):
        path = Path(value) if Path(value).is_absolute() else here / value
        if not (path.is_file() or path.is_dir()):
            continue
        files = (
            [path]
            if path.is_file()
            else sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in _WEIGHTS or p.name in _POINTERS))
        )
        files = [f for f in files if f.name != STAMP]
        digest.update(value.encode())
        digest.update(input_record(value, files, full_hash=False).fingerprint.encode())
    return digest.hexdigest()


def _read_stamp(folder: Path) -> str | None:
    try:
        return (folder / STAMP).read_text().strip()
    except OSError:
        return None


def yaml_dump(document: Any) -> str:
    """One parsed document back as YAML, keys in their order (the provenance of configs given
    as Python objects)."""
    import yaml

    return yaml.safe_dump(document, sort_keys=False)

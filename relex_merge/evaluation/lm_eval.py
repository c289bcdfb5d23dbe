"""A thin wrapper over lm-eval's Python API (hf backend); offline when every task's data is local."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relex_merge.common.errors import RelexError
from relex_merge.evaluation.offline import offline_if_local
from relex_merge.io.hf import is_hf_model
from relex_merge.output.folders import TOKENIZER_FILES

__all__ = ["RESULTS_NAME", "TaskScore", "EvalResult", "evaluate", "task_manager", "check_tasks"]

RESULTS_NAME = "lm_eval_results.json"  # written into the model folder unless told otherwise


@dataclass(frozen=True)
class TaskScore:
    """One task's primary metric (the first lm-eval reports for it)."""

    task: str
    metric: str  # lm-eval's key, e.g. "exact_match,none"
    value: float
    stderr: float  # NaN when lm-eval gives none


@dataclass(frozen=True)
class EvalResult:
    """One model folder's scores (``evaluate``)."""

    model: str
    scores: list[TaskScore]

    @property
    def mean(self) -> float:
        """The mean of each task's primary metric: what sweep ranks by."""
        return sum(s.value for s in self.scores) / len(self.scores) if self.scores else float("nan")

    @property
    def mean_stderr(self) -> float:
        """Standard error of ``mean``, the tasks taken as independent (NaN stderrs skipped)."""
        if not self.scores:
            return float("nan")
        return math.sqrt(sum(s.stderr**2 for s in self.scores if not math.isnan(s.stderr))) / len(self.scores)


def _primary(task: str, metrics: dict) -> TaskScore | None:
    for key, value in metrics.items():
        # metric keys look like "exact_match,none"; "alias", "name", "sample_len" are not metrics
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        stderr = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
        stderr = float(stderr) if isinstance(stderr, (int, float)) else float("nan")
        return TaskScore(task, key, float(value), stderr)
    return None


def task_manager(include_path: Path | None):
    """lm-eval's TaskManager, with the task YAMLs of ``include_path`` when given (checked)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not include_path.is_dir():
        raise RelexError(f"--include-path: {include_path} is not a directory")
    return TaskManager(include_path=str(include_path)) if include_path else TaskManager()


def check_tasks(tasks: Sequence[str], manager) -> None:
    """RelexError naming the first task the manager does not know (before any work is done)."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise RelexError(
            f"--tasks: unknown task {unknown[0]!r}; add its folder with --include-path (lm-eval task YAML)"
        )


def evaluate(
    model_dir: Path,
    tasks: Sequence[str],
    *,
    include_path: Path | None = None,
    limit: int | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    manager=None,
    quiet: bool = True,
    results_file: Path | None = None,
) -> EvalResult:
    """Score one model folder; the results JSON goes to ``results_file`` (default: into the folder).
    Offline when every task's data is local (relex_merge.evaluation.offline); the model folder always is."""
    if not is_hf_model(model_dir):
        raise RelexError(f"{model_dir}: not a Hugging Face model folder (config.json + weights); convert it first")
    if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):  # lm-eval died on an IndexError
        raise RelexError(
            f"{model_dir}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...); copy the base model's "
            "into it, or merge again with tokenizer_source"
        )
    from lm_eval import simple_evaluate

    manager = manager or task_manager(include_path)
    check_tasks(tasks, manager)
    sink = io.StringIO()
    quiet_ctx = contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext()
    level = logging.getLogger().level
    try:
        with quiet_ctx, offline_if_local(tasks, manager):
            output = simple_evaluate(
                model="hf",
                model_args={"pretrained": str(model_dir), "dtype": "float32"},
                tasks=list(tasks),
                limit=limit,
                device=device,
                batch_size=batch_size,
                task_manager=manager,
                log_samples=False,
                verbosity="ERROR",
            )
    finally:
        logging.getLogger().setLevel(level)
    if output is None:
        raise RelexError(f"{model_dir}: lm-eval returned no results")
    scores = [s for task in tasks if (s := _primary(task, output["results"].get(task, {}))) is not None]
    result = EvalResult(str(model_dir), scores)
    record = {
        "model": str(model_dir),
        "tasks": list(tasks),
        "limit": limit,
        "scores": [s.__dict__ for s in scores],
        "results": output["results"],
    }
    (results_file or model_dir / RESULTS_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return result

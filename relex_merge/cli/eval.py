"""``relex-merge eval MODEL_DIR --tasks T``: score a model folder with lm-eval."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from relex_merge.cli._app import RelexCommand, task_list
from relex_merge.common.errors import RelexError

__all__ = ["COMMAND"]


@click.command("eval", cls=RelexCommand)
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--tasks", required=True, help="Comma-separated lm-eval task names.")
@click.option("--include-path", type=click.Path(path_type=Path, file_okay=False), help="Folder of task YAMLs.")
@click.option("--limit", type=int, default=None, help="Score only the first N documents of each task.")
@click.option("--device", default="cpu", show_default=True, help="Device for lm-eval's hf backend.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option(
    "--output",
    "results_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the results JSON (default: MODEL_DIR/lm_eval_results.json).",
)
@click.option("-v", "--verbose", is_flag=True, help="Full tracebacks and lm-eval's own logging.")
def eval_command(model_dir, tasks, include_path, limit, device, batch_size, results_file, verbose):
    """Score a model folder with lm-eval (offline when the task data is local); results JSON goes
    into the folder or --output."""
    from relex_merge.evaluation.lm_eval import RESULTS_NAME, evaluate

    if not model_dir.is_dir():
        raise RelexError(f"{model_dir}: not a folder")
    if results_file is not None and not results_file.parent.is_dir():
        raise RelexError(f"--output: folder {results_file.parent} does not exist")
    result = evaluate(
        model_dir,
        task_list(tasks),
        include_path=include_path,
        limit=limit,
        device=device,
        batch_size=batch_size,
        quiet=not verbose,
        results_file=results_file,
    )
    table = Table(title=f"lm-eval: {model_dir}")
    for column in ("task", "metric", "value", "stderr"):
        table.add_column(column)
    for score in result.scores:
        table.add_row(score.task, score.metric, f"{score.value:.4f}", f"{score.stderr:.4f}")
    Console().print(table)
    Console().print(escape(f"results: {results_file or model_dir / RESULTS_NAME}"), soft_wrap=True)


COMMAND = eval_command

"""``relex-merge sweep CONFIG OUT --targets ... --tasks ...``: build candidates from one read of the
window, score each with lm-eval, keep the best."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from relex_merge.cli._app import ENGINE_FLAGS, RelexCommand, numbers, progress, rank0, task_list
from relex_merge.config.options import flags

__all__ = ["COMMAND"]


@click.command("sweep", cls=RelexCommand)
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--targets", required=True, help="Comma-separated target steps, e.g. 100,200,400.")
@click.option("--scales", default="1.0", show_default=True, help="Comma-separated scales, e.g. 0.5,1.0.")
@click.option("--fits", default=None, help="Comma-separated fits, e.g. linear,auto,log (default: the config's).")
@click.option("--tasks", required=True, help="Comma-separated lm-eval task names.")
@click.option("--include-path", type=click.Path(path_type=Path, file_okay=False), help="Folder of task YAMLs.")
@click.option("--limit", type=int, default=None, help="Score only the first N documents of each task.")
@click.option(
    "--keep-all", is_flag=True, help="Keep every candidate but the best (which is OUT/best/) under OUT/candidates/."
)
@click.option("-q", "--quiet", is_flag=True, help="Only the final table.")
@click.option("-v", "--verbose", is_flag=True, help="Full tracebacks on errors, and the debug log.")
@flags("overwrite", *ENGINE_FLAGS)
def sweep_command(
    config_path, out, targets, scales, fits, tasks, include_path, limit, keep_all, options, quiet, verbose
):
    """Build candidates for several targets, scales and fits, score each with lm-eval, keep the best."""
    from relex_merge.workflows.sweep import sweep

    task_names = task_list(tasks)
    result = sweep(
        config_path,
        out,
        numbers(targets, "--targets", int),
        numbers(scales, "--scales", float),
        task_names,
        options,
        fits=fits,
        include_path=include_path,
        limit=limit,
        keep_all=keep_all,
        progress=progress(quiet or not rank0()),
    )
    if result is None:  # not rank 0: the build step is done, rank 0 scores
        return
    table = Table(title=f"relex-merge sweep ({', '.join(task_names)}" + (f", limit {limit})" if limit else ")"))
    # numbers never shrink (they are the point); long labels fold onto a second line instead
    table.add_column("candidate", overflow="fold")
    for column in ("target", "scale", "fit"):
        table.add_column(column, justify="right", overflow="fold")
    for column in ("score", "stderr", "verdict"):
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column) + 1)
    for c in [result.baseline, *result.candidates]:
        mark = " (best)" if c is result.best else ""
        supported = (
            "" if c.verdict is None else c.verdict.split(":", 1)[0].lower()
        )  # supported, not supported, untested
        table.add_row(
            c.label + mark,
            str(c.target),
            "" if c.scale is None else f"{c.scale:g}",
            c.fit or "",
            f"{c.result.mean:.4f}",
            f"{c.result.mean_stderr:.4f}",
            supported,
        )
    out_console = Console()
    if not out_console.is_terminal:  # a log or a pipe: no reader's screen to fit, keep every cell whole
        out_console = Console(width=max(out_console.width, 200))
    out_console.print(table)
    out_console.print(
        escape(f"best: {result.best.label}, kept as {result.kept}; it {result.outcome()}"), soft_wrap=True
    )


COMMAND = sweep_command

"""``relex-merge analyze CONFIG``: how well does the window fit each curve family, and how far
ahead does it hold? (backtests, verdicts, and with --out the fit cache and plots)"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from relex_merge.cli._app import ENGINE_FLAGS, RelexCommand, progress, rank0
from relex_merge.common.units import horizon_text
from relex_merge.config.options import flags

__all__ = ["COMMAND"]


@click.command("analyze", cls=RelexCommand)
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write analysis.json, the fit cache and PNG plots here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Every backtest point; full tracebacks on errors.")
@flags("tolerance", "overwrite", *ENGINE_FLAGS)
def analyze_command(config_path, out_dir, as_json, options, quiet, verbose):
    """How well does the window fit each curve family, and how far ahead does it hold? (backtests)"""
    from relex_merge.core.analysis import summary_rows
    from relex_merge.workflows.analyze import analyze
    from relex_merge.workflows.fit_cache import CACHE_NAME

    result = analyze(config_path, options, out_dir, progress=progress(quiet or not rank0()))
    analysis = result.analysis
    if not rank0():
        return
    if as_json:
        click.echo(analysis.to_json())
        return
    out = Console()
    table = Table(title="relex-merge analyze", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary_rows(analysis):
        table.add_row(key, value)
    out.print(table)
    if analysis.families:
        families = Table(title="backtest error by family and horizon (pooled over tensors; horizon in fit spans)")
        families.add_column("fit")
        for lo, hi in analysis.horizon_bins:
            families.add_column(f"{lo:g}-{hi:g}x" if hi != float("inf") else f">{lo:g}x", justify="right")
        families.add_column("supported up to", justify="right")
        for row in analysis.families:
            cells = ["" if e is None else f"{e:.1%}" for e in row.errors]
            stop = row.family == "stop"
            support = "" if stop else ("none" if row.supported_horizon is None else horizon_text(row.supported_horizon))
            families.add_row("stopping (last fitted checkpoint)" if stop else row.fit, *cells, support)
        out.print(families)
    if verbose:
        backtest = Table(title=f"backtest of {analysis.fit}: fit on the first K checkpoints, predict the later ones")
        for column in ("K", "held-out step", "horizon (x fit span)", "relative error", "cosine", "norm ratio"):
            backtest.add_column(column, justify="right")
        for p in analysis.backtest:
            backtest.add_row(
                str(p.fit_count),
                str(p.step),
                f"{p.horizon:.2f}",
                f"{p.relative_error:.2%}",
                f"{p.cosine:.4f}",
                f"{p.norm_ratio:.3f}",
            )
        out.print(backtest)
    out.print("[bold]verdict[/]")
    for line in analysis.verdict:
        out.print(f"- {escape(line)}", soft_wrap=True)
    if out_dir is not None:
        plots = [p.name for p in result.written if p.suffix == ".png"]
        extra = f", plots: {', '.join(plots)}" if plots else " (no plots: pip install 'relex-merge[plots]')"
        out.print(escape(f"wrote {out_dir}/analysis.json and {out_dir}/{CACHE_NAME}{extra}"), soft_wrap=True)


COMMAND = analyze_command

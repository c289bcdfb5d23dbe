"""The ``relex-merge`` command line: parse arguments, call the library, render the results.
``relex-merge CONFIG OUT`` merges. Everything else lives in the library (run_merge, analyze,
sweep, evaluate, convert), which Python callers use directly."""

from __future__ import annotations

import functools
import logging
import signal
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress as RichBar,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from relex_merge import __version__
from relex_merge.common.errors import RelexError, Terminated, exit_code, one_line
from relex_merge.config.options import flags
from relex_merge.common.units import human_bytes

__all__ = [
    "main",
    "user_errors",
    "Terminated",
    "RichProgress",
    "DefaultMergeGroup",
    "quiet_and_verbose",
    "ENGINE_FLAGS",
]

# Options fields of every command that runs the engine (merge, analyze, sweep)
# every command that runs the engine (merge, analyze, sweep): the engine's own errors may name any of them
ENGINE_FLAGS = ("max_memory", "device", "threads", "allow_unsafe_pickle", "allow_nonfinite", "timeout")


def _raise_terminated(signum, frame):
    raise Terminated()


def user_errors(func):
    """One clear line for every failure (exit 2 for bad input and environment problems, 3 for
    an unsupported target under --require-supported); the full trace only with -v (which also
    shows the library's debug log). SIGINT/SIGTERM exit 130/143 after partial output is removed.

    Under torchrun or srun every command first joins the process group; a failure on any rank
    stops every rank, and only rank 0 prints, naming the rank that failed."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from relex_merge.engine import process_group

        verbose = kwargs.get("verbose", False)
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        if verbose:
            logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
            logging.getLogger("relex_merge").setLevel(logging.DEBUG)

        def fail(exc: BaseException, code: int):
            group = process_group.current()
            if group.distributed and not group.main:
                sys.exit(code)  # rank 0 reports for every rank
            if verbose:
                traceback.print_exc()
            if isinstance(exc, (KeyboardInterrupt, Terminated)) and not group.distributed:
                err.print(one_line(exc))  # not an error: the user asked
                sys.exit(code)
            message = group.describe_failure(exc)
            err.print(f"[bold red]error:[/] {escape(message)}")
            sys.exit(code)

        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            process_group.join(float(kwargs.get("timeout") or process_group.DEFAULT_TIMEOUT))
            return func(*args, **kwargs)
        except (Exception, KeyboardInterrupt, Terminated) as exc:  # a bug too: one line, the trace with -v
            fail(exc, exit_code(exc))
        finally:
            signal.signal(signal.SIGTERM, previous)
            process_group.leave()

    return wrapper


def quiet_and_verbose(func):
    """Add the shared -q/--quiet and -v/--verbose flags to a command (``user_errors`` reads
    ``verbose``)."""
    func = click.option("-v", "--verbose", is_flag=True, help="Full tracebacks on errors, and the debug log.")(func)
    return click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")(func)


class DefaultMergeGroup(click.Group):
    """``relex-merge CONFIG OUT`` is short for ``relex-merge merge CONFIG OUT``."""

    def parse_args(self, ctx, args):
        """Prepend ``merge`` when the first argument is not a subcommand (or help/version)."""
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["merge", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultMergeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relex-merge")
def main() -> None:
    """Predict a later RL checkpoint from a window of earlier ones (RELEX).

    Run `relex-merge CONFIG OUT` (same as `relex-merge merge CONFIG OUT`).
    """


class RichProgress:
    """The library's Progress protocol as a transient rich bar; notes are printed above it.
    ``quiet``: no bar and no notes but warnings."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self.bar: RichBar | None = None
        self.task = None
        self.items = 0
        self.total_items: int | None = None

    def start(self, label: str, total_bytes: int | None = None, total_items: int | None = None) -> None:
        """Replace any running bar with a new one for this task (no bar when quiet)."""
        self.finish()
        if self.quiet:
            return
        self.items, self.total_items = 0, total_items
        self.bar = RichBar(
            TextColumn(f"[bold]{escape(label)}[/]"), BarColumn(), TextColumn("{task.fields[items]}"),
            DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            console=self.console, transient=True,  # the summary replaces it; an error leaves only its own line
        )
        self.bar.start()
        self.task = self.bar.add_task(label, total=total_bytes, items=self._items())

    def _items(self) -> str:
        return f"{self.items}/{self.total_items} tensors" if self.total_items else ""

    def advance(self, nbytes: int = 0, items: int = 0) -> None:
        """Move the bar by ``nbytes`` and the tensor count by ``items``."""
        if self.bar is not None:
            self.items += items
            self.bar.update(self.task, advance=nbytes, items=self._items())

    def note(self, text: str) -> None:
        """Print a line above the bar; ``warning: ...`` lines in yellow, and even when quiet."""
        if text.startswith("warning: "):
            self.console.print(f"[yellow]warning:[/] {escape(text[9:])}")
        elif not self.quiet:
            self.console.print(escape(text))

    def finish(self) -> None:
        """Stop and remove the bar (it is transient: the summary takes its place)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _progress(quiet: bool) -> RichProgress:
    return RichProgress(Console(stderr=True, soft_wrap=True), quiet)


def _rank0() -> bool:
    """Only rank 0 of a torchrun/srun run talks to the user (a single process is rank 0)."""
    from relex_merge.engine import process_group

    return process_group.current().main


def _summary_table(plan, result, profile: bool = False) -> Table:
    summary = result.summary
    table = Table(title="relex-merge", show_header=True)
    table.add_column("target step", justify="right")
    table.add_column("output")
    for target, _, folder in result.outputs:
        table.add_row(str(target), str(folder))
    ev1, r2 = summary.explained_variance_1, summary.linear_r2
    stats = Table(show_header=False, box=None)
    stats.add_column(style="bold")
    stats.add_column()
    cached = sum(1 for r in result.stats.tensors if r.diagnostics is not None and r.passes == 1)
    seconds = max(result.seconds, 1e-9)
    inputs = plan.job.input_bytes
    passes = "2: Gram, then outputs" if not cached else f"1 for {cached} tensors: Gram matrices from the fit cache"
    rows = [
        ("window", f"{len(plan.job.steps)} checkpoints, steps {plan.job.steps[0]}..{plan.job.steps[-1]}"),
        ("tensors", f"{summary.extrapolated} fitted, {summary.zero_delta} unchanged, "
         f"{summary.copied} copied"),
        ("rank-1 explained variance", f"{ev1.weighted_mean:.4f} mean, {ev1.minimum:.4f} min" if ev1 else "n/a"),
        ("linear R²", f"{r2.weighted_mean:.4f} mean, {r2.minimum:.4f} min" if r2 else "n/a"),
        ("read", f"{human_bytes(inputs)} of inputs in {seconds:.2f} s ({human_bytes(inputs / seconds)}/s)"),
        ("passes", f"{passes} ({human_bytes(result.stats.bytes_read)} read)"),
        ("written", human_bytes(result.bytes_written)),
    ]
    if summary.nonfinite:
        rows.append(("non-finite", f"{len(summary.nonfinite)} tensors copied from the base (--allow-nonfinite)"))
    if profile:
        s = result.stats
        workers = f"{s.workers} worker" + ("s" if s.workers != 1 else "")
        rows.append(("profile", f"wall {seconds:.2f} s; {workers} busy "
                                f"{s.read_seconds + s.math_seconds + s.write_seconds:.2f} s: "
                                f"{s.read_seconds:.2f} s opening spans, {s.math_seconds:.2f} s deltas, Gram "
                                f"products and weighted sums (page faults on mapped inputs included), "
                                f"{s.write_seconds:.2f} s writing; main thread {s.fit_seconds:.2f} s fitting"))
    for key, value in rows:
        stats.add_row(key, value)
    outer = Table.grid()
    outer.add_row(table)
    outer.add_row(stats)
    return outer


@main.command("merge")
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--print-config", is_flag=True, help="Print the expanded config and exit.")
@quiet_and_verbose
@user_errors
@flags("overwrite", *ENGINE_FLAGS, "shard_size", "intermediate_dir", "lazy", "full_hash",
       "profile", "fit_cache", "require_supported", "tolerance")
def merge_command(config_path, out, print_config, options, quiet, verbose):
    """Run a merge config: relex (streaming engine), any mergekit method, or several stages."""
    from relex_merge.config.schema import load_documents
    from relex_merge.workflows.merge import run_merge
    from relex_merge.config.stages import expanded_yaml

    if print_config:
        click.echo(expanded_yaml(load_documents(config_path), str(config_path)), nl=False)
        return
    if out is None:
        raise RelexError("OUT: give an output folder (or --print-config)")
    quiet = quiet or not _rank0()
    result = run_merge(config_path, out, options, progress=_progress(quiet))
    if quiet:
        return
    console = Console()
    for stage in result.stages:
        if stage.merge is not None:
            console.print(_summary_table(stage.plan, stage.merge, options.profile))
            for verdict in stage.merge.assessment.verdicts:
                if verdict is not None:
                    colour = "green" if verdict.supported else "yellow"
                    console.print(f"[bold {colour}]verdict:[/] {escape(verdict.line())}", soft_wrap=True)
    if result.final.merge is None:
        console.print(escape(f"{result.final.method} merge written to {result.out}"))


class _ConvertCommand(click.Command):
    """``convert --help`` ends with the formats it reads, from the format registry (imported only
    when that help is shown: it loads torch)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from relex_merge.io.formats import formats

        with formatter.section("Checkpoint formats (tried in this order)"):
            formatter.write_dl([(fmt.name, fmt.description) for fmt in formats()])
        super().format_epilog(ctx, formatter)


@main.command("convert", cls=_ConvertCommand)
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["keep", "float32", "bfloat16", "float16"]), default="keep",
              show_default=True, help="Dtype of the written float tensors (keep: as stored).")
@click.option("--config-from", type=click.Path(path_type=Path, file_okay=False),
              help="HF folder with config.json and tokenizer (default: SRC or SRC/huggingface).")
@quiet_and_verbose
@user_errors
@flags("overwrite", "shard_size", "max_memory", "allow_unsafe_pickle", "timeout")
def convert_command(src, out, dtype, config_from, options, quiet, verbose):
    """Convert a checkpoint (HF, .bin, verl FSDP shards, DCP, ZeRO) to an HF safetensors folder."""
    from relex_merge.workflows.convert import convert

    quiet = quiet or not _rank0()
    result = convert(src, out, options, dtype=dtype, config_from=config_from, progress=_progress(quiet))
    if not quiet:
        Console().print(escape(f"wrote {out}: {result.tensors} tensors, {human_bytes(result.bytes_written)}, "
                               f"{result.dtype}"))


@main.command("analyze")
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Write analysis.json, the fit cache and PNG plots here.")
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Every backtest point; full tracebacks on errors.")
@user_errors
@flags("tolerance", "overwrite", *ENGINE_FLAGS)
def analyze_command(config_path, out_dir, as_json, options, quiet, verbose):
    """How well does the window fit each curve family, and how far ahead does it hold? (backtests)"""
    from relex_merge.workflows.analyze import CACHE_NAME, analyze, summary_rows

    result = analyze(config_path, options, out_dir, progress=_progress(quiet or not _rank0()))
    analysis = result.analysis
    if not _rank0():
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
            support = "" if stop else ("none" if row.supported_horizon is None else f"{row.supported_horizon:.2f}x")
            families.add_row("stopping (last fitted checkpoint)" if stop else row.fit, *cells, support)
        out.print(families)
    if verbose:
        backtest = Table(title=f"backtest of {analysis.fit}: fit on the first K checkpoints, predict the later ones")
        for column in ("K", "held-out step", "horizon (x fit span)", "relative error", "cosine", "norm ratio"):
            backtest.add_column(column, justify="right")
        for p in analysis.backtest:
            backtest.add_row(str(p.fit_count), str(p.step), f"{p.horizon:.2f}", f"{p.relative_error:.2%}",
                             f"{p.cosine:.4f}", f"{p.norm_ratio:.3f}")
        out.print(backtest)
    out.print("[bold]verdict[/]")
    for line in analysis.verdict:
        out.print(f"- {escape(line)}", soft_wrap=True)
    if out_dir is not None:
        plots = [p.name for p in result.written if p.suffix == ".png"]
        extra = f", plots: {', '.join(plots)}" if plots else " (no plots: pip install 'relex-merge[plots]')"
        out.print(escape(f"wrote {out_dir}/analysis.json and {out_dir}/{CACHE_NAME}{extra}"), soft_wrap=True)


def _task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise RelexError("--tasks: give at least one lm-eval task")
    return tasks


def _numbers(text: str, option: str, kind):
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RelexError(f"{option}: expected comma-separated numbers, got {text!r}") from None


@main.command("eval")
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--tasks", required=True, help="Comma-separated lm-eval task names.")
@click.option("--include-path", type=click.Path(path_type=Path, file_okay=False), help="Folder of task YAMLs.")
@click.option("--limit", type=int, default=None, help="Score only the first N documents of each task.")
@click.option("--device", default="cpu", show_default=True, help="Device for lm-eval's hf backend.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--output", "results_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the results JSON (default: MODEL_DIR/lm_eval_results.json).")
@click.option("-v", "--verbose", is_flag=True, help="Full tracebacks and lm-eval's own logging.")
@user_errors
def eval_command(model_dir, tasks, include_path, limit, device, batch_size, results_file, verbose):
    """Score a model folder with lm-eval (offline when the task data is local); results JSON goes into the folder or --output."""
    from relex_merge.evaluation.lm_eval import RESULTS_NAME, evaluate

    if not model_dir.is_dir():
        raise RelexError(f"{model_dir}: not a folder")
    if results_file is not None and not results_file.parent.is_dir():
        raise RelexError(f"--output: folder {results_file.parent} does not exist")
    result = evaluate(model_dir, _task_list(tasks), include_path=include_path, limit=limit, device=device,
                      batch_size=batch_size, quiet=not verbose, results_file=results_file)
    table = Table(title=f"lm-eval: {model_dir}")
    for column in ("task", "metric", "value", "stderr"):
        table.add_column(column)
    for score in result.scores:
        table.add_row(score.task, score.metric, f"{score.value:.4f}", f"{score.stderr:.4f}")
    Console().print(table)
    Console().print(escape(f"results: {results_file or model_dir / RESULTS_NAME}"), soft_wrap=True)


@main.command("sweep")
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--targets", required=True, help="Comma-separated target steps, e.g. 100,200,400.")
@click.option("--scales", default="1.0", show_default=True, help="Comma-separated scales, e.g. 0.5,1.0.")
@click.option("--fits", default=None, help="Comma-separated fits, e.g. linear,auto,log (default: the config's).")
@click.option("--tasks", required=True, help="Comma-separated lm-eval task names.")
@click.option("--include-path", type=click.Path(path_type=Path, file_okay=False), help="Folder of task YAMLs.")
@click.option("--limit", type=int, default=None, help="Score only the first N documents of each task.")
@click.option("--keep-all", is_flag=True, help="Keep every candidate but the best (which is OUT/best/) under OUT/candidates/.")
@click.option("-q", "--quiet", is_flag=True, help="Only the final table.")
@click.option("-v", "--verbose", is_flag=True, help="Full tracebacks on errors, and the debug log.")
@user_errors
@flags("overwrite", *ENGINE_FLAGS)
def sweep_command(config_path, out, targets, scales, fits, tasks, include_path, limit, keep_all, options, quiet,
                  verbose):
    """Build candidates for several targets, scales and fits, score each with lm-eval, keep the best."""
    from relex_merge.workflows.sweep import sweep

    task_list = _task_list(tasks)
    result = sweep(
        config_path, out, _numbers(targets, "--targets", int), _numbers(scales, "--scales", float), task_list,
        options, fits=fits, include_path=include_path, limit=limit, keep_all=keep_all,
        progress=_progress(quiet or not _rank0()),
    )
    if result is None:  # not rank 0: the build step is done, rank 0 scores
        return
    table = Table(title=f"relex-merge sweep ({', '.join(task_list)}" + (f", limit {limit})" if limit else ")"))
    # numbers never shrink (they are the point); long labels fold onto a second line instead
    table.add_column("candidate", overflow="fold")
    for column in ("target", "scale", "fit"):
        table.add_column(column, justify="right", overflow="fold")
    for column in ("score", "stderr", "supported"):
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column) + 1)
    for c in [result.baseline, *result.candidates]:
        mark = " (best)" if c is result.best else ""
        supported = "" if c.verdict is None else ("yes" if c.verdict.startswith("SUPPORTED") else "no")
        table.add_row(c.label + mark, str(c.target), "" if c.scale is None else f"{c.scale:g}", c.fit or "",
                      f"{c.result.mean:.4f}", f"{c.result.mean_stderr:.4f}", supported)
    out_console = Console()
    if not out_console.is_terminal:  # a log or a pipe: no reader's screen to fit, keep every cell whole
        out_console = Console(width=max(out_console.width, 200))
    out_console.print(table)
    out_console.print(escape(f"best: {result.best.label}, kept as {result.kept}; it {result.outcome()}"),
                      soft_wrap=True)


if __name__ == "__main__":
    main()

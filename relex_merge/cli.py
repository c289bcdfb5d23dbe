"""The ``relex-merge`` command line (click + rich). ``relex-merge CONFIG OUT`` merges."""

from __future__ import annotations

import errno
import functools
import re
import signal
import sys
import traceback
from pathlib import Path

import click
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from relex_merge import __version__
from relex_merge.errors import RelexError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(text: str, option: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise RelexError(f"{option}: cannot read size {text!r} (examples: 8GB, 512MiB, 1000000)")
    unit = (match.group(2) or "").lower().rstrip("b")
    return int(float(match.group(1)) * _UNITS[unit])


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.2f} TB"


def default_max_memory() -> int:
    import psutil

    return max(256 * 1024**2, int(psutil.virtual_memory().available * 0.5))


def resolve_device(text: str):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise RelexError(f"--device: expected auto, cpu, cuda or cuda:N, got {text!r}")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RelexError("--device: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RelexError(f"--device: no GPU {device.index} (found {torch.cuda.device_count()})")
    return device


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that partial output is removed on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free space or choose another output folder",
    errno.EDQUOT: "disk quota exceeded; free space or choose another output folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system; choose another output folder",
}


def user_errors(func):
    """One clear line for every failure (exit 2 for bad input and environment problems);
    the full trace only with -v. SIGINT/SIGTERM exit 130/143 after partial output is removed."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        verbose = kwargs.get("verbose", False)
        err = Console(stderr=True, highlight=False, soft_wrap=True)

        def fail(message: str, code: int):
            if verbose:
                traceback.print_exc()
            err.print(f"[bold red]error:[/] {escape(message)}")
            sys.exit(code)

        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return func(*args, **kwargs)
        except RelexError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted; partial output removed, inputs untouched")
            sys.exit(130)
        except Terminated:
            err.print("terminated; partial output removed, inputs untouched")
            sys.exit(143)
        except OSError as exc:
            where = exc.filename or "i/o"
            advice = _OS_ADVICE.get(exc.errno, exc.strerror or str(exc))
            fail(f"{where}: {advice}", 2)
        except Exception as exc:  # a bug: say so, briefly
            fail(f"{type(exc).__name__}: {exc} (rerun with -v for the full trace)", 1)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def engine_flags(func):
    """--max-memory, --device, --threads and --allow-unsafe-pickle: every command that reads a window."""
    for option in reversed([
        click.option("--max-memory", default=None,
                     help="Memory budget for tensor data, e.g. 8GB (default: half the free RAM)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Worker threads (default: one per core, at most 8)."),
        click.option("--allow-unsafe-pickle", is_flag=True,
                     help="Load .bin/.pt pickles that need more than weights-only loading (trusted files only)."),
    ]):
        func = option(func)
    return func


class DefaultMergeGroup(click.Group):
    """``relex-merge CONFIG OUT`` is short for ``relex-merge merge CONFIG OUT``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["merge", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultMergeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relex-merge")
def main() -> None:
    """Predict a later RL checkpoint from a window of earlier ones (RELEX).

    Run `relex-merge CONFIG OUT` (same as `relex-merge merge CONFIG OUT`).
    """


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]relex[/]"),
        BarColumn(),
        TextColumn("{task.fields[tensors]}"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,  # the summary replaces it; an error leaves only its own line
    )


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


def _run_relex_stage(
    config, out, options, *, overwrite, shard_size, quiet, allow_unsafe_pickle, full_hash, profile=False,
    fit_cache=None, single_target_only=False, require_supported=False, tolerance=0.2,
):
    from relex_merge.engine import planned_read_bytes
    from relex_merge.merge import execute_merge
    from relex_merge.output import check_output_path
    from relex_merge.plan import plan_merge

    plan = plan_merge(config, allow_unsafe_pickle)
    if fit_cache is not None:
        from dataclasses import replace

        from relex_merge.analyze import load_fit_cache

        plan = replace(plan, job=replace(plan.job, gram_cache=load_fit_cache(fit_cache, plan)))
    if single_target_only and len(plan.job.targets) != 1:
        raise RelexError(
            f"stage '{config.name}': a stage used by later stages needs exactly one target_step"
        )
    check_output_path(out, plan.model_paths, overwrite)  # before the progress bar starts
    console = Console(stderr=True, soft_wrap=True)
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    run = dict(overwrite=overwrite, shard_size=shard_size, full_hash=full_hash, require_supported=require_supported,
               tolerance=tolerance)
    if quiet:
        execute_merge(plan, out, options, **run)
        return
    total_tensors = len(plan.job.base.names())
    with _progress(console) as progress:
        total = planned_read_bytes(plan.job, options)
        task = progress.add_task("merge", total=total, tensors=f"0/{total_tensors} tensors")
        done = 0

        def on_progress(nbytes: int, finished: bool) -> None:
            nonlocal done
            done += finished
            progress.update(task, advance=nbytes, tensors=f"{done}/{total_tensors} tensors")

        result = execute_merge(plan, out, options, progress=on_progress, **run)
    Console().print(_summary_table(plan, result, profile))
    for verdict in result.assessment.verdicts:
        if verdict is not None:
            colour = "green" if verdict.supported else "yellow"
            Console().print(f"[bold {colour}]verdict:[/] {escape(verdict.line())}", soft_wrap=True)


def _print_expanded(documents, source) -> None:
    from relex_merge.config import parse_config
    from relex_merge.plan import expand_config

    texts = []
    for number, doc in enumerate(documents, 1):
        if isinstance(doc, dict) and doc.get("merge_method") == "relex":
            where = f"{source}: document {number}" if len(documents) > 1 else source
            texts.append(expand_config(parse_config(doc, where)).to_yaml())
        else:
            texts.append(yaml.safe_dump(doc, sort_keys=False))
    click.echo("---\n".join(texts), nl=False)


@main.command("merge")
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--print-config", is_flag=True, help="Print the expanded config and exit.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@engine_flags
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--intermediate-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Keep multi-stage intermediates here (default: a temporary folder beside OUT, removed after).")
@click.option("--lazy", is_flag=True, help="Reuse stages already finished in --intermediate-dir.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge although inputs hold NaN/Inf (those tensors are copied from the base).")
@click.option("--hash", "full_hash", is_flag=True, help="Fingerprint inputs with a full sha256 (default: fast sampled hash).")
@click.option("--profile", is_flag=True, help="Print the split of time between reading, math and writing.")
@click.option("--fit-cache", type=click.Path(path_type=Path, dir_okay=False),
              help="Gram matrices saved by `analyze --out`: skips the Gram pass (single-stage relex configs).")
@click.option("--require-supported", is_flag=True,
              help="Refuse (exit 3, nothing written) a target the backtest does not support.")
@click.option("--tolerance", default=0.2, show_default=True, type=float,
              help="Backtest relative error under which a fit counts as holding (the verdict).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("-v", "--verbose", is_flag=True, help="Full tracebacks on errors.")
@user_errors
def merge_command(
    config_path, out, print_config, overwrite, max_memory, device, threads, shard_size, intermediate_dir, lazy,
    allow_unsafe_pickle, allow_nonfinite, full_hash, profile, fit_cache, require_supported, tolerance, quiet, verbose,
):
    """Run a merge config: relex (streaming engine), any mergekit method, or several stages."""
    import shutil

    from relex_merge.config import load_documents, parse_config
    from relex_merge.mergekit_runner import known_methods, run_mergekit
    from relex_merge.output import check_output_path
    from relex_merge.io.hf import is_hf_model
    from relex_merge.stages import parse_stages, substitute

    documents = load_documents(config_path)
    if print_config:
        _print_expanded(documents, config_path)
        return
    # mergekit (and transformers behind it) takes seconds to import: only when a stage needs it
    only_relex = all(isinstance(d, dict) and d.get("merge_method") == "relex" for d in documents)
    stages = parse_stages(documents, str(config_path), ["relex"] if only_relex else known_methods())
    if out is None:
        raise RelexError("OUT: give an output folder (or --print-config)")
    options = _engine_options(max_memory, device, threads, allow_nonfinite)
    if not 0 < tolerance < 10:
        raise RelexError("--tolerance: expected a relative error such as 0.2")
    shard_bytes = parse_size(shard_size, "--shard-size")
    if shard_bytes <= 0:
        raise RelexError("--shard-size must be positive")
    if lazy and intermediate_dir is None:
        raise RelexError("--lazy: give --intermediate-dir, where finished stages are kept")
    check_output_path(out, [], overwrite)
    multi = len(stages) > 1
    if fit_cache is not None and (multi or stages[0].method != "relex"):
        raise RelexError("--fit-cache: only for a single-stage relex config")
    stage_root = intermediate_dir or out.parent / f".{out.name}.relex-stages"
    console = Console(stderr=True, soft_wrap=True)
    paths: dict[str, str] = {}
    try:
        for stage in stages:
            target = out if stage.name is None or not multi else stage_root / stage.name
            where = f"{config_path}: {stage.label}" if multi else str(config_path)
            if multi and stage.name is not None:
                paths[stage.name] = str(target)
                if lazy and is_hf_model(target):  # stage outputs appear only when complete
                    if not quiet:
                        console.print(escape(f"stage '{stage.name}': reusing {target}"))
                    continue
                stage_root.mkdir(parents=True, exist_ok=True)
                if not quiet:
                    console.print(f"[bold]stage {escape(repr(stage.name))}[/] ({stage.method}) -> {escape(str(target))}")
            document = substitute(stage.document, paths)
            stage_overwrite = overwrite if target == out else True
            if stage.method == "relex":
                _run_relex_stage(
                    parse_config(document, where), target, options, overwrite=stage_overwrite,
                    shard_size=shard_bytes, quiet=quiet, allow_unsafe_pickle=allow_unsafe_pickle,
                    full_hash=full_hash, profile=profile, fit_cache=fit_cache,
                    single_target_only=target != out, require_supported=require_supported, tolerance=tolerance,
                )
            else:
                run_mergekit(
                    document, where, target, device=options.device.type, shard_size=shard_bytes,
                    quiet=quiet, overwrite=stage_overwrite,
                )
                if not quiet and target == out:
                    Console().print(f"{stage.method} merge written to {out}")
    finally:
        if multi and intermediate_dir is None and stage_root.exists():
            shutil.rmtree(stage_root, ignore_errors=True)


class _ConvertCommand(click.Command):
    """``convert --help`` ends with the formats it reads, from the format registry (imported only
    when that help is shown: it loads torch)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from relex_merge.io.registry import formats

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
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--max-memory", default=None, help="Memory budget for tensor data (default: half the free RAM).")
@click.option("--allow-unsafe-pickle", is_flag=True, help="Load pickles that need more than weights-only loading.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("-v", "--verbose", is_flag=True, help="Full tracebacks on errors.")
@user_errors
def convert_command(src, out, dtype, config_from, overwrite, shard_size, max_memory, allow_unsafe_pickle, quiet, verbose):
    """Convert a checkpoint (HF, .bin, verl FSDP shards, DCP, ZeRO) to an HF safetensors folder."""
    from relex_merge.convert import plan_convert, write_converted

    budget = parse_size(max_memory, "--max-memory") if max_memory else default_max_memory()
    shard_bytes = parse_size(shard_size, "--shard-size")
    plan = plan_convert(
        src, out, dtype=dtype, config_from=config_from, overwrite=overwrite, allow_unsafe_pickle=allow_unsafe_pickle
    )
    console = Console(stderr=True, soft_wrap=True)
    for warning in plan.reader.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if quiet:
        write_converted(plan, shard_size=shard_bytes, max_memory=budget)
        return
    with Progress(TextColumn("[bold]convert[/]"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task("convert", total=None)

        def on_progress(nbytes: int, total: int) -> None:
            progress.update(task, advance=nbytes, total=total)

        result = write_converted(plan, shard_size=shard_bytes, max_memory=budget, progress=on_progress)
    Console().print(f"wrote {out}: {result.tensors} tensors, {human_bytes(result.bytes_written)}, {result.dtype}")


def _engine_options(max_memory, device, threads=None, allow_nonfinite=False):
    from relex_merge.engine import EngineOptions

    budget = parse_size(max_memory, "--max-memory") if max_memory else default_max_memory()
    if budget <= 0:
        raise RelexError("--max-memory must be positive")
    return EngineOptions(max_memory=budget, device=resolve_device(device), allow_nonfinite=allow_nonfinite,
                         threads=threads)


@main.command("analyze")
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Write analysis.json, the fit cache and PNG plots here.")
@click.option("--tolerance", default=0.2, show_default=True, type=float,
              help="Backtest relative error under which the line counts as holding.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@engine_flags
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Every backtest point, and full tracebacks on errors.")
@user_errors
def analyze_command(config_path, out_dir, tolerance, overwrite, max_memory, device, threads, allow_unsafe_pickle,
                    as_json, quiet, verbose):
    """How well does the window fit a line, and how far ahead does it hold? (backtests)"""
    from relex_merge.analyze import CACHE_NAME, run_analysis, summary_rows, write_fit_cache
    from relex_merge.config import load_config
    from relex_merge.output import atomic_output_dir, check_output_path
    from relex_merge.plan import plan_merge
    from relex_merge import plots

    if not 0 < tolerance < 10:
        raise RelexError("--tolerance: expected a relative error such as 0.2")
    plan = plan_merge(load_config(config_path), allow_unsafe_pickle, require_targets=False)
    options = _engine_options(max_memory, device, threads)
    if out_dir is not None:
        check_output_path(out_dir, plan.model_paths, overwrite)
    console = Console(stderr=True, soft_wrap=True)
    if quiet:
        analysis, stats = run_analysis(plan, options, tolerance)
    else:
        from relex_merge.engine import planned_read_bytes

        total = planned_read_bytes(plan.job.gram_only(), options)
        with _progress(console) as progress:
            task = progress.add_task("analyze", total=total, tensors="reading the window")
            analysis, stats = run_analysis(
                plan, options, tolerance, progress=lambda n, done: progress.update(task, advance=n)
            )
    written = []
    if out_dir is not None:
        with atomic_output_dir(out_dir) as tmp:
            (tmp / "analysis.json").write_text(analysis.to_json())
            write_fit_cache(tmp / CACHE_NAME, plan, stats.tensors)
            if plots.available():
                written = [p.name for p in plots.write_plots(analysis, tmp)]
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
            support = "" if row.family == "stop" else ("none" if row.supported_horizon is None else f"{row.supported_horizon:.2f}x")
            families.add_row("stopping (last fitted checkpoint)" if row.family == "stop" else row.fit, *cells, support)
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
        extra = f", plots: {', '.join(written)}" if written else " (no plots: pip install 'relex-merge[plots]')"
        out.print(escape(f"wrote {out_dir}/analysis.json and {out_dir}/{CACHE_NAME}{extra}"), soft_wrap=True)


def _task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise RelexError("--tasks: give at least one lm-eval task")
    return tasks


def _fit_list(text: str, configured):
    """--fits: family names or auto; the config's own family keeps its shape, others are chosen."""
    from relex_merge import fits
    from relex_merge.fit import FitSpec

    out = []
    for name in (v.strip() for v in text.split(",") if v.strip()):
        if name != fits.AUTO and name not in fits.names():
            raise RelexError(f"--fits: unknown fit {name!r}; choose {', '.join(fits.names())} or {fits.AUTO}")
        out.append(configured if name == configured.family else FitSpec(name, None, configured.origin_step))
    if not out:
        raise RelexError("--fits: give at least one fit")
    return out


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
    """Score a model folder with lm-eval (offline); results JSON goes into the folder or --output."""
    from relex_merge.evaluate import RESULTS_NAME, evaluate

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
@click.option("--keep-all", is_flag=True, help="Keep every candidate under OUT/candidates/.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
@engine_flags
@click.option("-q", "--quiet", is_flag=True, help="Only the final table.")
@click.option("-v", "--verbose", is_flag=True, help="Full tracebacks on errors.")
@user_errors
def sweep_command(config_path, out, targets, scales, fits, tasks, include_path, limit, keep_all, overwrite, max_memory,
                  device, threads, allow_unsafe_pickle, quiet, verbose):
    """Build candidates for several targets and scales, score each with lm-eval, keep the best."""
    from relex_merge.config import load_config
    from relex_merge.plan import plan_merge
    from relex_merge.sweep import run_sweep

    target_list = _numbers(targets, "--targets", int)
    scale_list = _numbers(scales, "--scales", float)
    plan = plan_merge(load_config(config_path), allow_unsafe_pickle, require_targets=False)
    fit_list = _fit_list(fits, plan.job.spec.fit) if fits else None
    console = Console(stderr=True, soft_wrap=True)
    result = run_sweep(
        plan, out, target_list, scale_list, _task_list(tasks), _engine_options(max_memory, device, threads), fits=fit_list,
        include_path=include_path, limit=limit, keep_all=keep_all, overwrite=overwrite,
        say=(lambda text: None) if quiet else (lambda text: console.print(escape(text))),
    )
    table = Table(title=f"relex-merge sweep ({', '.join(_task_list(tasks))}" + (f", limit {limit})" if limit else ")"))
    table.add_column("candidate", no_wrap=True)
    for column in ("target", "scale", "fit", "score", "stderr", "supported"):
        table.add_column(column, justify="right")
    for c in [result.baseline, *result.candidates]:
        mark = " (best)" if c is result.best else ""
        supported = "" if c.verdict is None else ("yes" if c.verdict.startswith("SUPPORTED") else "no")
        table.add_row(c.label + mark, str(c.target), "" if c.scale is None else f"{c.scale:g}", c.fit or "",
                      f"{c.result.mean:.4f}", f"{c.result.mean_stderr:.4f}", supported)
    out_console = Console()
    out_console.print(table)
    verdict = "beats" if result.best.result.mean > result.baseline.result.mean else "does NOT beat"
    out_console.print(escape(f"best: {result.best.label}, kept as {result.kept}; it {verdict} the last window "
                             f"checkpoint ({result.baseline.result.mean:.4f})"), soft_wrap=True)


if __name__ == "__main__":
    main()

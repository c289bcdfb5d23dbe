"""``relex-merge watch CONFIG``: follow a run directory as checkpoints land; refresh the analysis
(terminal, analysis.json, plots) and write the targets the backtest supports (or, on SIGUSR1 or
with --write always, every target). Ctrl-C stops it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from relex_merge.cli._app import RelexCommand, quiet_and_verbose
from relex_merge.common.units import human_bytes
from relex_merge.config.options import flags

__all__ = ["COMMAND"]


@click.command("watch", cls=RelexCommand)
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write analysis.json, watch.json, the plots and the targets (step-N/) here.",
)
@click.option("--once", is_flag=True, help="Look once, report, write what is due, and exit.")
@click.option(
    "--poll",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds between looks at the run directory.",
)
@click.option(
    "--max-wait",
    type=click.FloatRange(min=0),
    default=None,
    help="Exit after this many seconds without a new checkpoint (default: never).",
)
@click.option(
    "--settle",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="A checkpoint counts once all its files are this many seconds old (still being written before).",
)
@click.option(
    "--write",
    "write",
    type=click.Choice(["supported", "always", "never"]),
    default="supported",
    show_default=True,
    help="Which configured targets to write after each update (SIGUSR1: all, now).",
)
@click.option(
    "--sketch",
    type=click.IntRange(min=16),
    default=None,
    help="Sketched Gram matrices (CountSketch of this width per tensor): a new checkpoint costs one "
    "read of itself instead of the whole window; entries off by ~sqrt(2/width) of their scale.",
)
@click.option("--sketch-seed", type=int, default=0, show_default=True)
@quiet_and_verbose
@flags("tolerance", "max_memory", "threads", "allow_unsafe_pickle", "shard_size")
def watch_command(
    config_path, out_dir, once, poll, max_wait, settle, write, sketch, sketch_seed, options, quiet, verbose
):
    """Follow a run directory as checkpoints land: analysis, verdicts and targets, kept up to date."""
    from relex_merge.workflows.watch import Watcher

    if out_dir is None and write != "never":
        write = "never"  # nowhere to write targets: analysis on the terminal only
    console = Console()
    watcher = Watcher(config_path, out_dir, options, sketch=sketch, sketch_seed=sketch_seed, write=write, settle=settle)
    wanted = {"now": False}

    def on_demand(signum, frame):
        wanted["now"] = True

    # Ctrl-C stops after the update in progress (a KeyboardInterrupt in the middle of a merge
    # would leave the engine's workers waiting); a second Ctrl-C interrupts at once
    stopping = {"now": False}

    def on_interrupt(signum, frame):
        if stopping["now"]:
            raise KeyboardInterrupt
        stopping["now"] = True

    previous = signal.signal(signal.SIGUSR1, on_demand) if hasattr(signal, "SIGUSR1") else None
    previous_int = signal.signal(signal.SIGINT, on_interrupt)
    last_change = time.monotonic()
    try:
        while not stopping["now"]:
            force = wanted["now"] and out_dir is not None
            wanted["now"] = False
            update = watcher.poll(force_write=force)
            if update.added or update.dropped:
                last_change = time.monotonic()
            if not quiet:
                _render(console, update, sketch)
            if once:
                break
            if max_wait is not None and time.monotonic() - last_change > max_wait:
                if not quiet:
                    console.print(f"no new checkpoint for {max_wait:g} s: stopping")
                break
            deadline = time.monotonic() + poll
            while time.monotonic() < deadline and not wanted["now"] and not stopping["now"]:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        if stopping["now"] and not quiet:
            console.print("stopped")
    except KeyboardInterrupt:
        if not quiet:
            console.print("stopped")
    finally:
        signal.signal(signal.SIGINT, previous_int)
        watcher.close()
        if previous is not None:
            signal.signal(signal.SIGUSR1, previous)


def _render(console: Console, update, sketch) -> None:
    for warning in update.warnings:
        console.print(escape(f"warning: {warning}"), soft_wrap=True)
    if update.waiting:
        console.print(escape(f"waiting: {update.waiting}"), soft_wrap=True)
        return
    a = update.analysis
    if a is None:
        return
    if update.added or update.dropped:
        change = ", ".join(
            ([f"+{update.added}"] if update.added else []) + ([f"-{update.dropped}"] if update.dropped else [])
        )
        how = f"sketched (width {sketch})" if sketch else ("computed" if update.fresh else "updated")
        ev = sorted(t.explained_variance_1 for t in a.tensors if t.explained_variance_1 == t.explained_variance_1)
        line = (
            f"steps {change}: window {update.steps[0]}..{update.steps[-1]} ({len(update.steps)} checkpoints); "
            f"Gram matrices {how} in {update.seconds:.2f} s ({human_bytes(update.bytes_read)} read)"
        )
        if ev:
            line += f"; rank-1 explained variance median {ev[len(ev) // 2]:.4f}"
        console.print(escape(line), soft_wrap=True)
        for line in a.verdict:
            console.print(escape(f"  {line}"), soft_wrap=True)
    for target, folder in update.written:
        console.print(escape(f"  wrote step {target}: {folder}"), soft_wrap=True)


COMMAND = watch_command

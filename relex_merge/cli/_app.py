"""What every command shares: the command class that turns any failure into one line (the one
error point of the CLI), the -q/-v flags, the progress bar, and small parsers.

A command module is one file in ``relex_merge/cli/`` that defines ``COMMAND``, a click command
made with ``cls=RelexCommand``; the group in ``cli/__init__.py`` finds it. Commands import the
workflow they run inside their function, so ``relex-merge --help`` does not load torch.
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import (
    Progress as RichBar,
)

from relex_merge.common.errors import RelexError, Terminated, exit_code, one_line

__all__ = [
    "RelexCommand",
    "RichProgress",
    "quiet_and_verbose",
    "progress",
    "rank0",
    "task_list",
    "numbers",
    "ENGINE_FLAGS",
]

# Options fields of every command that runs the engine (merge, analyze, sweep): the engine's own
# errors may name any of them
ENGINE_FLAGS = ("max_memory", "device", "threads", "executor", "allow_unsafe_pickle", "allow_nonfinite", "timeout")


def _raise_terminated(signum, frame):
    raise Terminated()


class RelexCommand(click.Command):
    """A relex-merge command: one clear line for every failure (exit 2 for bad input and
    environment problems, 3 for an unsupported target under --require-supported); the full trace
    only with -v (which also shows the library's debug log). SIGINT/SIGTERM exit 130/143 after
    partial output is removed.

    Under torchrun or srun every command first joins the process group; a failure on any rank
    stops every rank, and only rank 0 prints, naming the rank that failed."""

    def invoke(self, ctx: click.Context):
        from relex_merge.engine import process_group

        verbose = bool(ctx.params.get("verbose", False))
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        if verbose:
            launched = process_group.launcher_environment()  # every rank logs: say which one
            where = f"rank {launched[0]}/{launched[1]} " if launched else ""
            logging.basicConfig(level=logging.WARNING, format=where + "%(name)s: %(message)s")
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
            process_group.join(float(ctx.params.get("timeout") or process_group.DEFAULT_TIMEOUT))
            return super().invoke(ctx)
        except (Exception, KeyboardInterrupt, Terminated) as exc:  # a bug too: one line, the trace with -v
            fail(exc, exit_code(exc))
        finally:
            signal.signal(signal.SIGTERM, previous)
            process_group.leave()


def quiet_and_verbose(func):
    """Add the shared -q/--quiet and -v/--verbose flags to a command (``RelexCommand`` reads
    ``verbose``)."""
    func = click.option("-v", "--verbose", is_flag=True, help="Full tracebacks on errors, and the debug log.")(func)
    return click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")(func)


class RichProgress:
    """The library's Progress protocol as a transient rich bar; notes are printed above it.
    ``quiet``: no bar and no notes but warnings. ``muted``: nothing at all (the ranks other than
    rank 0 of a torchrun/srun run, which plan the same merge and would repeat its warnings)."""

    def __init__(self, console: Console, quiet: bool = False, muted: bool = False):
        self.console = console
        self.quiet = quiet or muted
        self.muted = muted
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
            TextColumn(f"[bold]{escape(label)}[/]"),
            BarColumn(),
            TextColumn("{task.fields[items]}"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,  # the summary replaces it; an error leaves only its own line
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
        if self.muted:
            return
        if text.startswith("warning: "):
            self.console.print(f"[yellow]warning:[/] {escape(text[9:])}")
        elif not self.quiet:
            self.console.print(escape(text))

    def finish(self) -> None:
        """Stop and remove the bar (it is transient: the summary takes its place)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def progress(quiet: bool) -> RichProgress:
    """The bar and notes of a command; only rank 0 of a distributed run shows them."""
    return RichProgress(Console(stderr=True, soft_wrap=True), quiet, muted=not rank0())


def rank0() -> bool:
    """Only rank 0 of a torchrun/srun run talks to the user (a single process is rank 0)."""
    from relex_merge.engine import process_group

    return process_group.current().main


def task_list(text: str) -> list[str]:
    """``--tasks a,b`` as a list; at least one."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise RelexError("--tasks: give at least one lm-eval task")
    return tasks


def numbers(text: str, option: str, kind):
    """Comma-separated numbers of ``kind`` (int, float) for ``option``."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RelexError(f"{option}: expected comma-separated numbers, got {text!r}") from None

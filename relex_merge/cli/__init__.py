"""The ``relex-merge`` command line: parse arguments, call the library, render the results.
``relex-merge CONFIG OUT`` merges. Everything else lives in the library (run_merge, analyze,
sweep, evaluate, convert), which Python callers use directly.

Each command is one file in this folder defining ``COMMAND`` (see ``_app.py``); the group below
finds them through a registry, so a new command is one new file.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import click

from relex_merge.common.registry import Registry
from relex_merge.common.version import __version__

__all__ = ["main", "REGISTRY"]

REGISTRY: Registry[click.Command] = Registry(
    __name__, "COMMAND", click.Command, "command", name=lambda command: command.name
)


class RelexGroup(click.Group):
    """The commands are the registry's; ``relex-merge CONFIG OUT`` is short for
    ``relex-merge merge CONFIG OUT``."""

    def list_commands(self, ctx):
        return sorted(REGISTRY.names())

    def get_command(self, ctx, name):
        return REGISTRY.get(name) if name in REGISTRY else None

    def parse_args(self, ctx, args):
        """Prepend ``merge`` when the first argument is not a subcommand (or help/version)."""
        if args and args[0] not in REGISTRY and args[0] not in ("--help", "-h", "--version"):
            near = difflib.get_close_matches(args[0], REGISTRY.names(), n=1, cutoff=0.75)
            if near and not Path(args[0]).exists():  # `relex-merge analyse ...`: not a config file
                click.echo(
                    f"error: {args[0]}: neither a command nor a config file (did you mean '{near[0]}'?)", err=True
                )
                ctx.exit(2)
            args = ["merge", *args]
        return super().parse_args(ctx, args)


@click.group(cls=RelexGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relex-merge")
def main() -> None:
    """Predict a later RL checkpoint from a window of earlier ones (RELEX).

    Run `relex-merge CONFIG OUT` (same as `relex-merge merge CONFIG OUT`).
    """

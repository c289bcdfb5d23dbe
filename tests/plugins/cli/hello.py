"""A toy command: ``relex-merge hello NAME`` greets, and ``--fail`` raises a RelexError, which the
shared command class turns into one line and exit code 2."""

import click

from relex_merge.cli._app import RelexCommand
from relex_merge.common.errors import RelexError


@click.command("hello", cls=RelexCommand)
@click.argument("name")
@click.option("--fail", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
def hello(name, fail, verbose):
    """Say hello (a toy plug-in)."""
    if fail:
        raise RelexError(f"hello: cannot greet {name}")
    click.echo(f"hello {name}")


COMMAND = hello

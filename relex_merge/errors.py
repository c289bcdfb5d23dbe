"""Errors the user can fix. The CLI prints their message as one line and exits with 2."""


class RelexError(Exception):
    """A problem with the user's input: config, paths or checkpoints."""

    exit_code = 2

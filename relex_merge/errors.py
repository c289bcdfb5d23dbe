"""Errors the user can fix. The CLI prints their message as one line and exits with their code."""

__all__ = ["RelexError", "UnsupportedTarget"]


class RelexError(Exception):
    """A problem with the user's input: config, paths or checkpoints (exit code 2)."""

    exit_code = 2


class UnsupportedTarget(RelexError):
    """--require-supported: the backtest does not support a target; nothing was written (exit 3)."""

    exit_code = 3

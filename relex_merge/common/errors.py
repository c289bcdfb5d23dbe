"""Errors the user can fix, and the one line (and exit code) every failure is reported with.
The CLI and the distributed runs share ``one_line``/``exit_code``, so a failure reads the same
whether it happened in a single process or on rank 3 of 8."""

from __future__ import annotations

import errno
import os

__all__ = ["RelexError", "UnsupportedTarget", "Terminated", "one_line", "exit_code", "resolved_against"]


class RelexError(Exception):
    """A problem with the user's input: config, paths or checkpoints (exit code 2)."""

    exit_code = 2


class WindowTooShort(RelexError):
    """The window has too few checkpoints for the config (yet): ``watch`` keeps waiting on it."""


class UnsupportedTarget(RelexError):
    """--require-supported: the backtest does not support a target; nothing was written (exit 3)."""

    exit_code = 3


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that partial output is removed on the way out."""


_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free space or choose another output folder",
    errno.EDQUOT: "disk quota exceeded; free space or choose another output folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system; choose another output folder",
}


def one_line(error: BaseException) -> str:
    """The message printed after ``error:`` (a bug says so, briefly; -v shows the trace)."""
    if isinstance(error, RelexError):
        return str(error)
    if isinstance(error, OSError):
        return f"{error.filename or 'i/o'}: {_OS_ADVICE.get(error.errno, error.strerror or str(error))}"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted; partial output removed, inputs untouched"
    if isinstance(error, Terminated):
        return "terminated; partial output removed, inputs untouched"
    return f"{type(error).__name__}: {error} (rerun with -v for the full trace)"


def exit_code(error: BaseException | None) -> int:
    """0 for no error; the error's own code for RelexError; 130/143 for SIGINT/SIGTERM; 2 for
    the environment (OSError); 1 for a bug."""
    if error is None:
        return 0
    if isinstance(error, RelexError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, Terminated):
        return 143
    return 2 if isinstance(error, OSError) else 1


def resolved_against(path: str | os.PathLike) -> str:
    """For a message about a missing relative path: where it was looked for. Relative paths in a
    config are relative to the directory relex-merge runs in (as in mergekit), not to the config."""
    if os.path.isabs(path):
        return ""
    return (
        f" (relative paths are resolved against the current directory, {os.getcwd()}; run from the "
        "directory the config expects, or give absolute paths)"
    )

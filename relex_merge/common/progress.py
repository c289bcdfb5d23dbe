"""How long-running library calls report progress: one small protocol that the CLI renders with
rich and Python callers may ignore (the default does nothing)."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Progress", "NullProgress"]


class Progress(Protocol):
    """Receives a task's totals, its advances and one-line notes, in that order."""

    def start(self, label: str, total_bytes: int | None = None, total_items: int | None = None) -> None:
        """A new task (a merge, a stage, a conversion) with what it will read and how many items."""

    def advance(self, nbytes: int = 0, items: int = 0) -> None:
        """``nbytes`` more read; ``items`` more finished (tensors)."""

    def note(self, text: str) -> None:
        """A line worth showing (a stage begins, a candidate is scored, a warning)."""

    def finish(self) -> None:
        """The task is done (its bar can go)."""


class NullProgress:
    """Reports nothing: every Progress method does nothing (the library's default)."""

    def start(self, label: str, total_bytes: int | None = None, total_items: int | None = None) -> None:
        pass

    def advance(self, nbytes: int = 0, items: int = 0) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass

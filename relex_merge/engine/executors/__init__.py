"""Who runs the engine's span tasks. Every module in this package defines one executor as
``EXECUTOR`` (an object with a ``name`` and ``run(job, sinks, options, progress) ->
EngineStats``); the registry below finds them, so a new executor (Ray, say) is one new file."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Protocol, Sequence

from relex_merge.engine.job import ChunkSink, EngineOptions, EngineStats, MergeJob, ProgressFn

__all__ = ["Executor", "executor", "executors", "default_executor"]


class Executor(Protocol):
    """What an executor module's ``EXECUTOR`` provides (see the module docstring)."""

    name: str  # the registry key ("threads", "distributed")

    def run(self, job: MergeJob, sinks: Sequence[ChunkSink], options: EngineOptions,
            progress: ProgressFn) -> EngineStats:
        """Run every span task of the job; return the reports of all its tensors."""


def _discover() -> dict[str, Executor]:
    found: dict[str, Executor] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found[module.EXECUTOR.name] = module.EXECUTOR
    return found


_EXECUTORS = _discover()


def executors() -> list[str]:
    """The names of every registered executor, sorted."""
    return sorted(_EXECUTORS)


def executor(name: str) -> Executor:
    """The registered executor called ``name`` (for ``run_job(..., executor=...)``); KeyError
    naming the known ones otherwise."""
    try:
        return _EXECUTORS[name]
    except KeyError:
        raise KeyError(f"unknown executor {name!r} (known: {', '.join(sorted(_EXECUTORS))})") from None


def default_executor() -> Executor:
    """``distributed`` when this process is one of several ranks, else ``threads``."""
    from relex_merge import distributed

    return executor("distributed" if distributed.current().distributed else "threads")

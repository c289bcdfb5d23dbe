"""Who runs the engine's span tasks. Every module in this package defines one executor as
``EXECUTOR`` (an object with a ``name`` and ``run(job, sinks, options, progress) ->
EngineStats``); the registry below finds them, so a new executor (Ray, say) is one new file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from relex_merge.common.registry import Registry
from relex_merge.engine import process_group
from relex_merge.engine.job import ChunkSink, EngineOptions, EngineStats, MergeJob, ProgressFn

__all__ = ["Executor", "REGISTRY", "executor", "executors", "default_executor"]


@runtime_checkable
class Executor(Protocol):
    """What an executor module's ``EXECUTOR`` provides (see the module docstring)."""

    name: str  # the registry key ("threads", "distributed")

    def run(
        self, job: MergeJob, sinks: Sequence[ChunkSink], options: EngineOptions, progress: ProgressFn
    ) -> EngineStats:
        """Run every span task of the job; return the reports of all its tensors."""


REGISTRY: Registry[Executor] = Registry(__name__, "EXECUTOR", Executor, "executor", order=lambda e: e.name)


def executors() -> list[str]:
    """The names of every registered executor, sorted."""
    return REGISTRY.names()


def executor(name: str) -> Executor:
    """The registered executor called ``name`` (for ``run_job(..., executor=...)``); KeyError
    naming the known ones otherwise."""
    return REGISTRY.get(name)


def default_executor() -> Executor:
    """``distributed`` when this process is one of several ranks, else ``threads``."""
    return executor("distributed" if process_group.current().distributed else "threads")

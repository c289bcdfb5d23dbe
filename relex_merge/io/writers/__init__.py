"""Output formats: where merged tensors go. Every module in this folder defines ``WRITER``, an
:class:`OutputFormat` whose ``create(out_dir, tensors, shard_size, metadata=None, file_name=None)``
returns an :class:`OutputSink`; the registry below finds them, so a new output format is one new
file (and ``--output-format NAME`` selects it). ``relex_merge.output.sinks`` drives a sink through
its lifecycle on one process or on every rank of a distributed run.

The layout (names, shapes, dtypes) is known before any tensor is computed, so a sink can place
every byte up front: ``prepare`` (one process creates the files), ``attach`` (the other ranks
open them), ``write_at`` (spans from any thread, in any order), ``close_share`` (this process's
tensors are complete), ``finalize`` (every share together completes every tensor; indexes),
``abort`` (close without checks; the caller removes the partial output).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from relex_merge.common.registry import Registry
from relex_merge.io.base import TensorMeta

__all__ = ["OutputTensor", "OutputSink", "OutputFormat", "REGISTRY", "output_format"]


@dataclass(frozen=True)
class OutputTensor:
    """A tensor a sink will receive: its name and its output shape and dtype."""

    name: str
    meta: TensorMeta


@runtime_checkable
class OutputSink(Protocol):
    """One output model being written (see the module docstring for the lifecycle)."""

    @property
    def paths(self) -> list[Path]:
        """The files this sink writes (they exist once ``prepare`` has run)."""

    def prepare(self) -> None:
        """Create the files (one process of a distributed run)."""

    def attach(self) -> None:
        """Write into files another process prepared."""

    def write_at(self, name: str, start: int, chunk: torch.Tensor) -> None:
        """Write ``chunk`` (the tensor's dtype; any shape, written flat) from element ``start``."""

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """The next span of ``name`` (single-threaded callers going front to back)."""

    def close_share(self, names: Iterable[str]) -> dict[str, int]:
        """Check these tensors are complete, close the files; the bytes written per tensor."""

    def finalize(self, shares: list[dict[str, int]]) -> None:
        """Check every process's shares complete every tensor; write indexes."""

    def abort(self) -> None:
        """Close the files without the checks."""


@dataclass(frozen=True)
class OutputFormat:
    """An output format as the registry holds it."""

    name: str  # --output-format NAME
    description: str
    create: Callable[..., OutputSink]  # (out_dir, tensors, shard_size, metadata=None, file_name=None)


REGISTRY: Registry[OutputFormat] = Registry(
    __name__, "WRITER", OutputFormat, "output format", order=lambda fmt: fmt.name
)


def output_format(name: str) -> OutputFormat:
    """The registered output format ``name``; KeyError naming the known ones otherwise."""
    return REGISTRY.get(name)

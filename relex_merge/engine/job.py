"""What the engine is asked to do (a MergeJob), with what (EngineOptions), and what it reports
(TensorReport, EngineStats). Pure data: no threads, no IO."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from relex_merge.core.relex import FitSpec, RelexSpec, TensorDiagnostics
from relex_merge.io.base import CheckpointReader, TensorMeta
from relex_merge.io.writers import OutputTensor

__all__ = ["ChunkSink", "MergeJob", "EngineOptions", "TensorReport", "EngineStats", "ProgressFn", "default_threads"]


class ChunkSink(Protocol):
    """Where one output's tensor data goes (ShardedModelWriter implements it). Spans arrive
    from several threads, in any order; ``start`` is the span's first element."""

    def write_at(self, name: str, start: int, chunk: torch.Tensor) -> None:
        """Write ``chunk`` (the output dtype; written flat) from element ``start`` of tensor ``name``."""


@dataclass(frozen=True)
class MergeJob:
    """Everything the engine needs to merge: the open inputs, their steps, the targets and the
    fit. Built by ``plan.plan_merge``; narrowed with ``gram_only`` and ``share``."""

    base: CheckpointReader
    checkpoints: Sequence[CheckpointReader]  # the window, in step order
    steps: Sequence[int]  # one per checkpoint
    targets: Sequence[int]  # one output each (empty: Gram matrices and diagnostics only)
    spec: RelexSpec
    compute_dtype: torch.dtype = torch.float32  # of the per-span math (Gram sums are float64 regardless)
    out_dtype: torch.dtype | None = None  # None: keep each tensor's base dtype
    gram_cache: Mapping[str, torch.Tensor] | None = None  # from a fit cache: skips the Gram pass
    scales: Sequence[float] | None = None  # per-output scale (sweep); else spec.scale for all
    fits: Sequence[FitSpec] | None = None  # per-output fit (auto, sweep); else spec.fit for all
    tensors: Sequence[str] | None = None  # this process's share of the tensors (distributed); None: all
    # explicit output weights per tensor (n_outputs x T, float64), decided outside from the whole
    # model's Gram matrices (the training callback's jumps): the fit is skipped, the kernels are the same
    weights: Mapping[str, torch.Tensor] | None = None
    # the first gram_from checkpoints' Gram block is gram_cache's (gram_from x gram_from): the Gram
    # pass computes only the later checkpoints' rows (watch: one new row per checkpoint)
    gram_from: int = 0

    def names(self) -> list[str]:
        """The tensors this job runs, in the base's order."""
        names = self.base.names()
        if self.tensors is None:
            return names
        mine = set(self.tensors)
        return [n for n in names if n in mine]

    def output_specs(self) -> list[RelexSpec]:
        """Each output's spec: its own scale and fit, the rest shared."""
        n = len(self.targets)
        scales = list(self.scales) if self.scales is not None else [self.spec.scale] * n
        fits = list(self.fits) if self.fits is not None else [self.spec.fit] * n
        return [replace(self.spec, scale=scale, fit=fit) for scale, fit in zip(scales, fits)]

    def output_tensors(self) -> list[OutputTensor]:
        """Every output tensor (all of the base's, whatever this job's share), for the writers."""
        return [OutputTensor(name, self.output_meta(name)) for name in self.base.names()]

    def output_meta(self, name: str) -> TensorMeta:
        """A tensor's output shape and dtype: ``out_dtype`` for float tensors, else the base's."""
        meta = self.base.meta(name)
        if self.out_dtype is not None and meta.dtype.is_floating_point:
            return TensorMeta(meta.shape, self.out_dtype)
        return meta

    @property
    def readers(self) -> list[CheckpointReader]:
        """The base, then the window's checkpoints: the order of a span's inputs."""
        return [self.base, *self.checkpoints]

    @property
    def input_bytes(self) -> int:
        """Bytes of the base's tensors in every input (each read once), all tensors counted."""
        return sum(reader.meta(name).nbytes for name in self.base.names() for reader in self.readers)

    def gram_only(self) -> MergeJob:
        """The same window without targets: Gram matrices and diagnostics only (analyze)."""
        return replace(self, targets=[], scales=None, fits=None, weights=None)

    def share(self, tensors: Sequence[str]) -> MergeJob:
        """The same job restricted to some tensors (one process's share of a distributed run)."""
        return replace(self, tensors=list(tensors))


def default_threads() -> int:
    """Worker threads: one per available core, at most 8 (the work is memory-bound beyond)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs (``Options.engine()`` builds it from the user's options)."""

    max_memory: int  # bytes of tensor data all workers may hold at once
    device: torch.device = torch.device("cpu")  # where the per-span math runs
    allow_nonfinite: bool = False  # else NaN/Inf in an input stops the merge
    threads: int | None = None  # worker threads; None: default_threads()
    executor: str | None = None  # a registered executor's name; None: the one that fits the process

    @property
    def workers(self) -> int:
        """Worker threads: ``threads`` or the default."""
        return self.threads or default_threads()


@dataclass
class TensorReport:
    """What the engine learned about one tensor (diagnostics, Gram matrix), for the summary,
    the card, the backtest and the fit cache."""

    name: str
    numel: int
    diagnostics: TensorDiagnostics | None  # None: not extrapolated (non-float tensor)
    passes: int  # times the tensor's inputs were read: 2 (Gram, outputs), 1 (fit cache, copy)
    zero_delta: bool = False  # unchanged in the window: the outputs are the base tensor
    nonfinite: bool = False  # NaN/Inf in the window (--allow-nonfinite): copied from the base
    gram: torch.Tensor | None = None  # T x T float64 on the CPU (what a fit cache stores)


@dataclass
class EngineStats:
    """What a run of the engine did: bytes read, every tensor's report, and where time went."""

    bytes_read: int = 0  # every pass counted
    tensors: list[TensorReport] = field(default_factory=list)
    workers: int = 0  # worker threads (summed over ranks in a distributed run)
    read_seconds: float = 0.0  # worker-seconds getting spans (mapping, or reading for other formats)
    math_seconds: float = 0.0  # worker-seconds in deltas, Gram products, weighted sums (incl. page faults)
    write_seconds: float = 0.0  # worker-seconds writing output spans
    fit_seconds: float = 0.0  # main thread: eigendecompositions, fits, diagnostics


ProgressFn = Callable[[int, bool], None]  # (bytes just read, tensor finished)

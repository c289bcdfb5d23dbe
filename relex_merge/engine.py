"""Streaming executor: one tensor at a time from every checkpoint, in row chunks that fit
the memory budget.

Per tensor: if the base, the T deltas and the outputs fit the budget, one pass (read,
Gram, weights, weighted sum); otherwise two passes over row chunks (pass 1 accumulates the
Gram matrix, pass 2 forms base + W @ deltas chunk by chunk). Every target comes out of the
same reads; output chunks go straight to the shard writers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from relex_merge.errors import RelexError
from relex_merge.io.readers import CheckpointReader, TensorMeta
from relex_merge.io.writer import OutputTensor
from relex_merge.fit import (
    RelexSpec,
    TensorDiagnostics,
    apply_weights,
    diagnostics,
    gram_update,
    relex_weights,
)


class ChunkSink(Protocol):
    """Where output chunks go (one per target); ShardedModelWriter implements it."""

    def write(self, name: str, chunk: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class MergeJob:
    base: CheckpointReader
    checkpoints: Sequence[CheckpointReader]
    steps: Sequence[int]
    targets: Sequence[int]
    spec: RelexSpec
    compute_dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype | None = None  # None: keep each tensor's base dtype

    def output_tensors(self) -> list[OutputTensor]:
        return [OutputTensor(name, self.output_meta(name)) for name in self.base.names()]

    def output_meta(self, name: str) -> TensorMeta:
        meta = self.base.meta(name)
        if self.out_dtype is not None and meta.dtype.is_floating_point:
            return TensorMeta(meta.shape, self.out_dtype)
        return meta


@dataclass(frozen=True)
class EngineOptions:
    max_memory: int
    device: torch.device = torch.device("cpu")
    allow_nonfinite: bool = False  # else NaN/Inf in an input stops the merge


@dataclass
class TensorReport:
    name: str
    numel: int
    diagnostics: TensorDiagnostics | None  # None: not extrapolated (non-float tensor)
    passes: int
    zero_delta: bool = False
    nonfinite: bool = False  # NaN/Inf in the window (--allow-nonfinite): copied from the base


@dataclass
class EngineStats:
    bytes_read: int = 0
    tensors: list[TensorReport] = field(default_factory=list)


ProgressFn = Callable[[int, bool], None]  # (bytes just read, tensor finished)


def row_ranges(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(start, min(rows, start + chunk_rows)) for start in range(0, max(rows, 1), chunk_rows)]


class _TensorStream:
    """Reads row ranges of one tensor from the base and every checkpoint as deltas."""

    def __init__(self, job: MergeJob, name: str, options: EngineOptions, progress: ProgressFn):
        self.job, self.name, self.progress = job, name, progress
        self.device = options.device
        self.check_finite = not options.allow_nonfinite
        self.meta = job.base.meta(name)

    def _read(self, reader: CheckpointReader, rows: tuple[int, int] | None) -> torch.Tensor:
        chunk = reader.read(self.name, rows)
        self.progress(chunk.nbytes, False)
        if self.check_finite and chunk.is_floating_point() and not bool(torch.isfinite(chunk).all()):
            raise RelexError(
                f"{reader.path}: tensor {self.name} has NaN or Inf values; "
                "pass --allow-nonfinite to merge anyway (such tensors are copied from the base)"
            )
        return chunk

    def base_rows(self, rows: tuple[int, int] | None) -> torch.Tensor:
        return self._read(self.job.base, rows)

    def deltas(self, rows: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(base chunk flattened in compute dtype, T x n deltas, chunk shape)."""
        dtype = self.job.compute_dtype
        raw_base = self.base_rows(rows)
        shape = tuple(raw_base.shape)
        base = raw_base.to(self.device, dtype).reshape(-1)
        deltas = torch.empty(len(self.job.checkpoints), base.numel(), dtype=dtype, device=self.device)
        for k, reader in enumerate(self.job.checkpoints):
            chunk = self._read(reader, rows)
            deltas[k] = chunk.to(self.device, dtype).reshape(-1)
            deltas[k] -= base
        return base, deltas, shape


def chunk_rows(meta: TensorMeta, copies: int, itemsize: int, budget: int) -> int:
    row_bytes = max(1, meta.numel // max(meta.rows, 1)) * itemsize * copies
    return max(1, min(meta.rows, budget // row_bytes))


def merge_tensor(
    job: MergeJob, name: str, sinks: Sequence[ChunkSink], options: EngineOptions, progress: ProgressFn
) -> TensorReport:
    stream = _TensorStream(job, name, options, progress)
    meta = stream.meta
    out_meta = job.output_meta(name)
    n_ckpt, n_targets = len(job.checkpoints), len(job.targets)

    if not meta.dtype.is_floating_point:
        # Integer buffers (position ids, masks) cannot move along a direction: copy the base.
        rows = chunk_rows(meta, 2, meta.dtype.itemsize, options.max_memory)
        for span in row_ranges(meta.rows, rows):
            chunk = stream.base_rows(span if meta.shape else None)
            for sink in sinks:
                sink.write(name, chunk)
        return TensorReport(name, meta.numel, None, passes=1)

    # base + T deltas + the n_targets outputs + one raw read buffer, all in compute dtype
    copies = n_ckpt + n_targets + 2
    rows_per_chunk = chunk_rows(meta, copies, job.compute_dtype.itemsize, options.max_memory)
    spans = row_ranges(meta.rows, rows_per_chunk)
    gram = torch.zeros(n_ckpt, n_ckpt, dtype=torch.float64, device=options.device)

    if len(spans) == 1:
        base, deltas, shape = stream.deltas(None)
        gram_update(gram, deltas)
        weights = _weights(gram, job)
        _emit(job, name, sinks, out_meta, base, deltas, weights, shape)
        passes = 1
    else:
        for span in spans:
            _, deltas, _ = stream.deltas(span)
            gram_update(gram, deltas)
            del deltas
        weights = _weights(gram, job)
        for span in spans:
            base, deltas, shape = stream.deltas(span)
            _emit(job, name, sinks, out_meta, base, deltas, weights, shape)
        passes = 2
    gram = gram.cpu()
    finite = bool(torch.isfinite(gram).all())
    return TensorReport(
        name,
        meta.numel,
        diagnostics(gram, job.steps, job.spec) if finite else None,
        passes=passes,
        zero_delta=finite and bool(gram.abs().max() == 0),
        nonfinite=not finite,
    )


def _weights(gram: torch.Tensor, job: MergeJob) -> torch.Tensor:
    gram = gram.cpu()
    if not bool(torch.isfinite(gram).all()):  # only reachable with --allow-nonfinite
        return torch.zeros(len(job.targets), gram.shape[0], dtype=torch.float64)
    return relex_weights(gram, job.steps, job.targets, job.spec)


def _emit(
    job: MergeJob,
    name: str,
    sinks: Sequence[ChunkSink],
    out_meta: TensorMeta,
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    shape: tuple,
) -> None:
    outputs = apply_weights(base, deltas, weights)
    for j, sink in enumerate(sinks):
        sink.write(name, outputs[j].reshape(shape).to(out_meta.dtype))


def run_merge(
    job: MergeJob,
    sinks_per_target: Sequence[ChunkSink],
    options: EngineOptions,
    progress: ProgressFn = lambda nbytes, done: None,
) -> EngineStats:
    """Merge every tensor of the base model, in the base's order, into one sink per target."""
    stats = EngineStats()

    def counting_progress(nbytes: int, done: bool) -> None:
        stats.bytes_read += nbytes
        progress(nbytes, done)

    for name in job.base.names():
        report = merge_tensor(job, name, sinks_per_target, options, counting_progress)
        stats.tensors.append(report)
        progress(0, True)
    return stats

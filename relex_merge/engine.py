"""Streaming executor: one tensor at a time from every checkpoint, in row chunks that fit
the memory budget.

Per tensor: if the base, the T deltas and the outputs fit the budget, one pass (read,
Gram, weights, weighted sum); otherwise two passes over row chunks (pass 1 accumulates the
Gram matrix, pass 2 forms base + W @ deltas chunk by chunk). Every target comes out of the
same reads. Three threads overlap the work: a reader prefetches the next chunk of every
input, the main thread does the math, a writer appends finished chunks to the shards.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch

from relex_merge.errors import RelexError
from relex_merge.fit import (
    RelexSpec,
    TensorDiagnostics,
    apply_weights,
    deltas_and_gram,
    diagnostics,
    relex_weights,
)
from relex_merge.io.readers import CheckpointReader, TensorMeta
from relex_merge.io.writer import OutputTensor


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
    gram_cache: Mapping[str, torch.Tensor] | None = None  # from a fit cache: skips the Gram pass
    scales: Sequence[float] | None = None  # per-output scale (sweep); else spec.scale for all

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
    gram: torch.Tensor | None = None  # T x T float64 on the CPU (what a fit cache stores)


@dataclass
class EngineStats:
    bytes_read: int = 0
    tensors: list[TensorReport] = field(default_factory=list)
    read_seconds: float = 0.0  # reader thread busy (overlapped with math)
    math_seconds: float = 0.0  # main thread: conversion, Gram, fit, weighted sums
    write_seconds: float = 0.0  # writer thread busy (overlapped)


ProgressFn = Callable[[int, bool], None]  # (bytes just read, tensor finished)


def row_ranges(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(start, min(rows, start + chunk_rows)) for start in range(0, max(rows, 1), chunk_rows)]


def chunk_rows(meta: TensorMeta, bytes_per_element: int, budget: int) -> int:
    row_bytes = max(1, meta.numel // max(meta.rows, 1)) * bytes_per_element
    return max(1, min(meta.rows, budget // row_bytes))


def bytes_per_element(job: MergeJob, name: str) -> int:
    """Memory one element of a chunk costs while it is in flight (what the budget divides)."""
    n_in, n_out = len(job.checkpoints) + 1, len(job.targets)
    stored = max(job.base.meta(name).dtype.itemsize, 1)
    out = job.output_meta(name).dtype.itemsize
    compute = job.compute_dtype.itemsize
    # three raw read slots (one being read, one queued, one in use), base + deltas and the
    # outputs in compute dtype, and cast outputs waiting in the write queue (up to 2 each)
    return 3 * n_in * stored + n_in * compute + n_out * compute + 3 * n_out * out


@dataclass(frozen=True)
class _Read:
    """One row span of one tensor, read from every input."""

    name: str
    span: tuple[int, int] | None
    phase: str  # "copy" (non-float), "both" (single pass), "gram" or "emit" (two passes)
    last: bool  # last read of this tensor


def _schedule(job: MergeJob, options: EngineOptions) -> Iterator[_Read]:
    """The reads, in order. Without targets only Gram matrices are built (analyze); a cached
    Gram matrix turns a two-pass tensor into one pass."""
    for name in job.base.names():
        meta = job.base.meta(name)
        spans = row_ranges(meta.rows, chunk_rows(meta, bytes_per_element(job, name), options.max_memory))
        whole = len(spans) == 1
        if not meta.dtype.is_floating_point:
            keyed = [None] if whole or not meta.shape else spans
            phases = [("copy", keyed)] if job.targets else []
        elif not job.targets:
            phases = [("gram", [None] if whole else spans)]
        elif whole:
            phases = [("both", [None])]
        elif job.gram_cache and name in job.gram_cache:
            phases = [("emit", spans)]
        else:
            phases = [("gram", spans), ("emit", spans)]
        for p, (phase, pieces) in enumerate(phases):
            for i, span in enumerate(pieces):
                yield _Read(name, span, phase, p == len(phases) - 1 and i == len(pieces) - 1)


class _Buffers:
    """Reusable memory: fresh allocations of large tensors cost page faults on every use,
    which made reading and subtracting several times slower than the memory copies themselves."""

    def __init__(self):
        self._tensors: dict[str, torch.Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        current = self._tensors.get(key)
        if current is None or current.numel() < numel or current.dtype != dtype or current.device != device:
            self._tensors[key] = current = torch.empty(numel, dtype=dtype, device=device)
        return current[:numel]


_SLOTS = 3  # raw read buffers: one being filled, one queued, one in use by the math


class _Prefetcher:
    """Reads the scheduled chunks on a thread, one chunk ahead of the math."""

    def __init__(self, job: MergeJob, options: EngineOptions, stats: EngineStats, progress: ProgressFn):
        self.job, self.options, self.stats, self.progress = job, options, stats, progress
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._free: queue.Queue = queue.Queue()
        for slot in range(_SLOTS):
            self._free.put(slot)
        self._buffers = _Buffers()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relex-reader", daemon=True)

    def __iter__(self) -> Iterator[tuple[_Read, list[torch.Tensor], int]]:
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()
            self._thread.join(timeout=30)

    def release(self, slot: int) -> None:
        """The math is done with this slot's chunks."""
        self._free.put(slot)

    def _wait(self, q: queue.Queue, item=None, put: bool = False):
        """Put ``item`` (returns True) or get one, giving up (None) once stopped."""
        while not self._stop.is_set():
            try:
                if put:
                    q.put(item, timeout=0.1)
                    return True
                return q.get(timeout=0.1)
            except (queue.Full, queue.Empty):
                continue
        return None

    def _run(self) -> None:
        try:
            for read in _schedule(self.job, self.options):
                slot = self._wait(self._free)
                if slot is None:
                    return
                start = time.perf_counter()
                readers = [self.job.base] if read.phase == "copy" else [self.job.base, *self.job.checkpoints]
                chunks = self._read_all(readers, read, slot)
                self.stats.read_seconds += time.perf_counter() - start
                if not self._wait(self._queue, (read, chunks, slot), put=True):
                    return
            self._wait(self._queue, None, put=True)
        except BaseException as exc:  # handed to the main thread, which raises it
            self._wait(self._queue, exc, put=True)

    def _read_all(self, readers: list[CheckpointReader], read: _Read, slot: int) -> list[torch.Tensor]:
        sizes = [reader.meta(read.name) for reader in readers]
        lengths = [_span_bytes(meta, read.span) for meta in sizes]
        buffer = self._buffers.get(f"slot{slot}", sum(lengths), torch.uint8, torch.device("cpu"))
        chunks, offset = [], 0
        for reader, length in zip(readers, lengths):
            read_into = getattr(reader, "read_into", None)
            if read_into is not None:
                chunk = read_into(read.name, read.span, buffer[offset : offset + length])
            else:
                chunk = reader.read(read.name, read.span)
            offset += length
            self.progress(chunk.nbytes, False)
            chunks.append(chunk)
        return chunks


def _span_bytes(meta: TensorMeta, span: tuple[int, int] | None) -> int:
    if span is None or not meta.shape:
        return meta.nbytes
    return meta.nbytes // max(meta.shape[0], 1) * (span[1] - span[0])


def _check_finite(job: MergeJob, read: _Read, chunks: list[torch.Tensor], gram: torch.Tensor) -> None:
    """NaN or Inf in any input makes a delta, hence the Gram diagonal, non-finite: checking
    the T x T Gram matrix is free; the chunks are scanned only to name the culprit."""
    if bool(torch.isfinite(gram).all()):
        return
    readers = [job.base, *job.checkpoints]
    for reader, chunk in zip(readers, chunks):
        if not bool(torch.isfinite(chunk).all()):
            raise RelexError(
                f"{reader.path}: tensor {read.name} has NaN or Inf values; "
                "pass --allow-nonfinite to merge anyway (such tensors are copied from the base)"
            )
    raise RelexError(f"tensor {read.name}: the deltas overflow the compute dtype; use dtype: float64")


class _WriteQueue:
    """Appends chunks to the sinks on a thread; errors surface on the next call."""

    def __init__(self, sinks: Sequence[ChunkSink], stats: EngineStats, depth: int):
        self.sinks, self.stats = sinks, stats
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="relex-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after a failure
            sink, name, chunk = item
            start = time.perf_counter()
            try:
                sink.write(name, chunk)
            except BaseException as exc:
                self._error = exc
            self.stats.write_seconds += time.perf_counter() - start

    def put(self, index: int, name: str, chunk: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((self.sinks[index], name, chunk))

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """Stop after a failure elsewhere: queued chunks are dropped, the thread ends."""
        self._error = self._error or RuntimeError("merge abandoned")
        self._queue.put(None)  # the thread drains without writing, so there is room soon
        self._thread.join(timeout=30)


@dataclass
class _TensorState:
    gram: torch.Tensor
    weights: torch.Tensor | None = None
    passes: int = 1


def _weights(gram: torch.Tensor, job: MergeJob) -> torch.Tensor:
    gram = gram.cpu()
    if not bool(torch.isfinite(gram).all()):  # only reachable with --allow-nonfinite
        return torch.zeros(len(job.targets), gram.shape[0], dtype=torch.float64)
    weights = relex_weights(gram, job.steps, job.targets, job.spec)
    if job.scales is not None:
        weights = weights * torch.tensor(job.scales, dtype=torch.float64).unsqueeze(1)
    return weights


def _report(name: str, job: MergeJob, state: _TensorState) -> TensorReport:
    gram = state.gram.cpu()
    finite = bool(torch.isfinite(gram).all())
    return TensorReport(
        name,
        job.base.meta(name).numel,
        diagnostics(gram, job.steps, job.spec) if finite else None,
        passes=state.passes,
        zero_delta=finite and bool(gram.abs().max() == 0),
        nonfinite=not finite,
        gram=gram,
    )


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

    writes = _WriteQueue(sinks_per_target, stats, depth=2 * len(sinks_per_target))
    n_ckpt = len(job.checkpoints)
    workspace = _Buffers()
    state: _TensorState | None = None
    prefetcher = _Prefetcher(job, options, stats, counting_progress)
    try:
        for read, chunks, slot in prefetcher:
            start = time.perf_counter()
            name = read.name
            if read.phase == "copy":
                for j in range(len(sinks_per_target)):
                    writes.put(j, name, chunks[0].clone())
                if read.last:
                    stats.tensors.append(TensorReport(name, job.base.meta(name).numel, None, passes=1))
            else:
                if state is None:
                    cached = job.gram_cache.get(name) if job.gram_cache else None
                    gram = torch.zeros(n_ckpt, n_ckpt, dtype=torch.float64, device=options.device)
                    state = _TensorState(gram, passes=1 if read.phase == "both" else 2)
                    if cached is not None:
                        state.gram = cached.to(options.device, torch.float64)
                        state.passes = 1
                shape = tuple(chunks[0].shape)
                n = chunks[0].numel()
                deltas = workspace.get("deltas", n_ckpt * n, job.compute_dtype, options.device).view(n_ckpt, n)
                base = chunks[0].reshape(-1)
                if base.dtype != job.compute_dtype or base.device != options.device:
                    base = workspace.get("base", n, job.compute_dtype, options.device).copy_(base)
                needs_gram = read.phase in ("both", "gram") and not (job.gram_cache and name in job.gram_cache)
                raw = [c.to(options.device).reshape(-1) for c in chunks[1:]]
                deltas_and_gram(raw, base, deltas, state.gram if needs_gram else None)
                if needs_gram and not options.allow_nonfinite:
                    _check_finite(job, read, chunks, state.gram)
                if read.phase in ("both", "emit") and state.weights is None:
                    state.weights = _weights(state.gram, job)
                outputs = None
                if read.phase in ("both", "emit"):
                    out_dtype = job.output_meta(name).dtype
                    outputs = apply_weights(base, deltas, state.weights).to("cpu", out_dtype)
                del raw, chunks, base  # base may be a view of the raw slot
                prefetcher.release(slot)
                if outputs is not None:
                    for j in range(len(sinks_per_target)):
                        writes.put(j, name, outputs[j].reshape(shape))
                if read.last:
                    stats.tensors.append(_report(name, job, state))
                    state = None
            if read.phase == "copy":
                prefetcher.release(slot)
            stats.math_seconds += time.perf_counter() - start
            if read.last:
                progress(0, True)
        writes.finish()
    except BaseException:
        writes.abandon()
        raise
    return stats

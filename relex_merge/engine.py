"""Streaming executor: one tensor at a time from every checkpoint, in row chunks that fit
the memory budget.

Per tensor: if the base, the T deltas and the outputs fit the budget, one pass (read,
Gram, weights, weighted sum); otherwise two passes over row chunks (pass 1 accumulates the
Gram matrix, pass 2 forms base + W @ deltas chunk by chunk). Every target comes out of the
same reads. Three threads overlap the work: a reader prefetches the next chunk of every
input, the main thread does the math, a writer appends finished chunks to the shards.
"""

from __future__ import annotations

import os
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
    diagnostics,
    gram_update,
    relex_weights,
    subtract_base,
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
    read_seconds: float = 0.0  # reader thread: reading (overlapped with the math)
    delta_seconds: float = 0.0  # reader thread: base conversion and subtraction
    math_seconds: float = 0.0  # main thread: conversion, Gram, fit, weighted sums
    write_seconds: float = 0.0  # writer thread busy (overlapped)


ProgressFn = Callable[[int, bool], None]  # (bytes just read, tensor finished)


def row_ranges(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(start, min(rows, start + chunk_rows)) for start in range(0, max(rows, 1), chunk_rows)]


def chunk_rows(meta: TensorMeta, bytes_per_element: int, budget: int) -> int:
    row_bytes = max(1, meta.numel // max(meta.rows, 1)) * bytes_per_element
    return max(1, min(meta.rows, budget // row_bytes))


# Reads are cut into spans of about this many raw bytes (all inputs together) even when a
# tensor fits the budget whole: smaller units let reading, math and writing overlap, which
# measured faster on 2 cores than one giant unit per tensor.
PIPELINE_BYTES = 64 << 20


def _costs(job: MergeJob, name: str) -> tuple[int, int]:
    """Bytes per element: (kept for the whole tensor in one-pass mode, in flight per span)."""
    n_in, n_out = len(job.checkpoints) + 1, len(job.targets)
    stored = max(job.base.meta(name).dtype.itemsize, 1)
    out = job.output_meta(name).dtype.itemsize
    compute = job.compute_dtype.itemsize
    # base + T deltas in compute dtype, twice: the reader fills the next tensor's workspace
    # while the math finishes the current one
    kept = 2 * n_in * compute
    # one raw read buffer, three slots of base + deltas for two-pass spans (being filled,
    # queued, in use), the outputs in compute dtype, and cast outputs in the write queue
    flight = n_in * stored + 3 * n_in * compute + n_out * compute + 3 * n_out * out
    return kept, flight


@dataclass(frozen=True)
class _Read:
    """One row span of one tensor, read from every input."""

    name: str
    span: tuple[int, int] | None
    phase: str  # "copy" (non-float), "keep" (one pass), "gram" then "emit" (two passes)
    last: bool  # last read of this tensor
    spans: tuple = ()  # "keep": every span of the tensor, to emit after the last read


def _schedule(job: MergeJob, options: EngineOptions) -> Iterator[_Read]:
    """The reads, in order.

    One pass ("keep") when the whole tensor's base and deltas fit the budget beside one span
    in flight; otherwise two passes over spans that fit ("gram", then "emit"). Without targets
    only Gram matrices are built (analyze); a cached Gram matrix makes every tensor one pass.
    """
    budget = options.max_memory
    for name in job.base.names():
        meta = job.base.meta(name)
        kept, flight = _costs(job, name)
        n_in = len(job.checkpoints) + 1
        pipeline_rows = chunk_rows(meta, n_in * max(meta.dtype.itemsize, 1), PIPELINE_BYTES)
        two_pass_rows = chunk_rows(meta, kept + flight, budget)
        span_elems = min(meta.rows, pipeline_rows) * max(1, meta.numel // max(meta.rows, 1))
        one_pass = meta.numel * kept + span_elems * flight <= budget
        rows = pipeline_rows if one_pass else min(pipeline_rows, two_pass_rows)
        spans = row_ranges(meta.rows, rows) if meta.shape else [None]
        if len(spans) == 1:
            spans = [None]
        cached = bool(job.gram_cache and name in job.gram_cache)
        if not meta.dtype.is_floating_point:
            phases = [("copy", spans)] if job.targets else []
        elif not job.targets:
            phases = [("gram", spans)]
        elif one_pass:
            phases = [("keep", spans)]
        elif cached:
            phases = [("emit", spans)]
        else:
            phases = [("gram", spans), ("emit", spans)]
        for p, (phase, pieces) in enumerate(phases):
            for i, span in enumerate(pieces):
                last = p == len(phases) - 1 and i == len(pieces) - 1
                yield _Read(name, span, phase, last, tuple(pieces) if phase == "keep" and last else ())


def planned_read_bytes(job: MergeJob, options: EngineOptions) -> int:
    """Bytes the merge will read (two-pass tensors count twice): the progress bar's total."""
    total = 0
    for read in _schedule(job, options):
        readers = [job.base] if read.phase == "copy" else [job.base, *job.checkpoints]
        total += sum(_span_bytes(r.meta(read.name), read.span) for r in readers)
    return total


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


_SLOTS = 3  # per-span buffers: one being filled, one queued, one in use by the math


@dataclass
class _Unit:
    """What the reader hands the math: a copy chunk, or a span's base and deltas."""

    read: _Read
    token: tuple[str, int]  # ("slot", n) or ("workspace", parity): released by the math
    chunk: torch.Tensor | None = None  # "copy"
    base: torch.Tensor | None = None  # compute dtype, flattened span
    deltas: torch.Tensor | None = None  # T x span
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None  # "keep": the whole tensor's (base, deltas)


class _Prefetcher:
    """Reads the scheduled spans on a thread and turns them into deltas there, one span ahead
    of the math (Gram products and weighted sums) on the main thread."""

    def __init__(self, job: MergeJob, options: EngineOptions, stats: EngineStats, progress: ProgressFn):
        self.job, self.options, self.stats, self.progress = job, options, stats, progress
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._free = {"slot": queue.Queue(), "workspace": queue.Queue()}
        for slot in range(_SLOTS):
            self._free["slot"].put(slot)
        for parity in range(2):
            self._free["workspace"].put(parity)
        self._buffers = _Buffers()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relex-reader", daemon=True)
        self._keep: tuple[str, int] | None = None  # tensor being read in one-pass mode, its workspace

    def __iter__(self) -> Iterator[_Unit]:
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

    def release(self, token: tuple[str, int]) -> None:
        """The math is done with this slot or workspace."""
        self._free[token[0]].put(token[1])

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
                unit = self._produce(read)
                if unit is None or not self._wait(self._queue, unit, put=True):
                    return
            self._wait(self._queue, None, put=True)
        except BaseException as exc:  # handed to the main thread, which raises it
            self._wait(self._queue, exc, put=True)

    def _produce(self, read: _Read) -> _Unit | None:
        job, device, dtype = self.job, self.options.device, self.job.compute_dtype
        if read.phase == "keep" and (self._keep is None or self._keep[0] != read.name):
            parity = self._wait(self._free["workspace"])
            if parity is None:
                return None
            self._keep = (read.name, parity)
        token = ("workspace", self._keep[1]) if read.phase == "keep" else None
        if token is None:
            slot = self._wait(self._free["slot"])
            if slot is None:
                return None
            token = ("slot", slot)
        start = time.perf_counter()
        if read.phase == "copy":
            chunk = self._read_all([job.base], read, f"copy{token[1]}")[0]
            self.stats.read_seconds += time.perf_counter() - start
            return _Unit(read, token, chunk=chunk)
        chunks = self._read_all([job.base, *job.checkpoints], read, "raw")
        self.stats.read_seconds += time.perf_counter() - start
        start = time.perf_counter()
        meta = job.base.meta(read.name)
        n_ckpt = len(job.checkpoints)
        if read.phase == "keep":
            key = f"ws{token[1]}"
            base_all = self._buffers.get(key + "-base", meta.numel, dtype, device)
            deltas_all = self._buffers.get(key + "-deltas", n_ckpt * meta.numel, dtype, device).view(n_ckpt, -1)
            lo, hi = _element_range(meta, read.span)
            base, deltas = base_all[lo:hi], deltas_all[:, lo:hi]
            workspace = (base_all, deltas_all)
        else:
            n = chunks[0].numel()
            base = self._buffers.get(f"slot{token[1]}-base", n, dtype, device)
            deltas = self._buffers.get(f"slot{token[1]}-deltas", n_ckpt * n, dtype, device).view(n_ckpt, n)
            workspace = None
        base.copy_(chunks[0].reshape(-1))
        subtract_base([c.to(device).reshape(-1) for c in chunks[1:]], base, deltas)
        self.stats.delta_seconds += time.perf_counter() - start
        return _Unit(read, token, base=base, deltas=deltas, workspace=workspace)

    def _read_all(self, readers: list[CheckpointReader], read: _Read, key: str) -> list[torch.Tensor]:
        lengths = [_span_bytes(reader.meta(read.name), read.span) for reader in readers]
        # each input starts 64-byte aligned: typed views need it when dtypes differ (bf16 base, fp32 window)
        starts = [sum(-(-n // 64) * 64 for n in lengths[:i]) for i in range(len(lengths))]
        buffer = self._buffers.get(key, starts[-1] + lengths[-1], torch.uint8, torch.device("cpu"))
        chunks = []
        for reader, start, length in zip(readers, starts, lengths):
            read_into = getattr(reader, "read_into", None)
            if read_into is not None:
                chunk = read_into(read.name, read.span, buffer[start : start + length])
            else:
                chunk = reader.read(read.name, read.span)
            self.progress(chunk.nbytes, False)
            chunks.append(chunk)
        return chunks


def _element_range(meta: TensorMeta, span: tuple[int, int] | None) -> tuple[int, int]:
    """Flat element range of a row span."""
    if span is None:
        return 0, meta.numel
    row_elems = max(1, meta.numel // max(meta.rows, 1))
    return span[0] * row_elems, span[1] * row_elems


def _span_bytes(meta: TensorMeta, span: tuple[int, int] | None) -> int:
    if span is None or not meta.shape:
        return meta.nbytes
    return meta.nbytes // max(meta.shape[0], 1) * (span[1] - span[0])


def _check_finite(job: MergeJob, read: _Read, gram: torch.Tensor) -> None:
    """NaN or Inf in any input makes a delta, hence the Gram diagonal, non-finite: checking
    the T x T Gram matrix is free; the span is read again only to name the culprit."""
    if bool(torch.isfinite(gram).all()):
        return
    for reader in [job.base, *job.checkpoints]:
        chunk = reader.read(read.name, read.span)
        if chunk.is_floating_point() and not bool(torch.isfinite(chunk).all()):
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
    cached: bool = False  # gram came from a fit cache


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


class _TensorMerger:
    """The math for the units of one tensor at a time (main thread): Gram products, weights
    and weighted sums; the reader thread has already formed the deltas."""

    def __init__(self, job: MergeJob, options: EngineOptions, writes: "_WriteQueue", n_sinks: int):
        self.job, self.options, self.writes, self.n_sinks = job, options, writes, n_sinks
        self.state: _TensorState | None = None

    def _start(self, read: _Read) -> _TensorState:
        if self.state is None:
            n = len(self.job.checkpoints)
            cached = self.job.gram_cache.get(read.name) if self.job.gram_cache else None
            gram = torch.zeros(n, n, dtype=torch.float64, device=self.options.device)
            passes = 2 if read.phase == "gram" and self.job.targets else 1
            self.state = _TensorState(gram if cached is None else cached.to(self.options.device, torch.float64),
                                      passes=passes, cached=cached is not None)
        return self.state

    def process(self, unit: _Unit, release: Callable[[tuple[str, int]], None]) -> TensorReport | None:
        job, read = self.job, unit.read
        name = read.name
        if read.phase == "copy":
            copies = [unit.chunk.clone() for _ in range(self.n_sinks)]
            release(unit.token)
            for j, chunk in enumerate(copies):
                self.writes.put(j, name, chunk)
            return TensorReport(name, job.base.meta(name).numel, None, passes=1) if read.last else None
        state = self._start(read)
        if read.phase in ("keep", "gram") and not state.cached:
            gram_update(state.gram, unit.deltas)
            if not self.options.allow_nonfinite:
                _check_finite(job, read, state.gram)
        if read.phase == "emit":
            self._emit(name, unit.base, unit.deltas, read.span)
        elif read.phase == "keep" and read.last:
            base_all, deltas_all = unit.workspace
            meta = job.base.meta(name)
            for span in read.spans:
                lo, hi = _element_range(meta, span)
                self._emit(name, base_all[lo:hi], deltas_all[:, lo:hi], span)
        if read.phase != "keep" or read.last:
            release(unit.token)
        if not read.last:
            return None
        report = _report(name, job, state)
        self.state = None
        return report

    def _emit(self, name: str, base: torch.Tensor, deltas: torch.Tensor, span) -> None:
        state = self.state
        if state.weights is None:
            state.weights = _weights(state.gram, self.job)
        meta = self.job.base.meta(name)
        shape = meta.shape if span is None else (span[1] - span[0],) + meta.shape[1:]
        outputs = apply_weights(base, deltas, state.weights).to("cpu", self.job.output_meta(name).dtype)
        for j in range(self.n_sinks):
            self.writes.put(j, name, outputs[j].reshape(shape))


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
    merger = _TensorMerger(job, options, writes, len(sinks_per_target))
    prefetcher = _Prefetcher(job, options, stats, counting_progress)
    # Leave a core to the reader and writer threads: on 2 cores, torch's second intra-op thread
    # only contended with them (engine 3.1 s -> 2.4 s on the 130M bench).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        for unit in prefetcher:
            start = time.perf_counter()
            report = merger.process(unit, prefetcher.release)
            del unit
            stats.math_seconds += time.perf_counter() - start
            if report is not None:
                stats.tensors.append(report)
                progress(0, True)
        writes.finish()
    except BaseException:
        writes.abandon()
        raise
    finally:
        torch.set_num_threads(threads)
    return stats

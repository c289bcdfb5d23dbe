"""Streaming executor: every tensor of the base model, in spans of rows, from every input.

Per tensor, a Gram pass over its spans (deltas and their T x T Gram matrix, summed in float64)
gives the fit and the weights; an output pass over the same spans forms base + W @ deltas for
every target and writes each span straight to its place in the output shards. Spans run on a
pool of worker threads; the main thread hands out spans, fits, and reports progress.

Inputs are read through memory maps where the format allows (safetensors): a span's bytes go
from the page cache into the math without a copy, and the second pass finds them still cached.
Within a span the work goes in cache-sized blocks (relex_merge.kernels), so neither the deltas
nor any other T x n intermediate is ever materialised.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch

from relex_merge.errors import RelexError
from relex_merge.fit import FitSpec, RelexSpec, TensorDiagnostics, diagnostics, relex_weights
from relex_merge.io.base import CheckpointReader, TensorMeta, read_span
from relex_merge.io.writer import OutputTensor
from relex_merge.kernels import Scratch, block_columns, span_gram, span_outputs


class ChunkSink(Protocol):
    """Where one output's tensor data goes (ShardedModelWriter implements it). Spans arrive
    from several threads, in any order; ``start`` is the span's first element."""

    def write_at(self, name: str, start: int, chunk: torch.Tensor) -> None: ...


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
    fits: Sequence[FitSpec] | None = None  # per-output fit (auto, sweep); else spec.fit for all

    def output_specs(self) -> list[RelexSpec]:
        """Each output's spec: its own scale and fit, the rest shared."""
        n = len(self.targets)
        scales = list(self.scales) if self.scales is not None else [self.spec.scale] * n
        fits = list(self.fits) if self.fits is not None else [self.spec.fit] * n
        return [replace(self.spec, scale=scale, fit=fit) for scale, fit in zip(scales, fits)]

    def output_tensors(self) -> list[OutputTensor]:
        return [OutputTensor(name, self.output_meta(name)) for name in self.base.names()]

    def output_meta(self, name: str) -> TensorMeta:
        meta = self.base.meta(name)
        if self.out_dtype is not None and meta.dtype.is_floating_point:
            return TensorMeta(meta.shape, self.out_dtype)
        return meta

    @property
    def readers(self) -> list[CheckpointReader]:
        return [self.base, *self.checkpoints]

    @property
    def input_bytes(self) -> int:
        """Bytes of the base's tensors in every input (each read once)."""
        return sum(reader.meta(name).nbytes for name in self.base.names() for reader in self.readers)

    def gram_only(self) -> MergeJob:
        """The same window without targets: Gram matrices and diagnostics only (analyze)."""
        return replace(self, targets=[], scales=None, fits=None)


def default_threads() -> int:
    """Worker threads: one per available core, at most 8 (the work is memory-bound beyond)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


@dataclass(frozen=True)
class EngineOptions:
    max_memory: int
    device: torch.device = torch.device("cpu")
    allow_nonfinite: bool = False  # else NaN/Inf in an input stops the merge
    threads: int | None = None  # worker threads; None: default_threads()

    @property
    def workers(self) -> int:
        return self.threads or default_threads()


@dataclass
class TensorReport:
    name: str
    numel: int
    diagnostics: TensorDiagnostics | None  # None: not extrapolated (non-float tensor)
    passes: int  # times the tensor's inputs were read: 2 (Gram, outputs), 1 (fit cache, copy)
    zero_delta: bool = False
    nonfinite: bool = False  # NaN/Inf in the window (--allow-nonfinite): copied from the base
    gram: torch.Tensor | None = None  # T x T float64 on the CPU (what a fit cache stores)


@dataclass
class EngineStats:
    bytes_read: int = 0  # every pass counted
    tensors: list[TensorReport] = field(default_factory=list)
    workers: int = 0
    read_seconds: float = 0.0  # worker-seconds getting spans (mapping, or reading for other formats)
    math_seconds: float = 0.0  # worker-seconds in deltas, Gram products, weighted sums (incl. page faults)
    write_seconds: float = 0.0  # worker-seconds writing output spans
    fit_seconds: float = 0.0  # main thread: eigendecompositions, fits, diagnostics


ProgressFn = Callable[[int, bool], None]  # (bytes just read, tensor finished)


def row_ranges(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(start, min(rows, start + chunk_rows)) for start in range(0, max(rows, 1), chunk_rows)]


def chunk_rows(meta: TensorMeta, bytes_per_element: int, budget: int) -> int:
    row_bytes = max(1, meta.numel // max(meta.rows, 1)) * bytes_per_element
    return max(1, min(meta.rows, budget // row_bytes))


# Input bytes of one span (all inputs together). Spans are the unit handed to a worker: large
# enough that handing out costs nothing, small enough to spread a tensor over the workers and
# to keep what a worker holds (its mapped inputs and output buffer) small.
SPAN_BYTES = 32 << 20


@dataclass(frozen=True)
class _Span:
    name: str
    phase: str  # "gram", "emit" (outputs) or "copy" (non-float tensors)
    index: int  # position among the tensor's spans
    rows: tuple[int, int] | None  # None: the whole tensor
    start: int  # first element
    numel: int


def _spans(job: MergeJob, options: EngineOptions, name: str) -> list[tuple[tuple[int, int] | None, int, int]]:
    """(rows, first element, elements) of each span of a tensor, within the memory budget."""
    meta = job.base.meta(name)
    input_bytes = sum(max(reader.meta(name).dtype.itemsize, 1) for reader in job.readers)
    # what a running span holds per element: its inputs (mapped or read) and its outputs
    per_element = input_bytes + max(len(job.targets), 1) * job.output_meta(name).dtype.itemsize
    if options.device.type != "cpu":  # the span also lives on the device, in the compute dtype
        per_element += (len(job.readers) + len(job.targets)) * job.compute_dtype.itemsize
    elements = min(SPAN_BYTES // input_bytes, options.max_memory // (options.workers * per_element))
    if not meta.shape or meta.numel == 0 or elements >= meta.numel:
        return [(None, 0, meta.numel)]
    row_elements = meta.numel // meta.rows
    ranges = row_ranges(meta.rows, max(1, elements // row_elements))
    if len(ranges) == 1:
        return [(None, 0, meta.numel)]
    return [((lo, hi), lo * row_elements, (hi - lo) * row_elements) for lo, hi in ranges]


def planned_read_bytes(job: MergeJob, options: EngineOptions) -> int:
    """Bytes the merge will read, every pass counted: the progress bar's total."""
    total = 0
    for name in job.base.names():
        meta = job.base.meta(name)
        if not meta.dtype.is_floating_point:
            total += meta.nbytes if job.targets else 0
            continue
        window = sum(r.meta(name).nbytes for r in job.readers)
        cached = bool(job.gram_cache and name in job.gram_cache)
        total += window * ((0 if cached else 1) + (1 if job.targets else 0))
    return total


@dataclass
class _SpanResult:
    span: _Span
    bytes_read: int
    gram: torch.Tensor | None = None
    read_seconds: float = 0.0
    math_seconds: float = 0.0
    write_seconds: float = 0.0


_NO_LOCK = contextlib.nullcontext()


class _Worker:
    """Runs spans on the pool's threads; each thread keeps its own scratch buffers."""

    def __init__(self, job: MergeJob, options: EngineOptions, sinks: Sequence[ChunkSink]):
        self.job, self.options, self.sinks = job, options, sinks
        self.device = options.device
        self.columns = block_columns(len(job.checkpoints), job.compute_dtype, self.device)
        self._local = threading.local()
        self.weights: dict[str, torch.Tensor] = {}  # set by the main thread before a tensor's outputs
        # readers that declare thread-safe reads (safetensors) share the workers; others
        # (lazily loaded shards, DCP) read one span at a time
        self._read_locks = {id(r): threading.Lock() for r in job.readers if not r.thread_safe_reads}

    def _read(self, reader: CheckpointReader, span: _Span) -> torch.Tensor:
        with self._read_locks.get(id(reader), _NO_LOCK):
            return read_span(reader, span.name, span.rows).reshape(-1)

    def _scratch(self, numel: int) -> Scratch:
        columns = min(self.columns, max(numel, 1))
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch.deltas.shape[1] < columns:
            scratch = Scratch.allocate(len(self.job.checkpoints), len(self.sinks), columns,
                                       self.job.compute_dtype, self.device)
            self._local.scratch = scratch
        return scratch

    def _output_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """n_outputs x numel, reused across spans (fresh memory costs a page fault per page)."""
        needed = len(self.sinks) * numel
        buffer = getattr(self._local, "out", None)
        if buffer is None or buffer.numel() < needed or buffer.dtype != dtype:
            buffer = self._local.out = torch.empty(needed, dtype=dtype, device=self.device)
        return buffer[:needed].view(len(self.sinks), numel)

    def run(self, span: _Span) -> _SpanResult:
        job = self.job
        start = time.perf_counter()
        readers = [job.base] if span.phase == "copy" else job.readers
        inputs = [self._read(reader, span) for reader in readers]
        result = _SpanResult(span, sum(x.nbytes for x in inputs))
        if self.device.type != "cpu":
            inputs = [x.to(self.device) for x in inputs]
        result.read_seconds = time.perf_counter() - start
        start = time.perf_counter()
        if span.phase == "gram":
            result.gram = span_gram(inputs, self._scratch(span.numel), self.columns).cpu()
            result.math_seconds = time.perf_counter() - start
            return result
        if span.phase == "copy":
            outputs = inputs[0].unsqueeze(0).expand(len(self.sinks), -1)
        else:
            outputs = self._output_buffer(span.numel, job.output_meta(span.name).dtype)
            span_outputs(inputs, self.weights[span.name], self._scratch(span.numel), self.columns, outputs)
            outputs = outputs.cpu()
        del inputs  # unmaps the span's inputs
        result.math_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for sink, output in zip(self.sinks, outputs):
            sink.write_at(span.name, span.start, output)
        result.write_seconds = time.perf_counter() - start
        return result


def _check_finite(job: MergeJob, options: EngineOptions, name: str, gram: torch.Tensor) -> None:
    """NaN or Inf in any input makes a delta, hence the Gram diagonal, non-finite: checking
    the T x T Gram matrix is free; the inputs are scanned only to name the culprit."""
    if bool(torch.isfinite(gram).all()):
        return
    for reader in job.readers:
        for rows, _, _ in _spans(job, options, name):
            chunk = reader.read(name, rows)
            if chunk.is_floating_point() and not bool(torch.isfinite(chunk).all()):
                raise RelexError(
                    f"{reader.path}: tensor {name} has NaN or Inf values; "
                    "pass --allow-nonfinite to merge anyway (such tensors are copied from the base)"
                )
    raise RelexError(f"tensor {name}: the deltas overflow the compute dtype; use dtype: float64")


def _weights(gram: torch.Tensor, job: MergeJob) -> torch.Tensor:
    weights = torch.zeros(len(job.targets), gram.shape[0], dtype=torch.float64)
    if not bool(torch.isfinite(gram).all()):  # only reachable with --allow-nonfinite
        return weights
    groups: dict[RelexSpec, list[int]] = {}
    for j, spec in enumerate(job.output_specs()):
        groups.setdefault(spec, []).append(j)
    for spec, rows in groups.items():  # outputs sharing a spec share one fit
        weights[rows] = relex_weights(gram, job.steps, [job.targets[j] for j in rows], spec)
    return weights


def _report(name: str, job: MergeJob, gram: torch.Tensor, passes: int) -> TensorReport:
    finite = bool(torch.isfinite(gram).all())
    return TensorReport(
        name,
        job.base.meta(name).numel,
        diagnostics(gram, job.steps, job.spec) if finite else None,
        passes=passes,
        zero_delta=finite and bool(gram.abs().max() == 0),
        nonfinite=not finite,
        gram=gram,
    )


@dataclass
class _TensorState:
    spans: list[_Span]
    remaining: int
    gram: torch.Tensor
    passes: int
    partial_grams: dict[int, torch.Tensor] = field(default_factory=dict)  # span index: its Gram

    def complete_gram(self) -> None:
        """Sum the spans' Gram matrices in span order, not in the order the workers finished:
        float64 addition is not associative, and the output must not depend on the timing."""
        for index in sorted(self.partial_grams):
            self.gram += self.partial_grams[index]
        self.partial_grams.clear()


class _Scheduler:
    """The main thread's side: spans in the base's order, a tensor's outputs as soon as its
    Gram matrix is complete (ahead of further Gram spans, so its inputs are still cached)."""

    def __init__(self, job: MergeJob, options: EngineOptions, worker: _Worker, stats: EngineStats,
                 progress: ProgressFn):
        self.job, self.options, self.worker, self.stats, self.progress = job, options, worker, stats, progress
        self.states: dict[str, _TensorState] = {}
        self.ready: deque[_Span] = deque()  # output spans: handed out first
        self.done: dict[str, tuple[torch.Tensor, int] | None] = {}  # finished: (Gram, passes); None: copied
        self._gram_spans = self._first_pass()

    def _first_pass(self) -> Iterator[_Span]:
        job = self.job
        n = len(job.checkpoints)
        for name in job.base.names():
            meta = job.base.meta(name)
            if not meta.dtype.is_floating_point and not job.targets:
                continue  # analyze: nothing to fit
            spans = _spans(job, self.options, name)
            cached = job.gram_cache.get(name) if job.gram_cache else None
            if not meta.dtype.is_floating_point:
                phase = "copy"
            elif cached is not None:
                phase = "emit"
            else:
                phase = "gram"
            pieces = [_Span(name, phase, i, rows, start, numel) for i, (rows, start, numel) in enumerate(spans)]
            gram = torch.zeros(n, n, dtype=torch.float64) if cached is None else cached.to("cpu", torch.float64)
            passes = (1 if phase == "gram" else 0) + (1 if job.targets else 0)
            self.states[name] = _TensorState(pieces, len(pieces), gram, passes)
            if phase == "emit":
                self._start_outputs(name)
            else:
                yield from pieces

    def next_span(self) -> _Span | None:
        if not self.ready:
            span = next(self._gram_spans, None)  # may queue output spans (fit cache) on the way
            if span is not None:
                return span
        return self.ready.popleft() if self.ready else None

    def _start_outputs(self, name: str) -> None:
        state = self.states[name]
        start = time.perf_counter()
        self.worker.weights[name] = _weights(state.gram, self.job)
        self.stats.fit_seconds += time.perf_counter() - start
        state.remaining = len(state.spans)
        self.ready.extend(replace(s, phase="emit") for s in state.spans)

    def finished(self, result: _SpanResult) -> None:
        span, stats = result.span, self.stats
        stats.bytes_read += result.bytes_read
        stats.read_seconds += result.read_seconds
        stats.math_seconds += result.math_seconds
        stats.write_seconds += result.write_seconds
        self.progress(result.bytes_read, False)
        state = self.states[span.name]
        if result.gram is not None:
            state.partial_grams[span.index] = result.gram
        state.remaining -= 1
        if state.remaining:
            return
        if span.phase == "gram":
            state.complete_gram()
            if not self.options.allow_nonfinite:
                _check_finite(self.job, self.options, span.name, state.gram)
            if self.job.targets:
                self._start_outputs(span.name)
                return
        self._tensor_done(span)

    def _tensor_done(self, span: _Span) -> None:
        state = self.states.pop(span.name)
        self.worker.weights.pop(span.name, None)
        self.done[span.name] = None if span.phase == "copy" else (state.gram, state.passes)
        self.progress(0, True)

    def reports(self) -> list[TensorReport]:
        """Every finished tensor's report, in the base's order. Diagnostics wait until the
        workers are done: on the main thread during the merge they only competed with them."""
        start = time.perf_counter()
        reports = []
        for name in self.job.base.names():
            if name not in self.done:
                continue
            fitted = self.done[name]
            if fitted is None:
                reports.append(TensorReport(name, self.job.base.meta(name).numel, None, passes=1))
            else:
                reports.append(_report(name, self.job, *fitted))
        self.stats.fit_seconds += time.perf_counter() - start
        return reports


def run_merge(
    job: MergeJob,
    sinks_per_target: Sequence[ChunkSink],
    options: EngineOptions,
    progress: ProgressFn = lambda nbytes, done: None,
) -> EngineStats:
    """Merge every tensor of the base model into one sink per output (none: Gram matrices and
    diagnostics only)."""
    workers = options.workers
    stats = EngineStats(workers=workers)
    worker = _Worker(job, options, sinks_per_target)
    scheduler = _Scheduler(job, options, worker, stats, progress)
    # The workers are the parallelism: torch's intra-op threads would only contend with them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="relex-worker")
    in_flight: set[Future] = set()
    try:
        while True:
            # two spans per worker: one running, one queued, so no worker waits on the main thread
            while len(in_flight) < 2 * workers and (span := scheduler.next_span()) is not None:
                in_flight.add(pool.submit(worker.run, span))
            if not in_flight:
                break
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                scheduler.finished(future.result())
    finally:
        for future in in_flight:
            future.cancel()
        pool.shutdown(wait=True)  # running spans are short; their errors no longer matter
        torch.set_num_threads(threads)
    stats.tensors = scheduler.reports()
    return stats

"""The engine's span tasks, apart from who runs them: every tensor of the job in spans of rows,
from every input; per tensor a Gram pass over its spans (deltas and their T x T Gram matrix per
fixed chunk of rows, summed in float64 in chunk order), the fit (weights for every output), then
an output pass over the same spans that forms base + W @ deltas elementwise and writes each span
to its place in the outputs. Spans are whole numbers of Gram chunks, so no result depends on the
memory budget, the threads or the processes (relex_merge.core.kernels).

``TensorTasks`` hands out spans and takes their results (the scheduling state of every tensor);
``SpanRunner`` runs one span (read, math, write; it is thread-safe). An executor
(relex_merge.engine.executors) decides where spans run: a pool of threads, several processes.

Inputs are read through memory maps where the format allows (safetensors): a span's bytes go
from the page cache into the math without a copy, and the second pass finds them still cached.
Within a span the work goes in cache-sized blocks (relex_merge.core.kernels), so neither the deltas
nor any other T x n intermediate is ever materialised.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from relex_merge.common.errors import RelexError
from relex_merge.core.kernels import (
    Scratch,
    block_columns,
    fold_grams,
    gram_chunk,
    gram_chunk_rows,
    single_threaded,
    span_gram,
    span_outputs,
)
from relex_merge.core.relex import RelexSpec, diagnostics, relex_weights
from relex_merge.engine.job import ChunkSink, EngineOptions, EngineStats, MergeJob, ProgressFn, TensorReport
from relex_merge.io.base import CheckpointReader, TensorMeta, read_span

__all__ = [
    "Span",
    "SpanResult",
    "SpanRunner",
    "TensorTasks",
    "plan_spans",
    "planned_read_bytes",
    "row_ranges",
    "chunk_rows",
    "SPAN_BYTES",
]

log = logging.getLogger(__name__)

_FIRST_PASS = {
    "gram": "Gram matrix",
    "emit": "outputs (Gram matrix already known)",
    "copy": "copy of the base (not a float tensor)",
}  # what a tensor's spans do first, for the log


def row_ranges(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``chunk_rows`` rows covering ``rows`` (one range for a
    scalar or an empty tensor)."""
    return [(start, min(rows, start + chunk_rows)) for start in range(0, max(rows, 1), chunk_rows)]


def chunk_rows(meta: TensorMeta, bytes_per_element: int, budget: int) -> int:
    """Rows of a tensor that fit in ``budget`` bytes at ``bytes_per_element`` (at least one)."""
    row_bytes = max(1, meta.numel // max(meta.rows, 1)) * bytes_per_element
    return max(1, min(meta.rows, budget // row_bytes))


# Input bytes of one span (all inputs together). Spans are the unit handed to a worker: large
# enough that handing out costs nothing, small enough to spread a tensor over the workers and
# to keep what a worker holds (its mapped inputs and output buffer) small.
SPAN_BYTES = 32 << 20

# Spans announced to the OS (readers' prefetch) before a worker takes them: with a cold page
# cache the disk then reads ahead while the workers compute, instead of each worker faulting its
# span in on its own. 4 spans of at most SPAN_BYTES: ~128 MB of readahead.
PREFETCH_SPANS = 4


@dataclass(frozen=True)
class Span:
    """One unit of work handed to a worker: some rows of one tensor, in one phase."""

    name: str
    phase: str  # "gram", "emit" (outputs) or "copy" (non-float tensors)
    index: int  # position among the tensor's spans
    rows: tuple[int, int] | None  # None: the whole tensor
    start: int  # first element
    numel: int  # elements in the span


def plan_spans(job: MergeJob, options: EngineOptions, name: str) -> list[tuple[tuple[int, int] | None, int, int]]:
    """(rows, first element, elements) of each span of a tensor, within the memory budget: a
    whole number of Gram chunks (``gram_chunk_rows``), at least one, whatever the budget."""
    meta = job.base.meta(name)
    input_bytes = sum(max(reader.meta(name).dtype.itemsize, 1) for reader in job.readers)
    # what a running span holds per element: its inputs (mapped or read) and its outputs
    per_element = input_bytes + max(len(job.targets), 1) * job.output_meta(name).dtype.itemsize
    if options.device.type != "cpu":  # the span also lives on the device, in the compute dtype
        per_element += (len(job.readers) + len(job.targets)) * job.compute_dtype.itemsize
    elements = min(SPAN_BYTES // input_bytes, options.max_memory // (options.workers * per_element))
    if not meta.shape or meta.numel == 0 or elements >= meta.numel:
        return [(None, 0, meta.numel)]
    if any(reader.whole_tensor_reads for reader in job.readers):
        # each span would read the whole tensor again (DCP): one span reads it once per pass, at
        # the cost of holding it whole from every input, whatever the budget
        log.debug("%s: one span (an input reads whole tensors), over the memory budget", name)
        return [(None, 0, meta.numel)]
    row_elements = meta.numel // meta.rows
    per_chunk = gram_chunk_rows(meta.shape)
    ranges = row_ranges(meta.rows, max(1, elements // row_elements // per_chunk) * per_chunk)
    if len(ranges) == 1:
        return [(None, 0, meta.numel)]
    return [((lo, hi), lo * row_elements, (hi - lo) * row_elements) for lo, hi in ranges]


def planned_read_bytes(job: MergeJob) -> int:
    """Bytes the merge will read, every pass counted: the progress bar's total."""
    total = 0
    for name in job.names():
        meta = job.base.meta(name)
        if not meta.dtype.is_floating_point:
            total += meta.nbytes if job.targets else 0
            continue
        window = sum(r.meta(name).nbytes for r in job.readers)
        cached = bool(job.gram_cache and name in job.gram_cache) and not job.gram_from
        total += window * ((0 if cached else 1) + (1 if job.targets else 0))
    return total


@dataclass
class SpanResult:
    """What running a span gives back to the scheduler (and its timings, in seconds)."""

    span: Span
    bytes_read: int
    gram: torch.Tensor | None = None  # n_chunks x T x T float64: its chunks' Gram matrices (gram phase only)
    read_seconds: float = 0.0
    math_seconds: float = 0.0
    write_seconds: float = 0.0


_NO_LOCK = contextlib.nullcontext()


class SpanRunner:
    """Runs spans on the pool's threads; each thread keeps its own scratch buffers."""

    def __init__(self, job: MergeJob, options: EngineOptions, sinks: Sequence[ChunkSink]):
        self.job, self.options, self.sinks = job, options, sinks
        self.device = options.device
        self.columns = block_columns(len(job.checkpoints), job.compute_dtype)
        self._local = threading.local()
        self.weights: dict[str, torch.Tensor] = {}  # set by the main thread before a tensor's outputs
        # readers that declare thread-safe reads (safetensors) share the workers; others
        # (lazily loaded shards, DCP) read one span at a time
        self._read_locks = {id(r): threading.Lock() for r in job.readers if not r.thread_safe_reads}

    def prefetch(self, span: Span) -> None:
        """Announce the span's inputs to the readers (the OS starts reading them)."""
        for reader in [self.job.base] if span.phase == "copy" else self.job.readers:
            reader.prefetch(span.name, span.rows)

    def _read(self, reader: CheckpointReader, span: Span) -> torch.Tensor:
        with self._read_locks.get(id(reader), _NO_LOCK):
            return read_span(reader, span.name, span.rows).reshape(-1)

    def _scratch(self) -> Scratch:
        """This thread's scratch: always ``block_columns`` wide (the kernels' blocks, hence their
        results, depend on the width)."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = Scratch.allocate(len(self.job.checkpoints), self.columns, self.job.compute_dtype, self.device)
            self._local.scratch = scratch
        return scratch

    def _output_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """n_outputs x numel, reused across spans (fresh memory costs a page fault per page)."""
        needed = len(self.sinks) * numel
        buffer = getattr(self._local, "out", None)
        if buffer is None or buffer.numel() < needed or buffer.dtype != dtype:
            buffer = self._local.out = torch.empty(needed, dtype=dtype, device=self.device)
        return buffer[:needed].view(len(self.sinks), numel)

    @torch.no_grad()  # a defence: readers return detached tensors, and nothing here needs autograd
    def run(self, span: Span) -> SpanResult:
        """Read the span from every input; in the gram phase return its Gram matrix, otherwise
        form the outputs (or copy the base) and write them to the sinks. Thread-safe."""
        job = self.job
        start = time.perf_counter()
        readers = [job.base] if span.phase == "copy" else job.readers
        inputs = [self._read(reader, span) for reader in readers]
        result = SpanResult(span, sum(x.nbytes for x in inputs))
        if self.device.type != "cpu":
            inputs = [x.to(self.device) for x in inputs]
        result.read_seconds = time.perf_counter() - start
        start = time.perf_counter()
        if span.phase == "gram":
            chunk = gram_chunk(job.base.meta(span.name).shape)
            result.gram = span_gram(inputs, self._scratch(), chunk, job.gram_from).cpu()
            result.math_seconds = time.perf_counter() - start
            return result
        if span.phase == "copy":
            outputs = inputs[0].unsqueeze(0).expand(len(self.sinks), -1)
        else:
            outputs = self._output_buffer(span.numel, job.output_meta(span.name).dtype)
            span_outputs(inputs, self.weights[span.name], self._scratch(), outputs)
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
        for rows, _, _ in plan_spans(job, options, name):
            chunk = reader.read(name, rows)
            if chunk.is_floating_point() and not bool(torch.isfinite(chunk).all()):
                raise RelexError(
                    f"{reader.path}: tensor {name} has NaN or Inf values; "
                    "pass --allow-nonfinite to merge anyway (such tensors are copied from the base)"
                )
    raise RelexError(f"tensor {name}: the deltas overflow the compute dtype; use dtype: float64")


@single_threaded
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


@single_threaded
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
    spans: list[Span]
    remaining: int
    gram: torch.Tensor
    passes: int
    partial_grams: dict[int, torch.Tensor] = field(default_factory=dict)  # span index: its chunks' Grams
    folded: int = 0  # spans whose chunks are in ``gram``

    def add_gram(self, index: int, grams: torch.Tensor) -> None:
        """Take span ``index``'s chunk Gram matrices; add every span's that can be added in
        span order (then chunk order), not in the order the workers finished: float64 addition
        is not associative, and the output must not depend on the timing. Spans waiting for an
        earlier one are held (a few KB each)."""
        self.partial_grams[index] = grams
        while self.folded in self.partial_grams:
            fold_grams(self.partial_grams.pop(self.folded), self.gram)
            self.folded += 1


class TensorTasks:
    """The scheduling side, on one thread: spans in the job's tensor order, a tensor's outputs as
    soon as its Gram matrix is complete (ahead of further Gram spans, so its inputs are still
    cached), the fit between the two, the reports at the end. Executors call ``next_span``, run
    the span with ``runner.run`` anywhere, and hand the result to ``finished``."""

    def __init__(
        self,
        job: MergeJob,
        sinks: Sequence[ChunkSink],
        options: EngineOptions,
        stats: EngineStats,
        progress: ProgressFn,
    ):
        self.job, self.options, self.stats, self.progress = job, options, stats, progress
        self.runner = SpanRunner(job, options, sinks)
        self.states: dict[str, _TensorState] = {}
        self.ready: deque[Span] = deque()  # output spans: handed out first
        self.done: dict[str, tuple[torch.Tensor, int] | None] = {}  # finished: (Gram, passes); None: copied
        self._gram_spans = self._first_pass()
        self._ahead: deque[Span] = deque()  # first-pass spans pulled (and prefetched) ahead of the workers

    def _first_pass(self) -> Iterator[Span]:
        job = self.job
        n = len(job.checkpoints)
        for name in job.names():
            meta = job.base.meta(name)
            if not meta.dtype.is_floating_point and not job.targets:
                continue  # analyze: nothing to fit
            spans = plan_spans(job, self.options, name)
            cached = job.gram_cache.get(name) if job.gram_cache else None
            if not meta.dtype.is_floating_point:
                phase = "copy"
            elif cached is not None and not job.gram_from:
                phase = "emit"
            else:
                phase = "gram"
            pieces = [Span(name, phase, i, rows, start, numel) for i, (rows, start, numel) in enumerate(spans)]
            log.debug("%s: %d span(s); first pass: %s", name, len(pieces), _FIRST_PASS[phase])
            if cached is None and job.gram_from:
                raise RelexError(f"tensor {name}: no known Gram block to add new rows to (the fit cache lacks it)")
            if cached is None:
                gram = torch.zeros(n, n, dtype=torch.float64)
            elif job.gram_from:  # the earlier block is known; the spans add the new rows
                k = job.gram_from
                if tuple(cached.shape) != (k, k):
                    raise RelexError(f"tensor {name}: a known Gram block of {tuple(cached.shape)}, expected {(k, k)}")
                gram = torch.zeros(n, n, dtype=torch.float64)
                gram[:k, :k] = cached.to("cpu", torch.float64)
            else:
                gram = cached.to("cpu", torch.float64)
            passes = (1 if phase == "gram" else 0) + (1 if job.targets else 0)
            if phase == "emit" and not self.options.allow_nonfinite and not bool(torch.isfinite(gram).all()):
                # a cache analyze wrote under --allow-nonfinite: the consent does not carry over
                raise RelexError(
                    f"tensor {name}: the fit cache's Gram matrix has NaN or Inf (made with --allow-nonfinite); "
                    "pass --allow-nonfinite to merge anyway (such tensors are copied from the base)"
                )
            self.states[name] = _TensorState(pieces, len(pieces), gram, passes)
            if phase == "emit":
                self._start_outputs(name)
            else:
                yield from pieces

    def next_span(self) -> Span | None:
        """The next span to run (output spans first), or None when none is ready now. None with
        spans still in flight means: wait for one to finish, then ask again."""
        if not self.ready:
            span = self._next_first_pass()  # may queue output spans (fit cache) on the way
            if span is not None:
                return span
        if not self.ready:
            return None
        if len(self.ready) > PREFETCH_SPANS:
            self.runner.prefetch(self.ready[PREFETCH_SPANS])
        return self.ready.popleft()

    def _next_first_pass(self) -> Span | None:
        while len(self._ahead) < PREFETCH_SPANS:
            span = next(self._gram_spans, None)
            if span is None:
                break
            self.runner.prefetch(span)
            self._ahead.append(span)
        return self._ahead.popleft() if self._ahead else None

    def _start_outputs(self, name: str) -> None:
        state = self.states[name]
        start = time.perf_counter()
        given = self.job.weights
        self.runner.weights[name] = (
            given[name].to(torch.float64) if given is not None else _weights(state.gram, self.job)
        )
        self.stats.fit_seconds += time.perf_counter() - start
        state.remaining = len(state.spans)
        for span in state.spans[:PREFETCH_SPANS]:
            self.runner.prefetch(span)
        self.ready.extend(replace(s, phase="emit") for s in state.spans)

    def finished(self, result: SpanResult) -> None:
        """Take a span's result: count it, and when a tensor's Gram pass is complete, check it and
        fit (queuing its output spans); when a tensor is done, keep its Gram matrix for the report.
        Call it on the scheduling thread only."""
        span, stats = result.span, self.stats
        stats.bytes_read += result.bytes_read
        stats.read_seconds += result.read_seconds
        stats.math_seconds += result.math_seconds
        stats.write_seconds += result.write_seconds
        self.progress(result.bytes_read, False)
        state = self.states[span.name]
        if result.gram is not None:
            state.add_gram(span.index, result.gram)
        state.remaining -= 1
        if state.remaining:
            return
        if span.phase == "gram":
            if not self.options.allow_nonfinite:
                _check_finite(self.job, self.options, span.name, state.gram)
            if self.job.targets:
                self._start_outputs(span.name)
                return
        self._tensor_done(span)

    def _tensor_done(self, span: Span) -> None:
        state = self.states.pop(span.name)
        self.runner.weights.pop(span.name, None)
        self.done[span.name] = None if span.phase == "copy" else (state.gram, state.passes)
        self.progress(0, True)

    def reports(self) -> list[TensorReport]:
        """Every finished tensor's report, in the base's order. Diagnostics wait until the
        workers are done: on the main thread during the merge they only competed with them."""
        start = time.perf_counter()
        reports = []
        for name in self.job.names():
            if name not in self.done:
                continue
            fitted = self.done[name]
            if fitted is None:
                reports.append(TensorReport(name, self.job.base.meta(name).numel, None, passes=1))
            else:
                reports.append(_report(name, self.job, *fitted))
        self.stats.fit_seconds += time.perf_counter() - start
        return reports

"""Per-span kernels of the engine: deltas, Gram products and weighted sums over one span of
one tensor, in an order fixed by the tensor's shape alone.

The inputs of a span (base first, then the window's checkpoints) are flat tensors, usually
views of the memory-mapped files. Each block's deltas are formed in a scratch buffer and used
at once, so the T x n deltas of a tensor never exist in memory: the traffic to RAM is reading
the inputs (and writing the outputs).

Same bytes whatever the threads, processes, memory budget or alignment (docs/performance.md):

* The Gram matrix of a tensor is a sum over fixed *chunks*: whole rows, about CHUNK_ELEMENTS
  elements (``gram_chunk(shape)``). The engine's spans are whole numbers of chunks, so a chunk
  never depends on the span size; ``span_gram`` returns one float64 Gram matrix per chunk and
  ``fold_grams`` adds them in chunk order, whoever computed them and whenever.
* Inside a chunk, blocks of the scratch's width (``block_columns``: fixed by T and the compute
  dtype) go through one GEMM each on one BLAS thread (``one_thread``), from a scratch buffer that
  is always that wide (the same leading dimension and alignment), added in block order in float64.
  A BLAS (MKL) splits and vectorises a product by thread count and alignment; here neither varies.
* Outputs are elementwise: each product w_jk * delta_k rounded once, summed over k by a pairwise
  tree whose shape depends on T only, then added to the base (no GEMM, no FMA, no reduction whose
  order depends on the vector width or the threads). Given the same weights, the output bytes are
  the same on every IEEE-754 machine.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

__all__ = [
    "BLOCK_BYTES",
    "CHUNK_ELEMENTS",
    "Scratch",
    "block_columns",
    "block_deltas",
    "fold_grams",
    "gram_chunk",
    "gram_chunk_rows",
    "one_thread",
    "single_threaded",
    "span_gram",
    "span_outputs",
    "tree_sum_rows",
]

# The Gram reduction unit: whole rows, about this many elements (at least one row). A constant:
# it must not depend on the memory budget, the worker count or the machine. 256 Ki elements:
# a chunk holds whole blocks at T <= 8 (smaller chunks cut the blocks short: +14% against the
# free-order kernels at T = 8 with 64 Ki, +7% with 256 Ki; bench/determinism_cost.py), and at
# T = 30 in fp32 a chunk's inputs (31 MB) still fit one span (SPAN_BYTES).
CHUNK_ELEMENTS = 1 << 18

# A block's deltas (T x block in the compute dtype) should stay in cache. One worker alone is
# fastest with blocks in L2 (1 MB on the 2-core bench machine), but the workers share the GIL
# for the few Python steps per block: with two workers 4-16 MB blocks (in L3) measured 30-40%
# faster than 1 MB ones, 512 kB slower again. The width is a multiple of 16 elements, so every
# scratch row starts 64-byte aligned.
BLOCK_BYTES = 4 << 20
MIN_BLOCK, MAX_BLOCK = 4096, 1 << 20


def block_columns(n_checkpoints: int, compute_dtype: torch.dtype) -> int:
    """Columns per block: fixed by T and the compute dtype only (never the device, span or budget)."""
    columns = BLOCK_BYTES // max(1, n_checkpoints * compute_dtype.itemsize)
    return max(MIN_BLOCK, min(MAX_BLOCK, columns)) // 16 * 16


def gram_chunk_rows(shape: Sequence[int]) -> int:
    """Rows per Gram chunk of a tensor of this shape: about CHUNK_ELEMENTS elements, at least one row."""
    if not shape:
        return 1
    row_elements = math.prod(shape[1:])
    return max(1, min(shape[0], CHUNK_ELEMENTS // max(row_elements, 1)))


def gram_chunk(shape: Sequence[int]) -> int:
    """Elements per Gram chunk of a tensor of this shape (its last chunk may be shorter)."""
    return max(1, gram_chunk_rows(shape) * math.prod(shape[1:]))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch (OpenMP, and MKL on this thread) on one intra-op thread in the body, restored after.
    ``torch.set_num_threads`` also sets MKL's thread-local count, which a fresh thread would
    otherwise take from OMP_NUM_THREADS or the core count."""
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous != 1:
            torch.set_num_threads(previous)


F = TypeVar("F", bound=Callable)


def single_threaded(function: F) -> F:
    """``function`` run under ``one_thread``: for the fit math (eigh, pinv, small products) whose
    LAPACK/BLAS results may depend on the thread count."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with one_thread():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class Scratch:
    """One worker's reusable block buffers, all as wide as a block (fresh allocations would
    page-fault every time; a fixed width keeps every GEMM's leading dimension and alignment)."""

    base: torch.Tensor  # columns, compute dtype
    deltas: torch.Tensor  # T x columns
    products: torch.Tensor  # T x columns: w_jk * delta_k of an output
    gram: torch.Tensor  # T x T, compute dtype: one block's product

    @classmethod
    def allocate(cls, n_checkpoints: int, columns: int, dtype: torch.dtype, device: torch.device):
        """Uninitialised buffers for blocks of ``columns`` elements (``block_columns`` in the engine)."""
        return cls(
            torch.empty(columns, dtype=dtype, device=device),
            torch.empty(n_checkpoints, columns, dtype=dtype, device=device),
            torch.empty(n_checkpoints, columns, dtype=dtype, device=device),
            torch.empty(n_checkpoints, n_checkpoints, dtype=dtype, device=device),
        )

    @property
    def columns(self) -> int:
        """The block width."""
        return self.deltas.shape[1]


def block_deltas(
    inputs: Sequence[torch.Tensor], lo: int, hi: int, scratch: Scratch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, deltas) of columns lo:hi in the compute dtype; deltas[k] = inputs[k+1] - base, at
    the start of the scratch's rows.

    Inputs in another dtype (bf16 checkpoints) are converted before subtracting: one RL
    step's delta is often below one bf16 ulp of the weight."""
    k = hi - lo
    base = inputs[0][lo:hi]
    if base.dtype != scratch.base.dtype:
        base = scratch.base[:k].copy_(base)
    deltas = scratch.deltas[:, :k]
    for row, checkpoint in zip(deltas, inputs[1:]):
        x = checkpoint[lo:hi]
        if x.dtype == deltas.dtype:
            torch.sub(x, base, out=row)
        else:  # convert, then subtract in place: 2x faster than a mixed-dtype subtraction
            row.copy_(x)
            row.sub_(base)
    return base, deltas


def span_gram(inputs: Sequence[torch.Tensor], scratch: Scratch, chunk: int, first: int = 0) -> torch.Tensor:
    """One T x T float64 Gram matrix of the deltas per chunk of ``chunk`` elements of the span
    (n_chunks x T x T, on the compute device). The span starts on a chunk boundary; only the tensor's last
    chunk is shorter. Each block's product in the compute dtype (one GEMM on one thread), added
    in block order in float64. Sum the chunks with ``fold_grams``. With ``first`` > 0 only the
    entries of deltas ``first``.. with every delta (rows and, mirrored, columns); the block of the
    earlier ones stays zero (a caller that knows it adds it: watch's one new row per checkpoint)."""
    n = inputs[0].numel()
    t = scratch.deltas.shape[0]
    n_chunks = max(1, -(-n // chunk))
    grams = torch.zeros(n_chunks, t, t, dtype=torch.float64, device=scratch.deltas.device)
    width = scratch.columns
    with one_thread():
        for c in range(n_chunks):
            lo_c, hi_c = c * chunk, min(n, (c + 1) * chunk)
            acc = grams[c]
            for lo in range(lo_c, hi_c, width):
                _, deltas = block_deltas(inputs, lo, min(hi_c, lo + width), scratch)
                # the whole block's product even for new rows only: the same GEMM shape as a full
                # pass, so a row added later equals the row a full pass of this window computes
                torch.mm(deltas, deltas.T, out=scratch.gram)
                if first:
                    acc[first:] += scratch.gram[first:]
                else:
                    acc += scratch.gram  # float64 += compute dtype: converted exactly, one rounding
    if first:
        grams[:, :first, first:] = grams[:, first:, :first].transpose(1, 2)
    return grams


def fold_grams(grams: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """``total`` (zeros when None) plus each chunk's Gram matrix, one after another in chunk
    order: float64 addition is not associative, so the order is part of the result."""
    if total is None:
        total = torch.zeros(grams.shape[1:], dtype=torch.float64)
    for gram in grams:
        total += gram
    return total


def tree_sum_rows(x: torch.Tensor) -> torch.Tensor:
    """The sum of the rows of x (m x k), in place, by a pairwise tree fixed by m: rows i and
    m - h + i are added for i < h = m // 2, then m -= h, until one row is left (row 0, returned)."""
    m = x.shape[0]
    while m > 1:
        h = m // 2
        x[:h].add_(x[m - h : m])
        m -= h
    return x[0]


def span_outputs(inputs: Sequence[torch.Tensor], weights: torch.Tensor, scratch: Scratch, out: torch.Tensor) -> None:
    """out[j] = base + sum_k weights[j, k] * delta_k over the span (out: n_outputs x n, any
    dtype), elementwise: each product rounded once to the compute dtype, the sum over k a fixed
    pairwise tree, the base added, then one rounding to the output dtype.

    All-zero weights (unchanged tensors, and non-finite ones under --allow-nonfinite) copy the
    base, so NaN deltas never meet a zero weight (0 * NaN is NaN)."""
    n = inputs[0].numel()
    if not bool(weights.any()):
        out.copy_(inputs[0].to(out.device).unsqueeze(0).expand_as(out))
        return
    w = weights.to(scratch.deltas.device, scratch.deltas.dtype).unsqueeze(2)  # n_out x T x 1
    width = scratch.columns
    last = w.shape[0] - 1
    for lo in range(0, n, width):
        hi = min(n, lo + width)
        base, deltas = block_deltas(inputs, lo, hi, scratch)
        for j in range(w.shape[0]):
            # the last output works in place in the deltas (one output: no second buffer)
            if j == last:
                products = deltas.mul_(w[j])
            else:
                products = torch.mul(deltas, w[j], out=scratch.products[:, : hi - lo])
            torch.add(base, tree_sum_rows(products), out=out[j, lo:hi])

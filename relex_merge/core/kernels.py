"""Per-span kernels of the engine: deltas, Gram products and weighted sums over one span of
one tensor, taken in blocks that stay in the CPU cache.

The inputs of a span (base first, then the window's checkpoints) are flat tensors, usually
views of the memory-mapped files. Each block's deltas are formed in a scratch buffer and used
at once, so the T x n deltas of a tensor never exist in memory: the traffic to RAM is reading
the inputs (and writing the outputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BLOCK_BYTES", "Scratch", "block_columns", "block_deltas", "span_gram", "span_outputs"]

# A block's deltas (T x block in the compute dtype) should stay in cache. One worker alone is
# fastest with blocks in L2 (1 MB on the 2-core bench machine), but the workers share the GIL
# for the few Python steps per block: with two workers 4-16 MB blocks (in L3) measured 30-40%
# faster than 1 MB ones, 512 kB slower again.
BLOCK_BYTES = 4 << 20
MIN_BLOCK, MAX_BLOCK = 4096, 1 << 20


def block_columns(n_checkpoints: int, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Columns per block: cache-sized on the CPU; on an accelerator a whole span is one block."""
    if device.type != "cpu":
        return 1 << 62
    columns = BLOCK_BYTES // max(1, n_checkpoints * compute_dtype.itemsize)
    return max(MIN_BLOCK, min(MAX_BLOCK, columns))


@dataclass
class Scratch:
    """One worker's reusable block buffers (fresh allocations would page-fault every time)."""

    base: torch.Tensor  # block, compute dtype
    deltas: torch.Tensor  # T x block
    outputs: torch.Tensor  # n_outputs x block

    @classmethod
    def allocate(cls, n_checkpoints: int, n_outputs: int, columns: int, dtype: torch.dtype, device: torch.device):
        """Uninitialised buffers for blocks of ``columns`` elements (at least one output row)."""
        return cls(
            torch.empty(columns, dtype=dtype, device=device),
            torch.empty(n_checkpoints, columns, dtype=dtype, device=device),
            torch.empty(max(n_outputs, 1), columns, dtype=dtype, device=device),
        )


def block_deltas(
    inputs: Sequence[torch.Tensor], lo: int, hi: int, scratch: Scratch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, deltas) of columns lo:hi in the compute dtype; deltas[k] = inputs[k+1] - base.

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


def span_gram(inputs: Sequence[torch.Tensor], scratch: Scratch, columns: int, first: int = 0) -> torch.Tensor:
    """T x T float64 Gram matrix of the span's deltas: each block's product in the compute
    dtype (fast BLAS), summed across blocks in float64. With ``first`` > 0 only the entries of
    deltas ``first``.. with every delta (rows and, mirrored, columns); the block of the earlier
    ones stays zero (a caller that knows it adds it: watch's one new row per checkpoint)."""
    n = inputs[0].numel()
    t = scratch.deltas.shape[0]
    gram = torch.zeros(t, t, dtype=torch.float64, device=scratch.deltas.device)
    for lo in range(0, n, columns):
        _, deltas = block_deltas(inputs, lo, min(n, lo + columns), scratch)
        if first:
            gram[first:] += (deltas[first:] @ deltas.T).to(torch.float64)
        else:
            gram += (deltas @ deltas.T).to(torch.float64)
    if first:
        gram[:first, first:] = gram[first:, :first].T
    return gram


def span_outputs(
    inputs: Sequence[torch.Tensor], weights: torch.Tensor, scratch: Scratch, columns: int, out: torch.Tensor
) -> None:
    """out[j] = base + sum_k weights[j, k] * delta_k over the span (out: n_outputs x n, any dtype).

    All-zero weights (unchanged tensors, and non-finite ones under --allow-nonfinite) copy the
    base, so NaN deltas never meet a zero weight (0 * NaN is NaN)."""
    n = inputs[0].numel()
    if not bool(weights.any()):
        out.copy_(inputs[0].to(out.device).unsqueeze(0).expand_as(out))
        return
    w = weights.to(scratch.deltas.device, scratch.deltas.dtype)
    for lo in range(0, n, columns):
        hi = min(n, lo + columns)
        base, deltas = block_deltas(inputs, lo, hi, scratch)
        block = scratch.outputs[: w.shape[0], : hi - lo]
        torch.addmm(base.unsqueeze(0).expand_as(block), w, deltas, out=block)
        out[:, lo:hi].copy_(block)

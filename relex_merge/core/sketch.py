"""A sketched Gram matrix: each delta replaced by a CountSketch of it (pure torch, no IO).

``watch`` keeps one small vector per checkpoint and tensor instead of re-reading the window: a
new checkpoint costs one read of itself. CountSketch (Charikar et al.; the sparse
Johnson-Lindenstrauss transform with one nonzero per column) maps x in R^d to s in R^m with
s[h(i)] += sign(i) * x[i], h and sign drawn from a seeded generator per tensor, so

    E[<Sa, Sb>] = <a, b>,   Var <Sa, Sb> = (||a||^2 ||b||^2 + <a, b>^2 - 2 sum_i a_i^2 b_i^2) / m
                                         <= 2 ||a||^2 ||b||^2 / m

and each Gram entry's error, relative to sqrt(G_jj G_kk), has a standard deviation of at most
sqrt(2 / m) (about 2% at m = 4096). Sketching is linear, so S(theta_k - theta_0) = S theta_k -
S theta_0 and the base is sketched once. Tensors of at most m elements are kept exactly.

The hash of element i depends only on (seed, tensor name, i): spans of any size give the same
sketch (float64 partial sketches, summed by the caller in span order).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

__all__ = ["CountSketch", "relative_error_bound"]

CHUNK = 1 << 16  # elements whose hashes come from one seeded generator


@dataclass(frozen=True)
class CountSketch:
    """A CountSketch of width ``width`` per tensor, seeded."""

    width: int
    seed: int = 0

    def __post_init__(self):
        if self.width < 1:
            raise ValueError(f"sketch width must be positive, got {self.width}")

    def exact(self, numel: int) -> bool:
        """Tensors this small are kept as they are (their 'sketch' is the vector itself)."""
        return numel <= self.width

    def size(self, numel: int) -> int:
        """Length of a tensor's sketch."""
        return numel if self.exact(numel) else self.width

    def _hashes(self, name: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode()) * 65_537 + chunk) % 2**63)
        buckets = torch.randint(self.width, (CHUNK,), generator=g)
        signs = torch.randint(2, (CHUNK,), generator=g, dtype=torch.float64).mul_(2).sub_(1)
        return buckets, signs

    def sketch(self, name: str, flat: torch.Tensor, start: int, numel: int) -> torch.Tensor:
        """The sketch (float64) of elements ``start``..``start + len(flat)`` of tensor ``name``
        (``numel`` elements in all); the sketch of the whole tensor is the sum over its spans."""
        x = flat.reshape(-1).to(torch.float64)
        if self.exact(numel):
            out = torch.zeros(numel, dtype=torch.float64)
            out[start : start + x.numel()] = x
            return out
        out = torch.zeros(self.width, dtype=torch.float64)
        stop = start + x.numel()
        position = start
        while position < stop:
            chunk = position // CHUNK
            lo = position - chunk * CHUNK
            hi = min(CHUNK, stop - chunk * CHUNK)
            buckets, signs = self._hashes(name, chunk)
            piece = x[position - start : position - start + (hi - lo)]
            out.index_add_(0, buckets[lo:hi], piece * signs[lo:hi])
            position += hi - lo
        return out


def relative_error_bound(width: int) -> float:
    """The bound on the standard deviation of a sketched Gram entry's error, relative to
    sqrt(G_jj G_kk): sqrt(2 / width)."""
    return (2.0 / width) ** 0.5

"""``fit: power`` -- c = a + b·(s − s0)^p with 0 < p <= 1.5; p < 1 decelerates (p = 0.5: a
square root), p = 1 is the line. Without ``p:`` in the config the backtest chooses p."""

from __future__ import annotations

import torch

from relex_merge.core.fits import BasisFamily, Shape

__all__ = ["FAMILY", "Power"]


class Power(BasisFamily):
    """A power of the steps past the base; ``p`` (0 < p <= 1.5) below 1 decelerates."""

    name = "power"
    formula = "c = a + b·(s − s0)^p"
    shape = Shape(
        "p", "exponent", low=0.0, high=1.5, grid=(0.025, 0.05, *(k / 20 for k in range(2, 31) if k != 20))
    )  # p = 1 is the line
    complexity = 3

    def basis(self, x, shape, origin, frame):
        """[1, (s - s0)^p], steps before the base clamped to s0."""
        return torch.stack([torch.ones_like(x), (x - origin).clamp_min(0.0) ** shape], 1)


FAMILY = Power()

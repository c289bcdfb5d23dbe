"""``fit: log`` -- c = a + b·ln(s − s0 + tau): fast early growth that keeps slowing down; small
tau decelerates sooner, large tau approaches the line. Without ``tau:`` the backtest chooses it
(a grid of multiples of the window's last step past the base)."""

from __future__ import annotations

import math

import torch

from relex_merge.core.fits import BasisFamily, Shape

__all__ = ["FAMILY", "Log"]


class Log(BasisFamily):
    """Logarithmic growth past the base; the shape ``tau`` (steps) sets how soon it slows."""

    name = "log"
    formula = "c = a + b·ln(s − s0 + tau)"
    shape = Shape(
        "tau",
        "offset in steps",
        low=0.0,
        high=math.inf,
        grid=tuple(2 ** (k / 4) for k in range(-24, 13)),
        grid_in_window_spans=True,
    )
    complexity = 3

    def basis(self, x, shape, origin, frame):
        """[1, ln(s - s0 + tau)]."""
        return torch.stack([torch.ones_like(x), torch.log(x - origin + shape)], 1)


FAMILY = Log()

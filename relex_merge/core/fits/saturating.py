"""``fit: saturating`` -- c = a + b·(1 − exp(−(s − s0)/tau)): growth that levels off at a
plateau about tau steps past the base. Without ``tau:`` the backtest chooses it."""

from __future__ import annotations

import math

import torch

from relex_merge.core.fits import BasisFamily, Shape

__all__ = ["FAMILY", "Saturating"]


class Saturating(BasisFamily):
    """Exponential approach to a plateau; ``tau`` is the time constant in steps."""

    name = "saturating"
    formula = "c = a + b·(1 − exp(−(s − s0)/tau))"
    shape = Shape(
        "tau",
        "time constant in steps",
        low=0.0,
        high=math.inf,
        grid=tuple(2 ** (k / 4) for k in range(-16, 17)),
        grid_in_window_spans=True,
    )
    complexity = 3

    def basis(self, x, shape, origin, frame):
        """[1, 1 - exp(-(s - s0)/tau)]."""
        return torch.stack([torch.ones_like(x), -torch.expm1(-(x - origin) / shape)], 1)


FAMILY = Saturating()

"""``fit: linear`` -- RELEX itself: the coefficient grows linearly with the step."""

from __future__ import annotations

import torch

from relex_merge.core.fits import BasisFamily

__all__ = ["FAMILY", "Linear"]


class Linear(BasisFamily):
    """The straight line: RELEX as published, and the default fit."""

    name = "linear"
    formula = "c = a + b·s"
    complexity = 2

    def basis(self, x, shape, origin, frame):
        """[1, z] with z the step centred and scaled by the frame (the same line, better conditioned)."""
        z = (x - frame[0]) / frame[1]
        return torch.stack([torch.ones_like(z), z], 1)


FAMILY = Linear()

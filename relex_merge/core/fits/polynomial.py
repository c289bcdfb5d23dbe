"""``fit: polynomial`` -- c = a0 + a1·s + ... + ad·s^d (``degree: d``, default 2)."""

from __future__ import annotations

import math

import torch

from relex_merge.core.fits import BasisFamily, Shape

__all__ = ["FAMILY", "Polynomial"]


class Polynomial(BasisFamily):
    """A polynomial in the step of degree ``degree`` (default 2; the only degree ``auto`` tries)."""

    name = "polynomial"
    formula = "c = a0 + a1·s + … + ad·s^d"
    shape = Shape(
        "degree", "polynomial degree", low=1, high=math.inf, low_inclusive=True, integer=True, default=2, grid=(2,)
    )
    complexity = 3

    def coefficients(self, shape):
        return int(shape if shape is not None else 2) + 1

    def too_few_points(self, shape, need, have):
        return f"parameters.degree: a degree-{int(shape)} polynomial needs more than {int(shape)} checkpoints"

    def basis(self, x, shape, origin, frame):
        """[1, z, ..., z^degree] with z the step centred and scaled by the frame."""
        z = (x - frame[0]) / frame[1]  # an affine change of x: the same curves, better conditioned
        return torch.stack([z**k for k in range(int(shape) + 1)], 1)


FAMILY = Polynomial()

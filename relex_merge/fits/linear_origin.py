"""``fit: linear_origin`` -- a line through the base model: c = 0 at the base step."""

from __future__ import annotations

from relex_merge.fits.base import BasisFamily


class LinearOrigin(BasisFamily):
    name = "linear_origin"
    formula = "c = b·(s − s0)"
    complexity = 1
    has_intercept = False

    def coefficients(self, shape):
        return 1

    def basis(self, x, shape, origin, frame):
        return (x - origin).unsqueeze(1)


FAMILY = LinearOrigin()

"""``fit: linear_origin`` -- a line through the base model: c = 0 at the base step."""

from __future__ import annotations

from relex_merge.core.fits import BasisFamily

__all__ = ["FAMILY", "LinearOrigin"]


class LinearOrigin(BasisFamily):
    """A line through zero at the base step: one coefficient, so the simplest family in ``auto``."""

    name = "linear_origin"
    formula = "c = b·(s − s0)"
    complexity = 1
    has_intercept = False

    def coefficients(self, shape):
        return 1

    def basis(self, x, shape, origin, frame):
        """The single column s - s0 (no intercept)."""
        return (x - origin).unsqueeze(1)


FAMILY = LinearOrigin()

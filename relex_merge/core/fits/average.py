"""``fit: average`` -- checkpoint averaging (LAWA): the mean of the window's last ``last``
checkpoints, whatever the target. It does not extrapolate: it trades the last checkpoint's noise
for a lag. Without ``last:`` the backtest chooses it."""

from __future__ import annotations

import math

import torch

from relex_merge.core.fits import DirectFamily, Shape

__all__ = ["FAMILY", "Average"]


class Average(DirectFamily):
    """The mean of the last ``last`` checkpoints (all of them when the window holds fewer)."""

    name = "average"
    formula = "θ = mean of the last k checkpoints (k = last)"
    shape = Shape(
        "last",
        "checkpoints averaged (the window's last ones)",
        low=2,
        high=math.inf,
        low_inclusive=True,
        integer=True,
        grid=(2, 3, 4, 6, 8, 12, 16, 24, 32),
    )
    complexity = 3

    def window_weights(self, steps, targets, shape):
        k = min(int(shape), steps.numel())
        weights = torch.zeros(targets.numel(), steps.numel(), dtype=torch.float64)
        weights[:, -k:] = 1.0 / k
        return weights


FAMILY = Average()

"""``fit: ema`` -- an exponential moving average of the window's checkpoints: weights halve every
``halflife`` steps back from the last one (uneven spacing is weighed by the real step), whatever
the target. It does not extrapolate. Without ``halflife:`` the backtest chooses it (a grid of
fractions of the window's reach)."""

from __future__ import annotations

import math

import torch

from relex_merge.core.fits import DirectFamily, Shape

__all__ = ["FAMILY", "EMA"]


class EMA(DirectFamily):
    """sum_k 2^(−(s_T − s_k)/halflife) theta_k, normalised."""

    name = "ema"
    formula = "θ = Σ_k 2^(−(s_T − s_k)/halflife)·θ_k / Σ_k 2^(−(s_T − s_k)/halflife)"
    shape = Shape(
        "halflife",
        "steps over which a checkpoint's weight halves",
        low=0.0,
        high=math.inf,
        grid=tuple(2 ** (k / 2) for k in range(-12, 1)),
        grid_in_window_spans=True,
    )
    complexity = 3

    def window_weights(self, steps, targets, shape):
        decay = torch.exp2(-(steps[-1] - steps) / shape)
        row = decay / decay.sum()
        return row.expand(targets.numel(), -1).clone()


FAMILY = EMA()

"""``fit: expo`` -- two-point extrapolation (ExPO; RLVR-Linearity's extrapolation of two
checkpoints): continue the straight line through the window's first and last checkpoints,
theta_T + alpha·h·(theta_T − theta_1), with h the target's horizon in window spans. alpha = 1 is
the line itself; smaller alpha takes part of its step. Without ``alpha:`` the backtest chooses it."""

from __future__ import annotations

import math

import torch

from relex_merge.core.fits import DirectFamily, Shape

__all__ = ["FAMILY", "Expo"]


class Expo(DirectFamily):
    """theta_T + alpha·h·(theta_T − theta_1): no projection, the raw end points of the window."""

    name = "expo"
    formula = "θ = θ_T + alpha·h·(θ_T − θ_1), h = (s − s_T)/(s_T − s_1)"
    shape = Shape(
        "alpha",
        "share of the two-point line's step",
        low=0.0,
        high=4.0,
        grid=tuple(2 ** (k / 4) for k in range(-20, 3)),
    )  # 0.03 .. 1.41
    complexity = 3

    def min_points(self, shape):
        return 2

    def window_weights(self, steps, targets, shape):
        span = float(steps[-1] - steps[0])
        h = (targets - steps[-1]) / span if span > 0 else torch.full_like(targets, math.nan)
        weights = torch.zeros(targets.numel(), steps.numel(), dtype=torch.float64)
        weights[:, -1] = 1.0 + shape * h
        weights[:, 0] -= shape * h
        return weights


FAMILY = Expo()

"""How well the window fits the rank-r, linear-in-step picture, over every tensor: the numbers the
CLI's summary table and the model card show."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Distribution", "FitSummary", "summarize"]


@dataclass(frozen=True)
class Distribution:
    """A per-tensor statistic over the fitted tensors (a row of the card's table)."""

    weighted_mean: float  # weighted by tensor size: what most of the parameters see
    median: float
    p05: float  # 5th percentile
    minimum: float
    worst_tensor: str  # the tensor with the minimum


@dataclass(frozen=True)
class FitSummary:
    """How well the window fits the picture, over all tensors: the CLI's summary and the card."""

    extrapolated: int  # tensors fitted (float, moved in the window)
    zero_delta: int  # float tensors unchanged in the window
    copied: int  # non-float tensors taken from the base
    nonfinite: tuple[str, ...]  # NaN/Inf in the window (--allow-nonfinite): taken from the base
    explained_variance_1: Distribution | None  # None: no tensor was fitted
    explained_variance_r: Distribution | None
    linear_r2: Distribution | None


def _distribution(pairs: list[tuple[str, int, float]]) -> Distribution | None:
    pairs = [p for p in pairs if not math.isnan(p[2])]
    if not pairs:
        return None
    values = sorted(v for _, _, v in pairs)
    total = sum(n for _, n, _ in pairs)
    worst = min(pairs, key=lambda p: p[2])
    return Distribution(
        weighted_mean=sum(n * v for _, n, v in pairs) / total,
        median=values[len(values) // 2],
        p05=values[int(0.05 * (len(values) - 1))],
        minimum=worst[2],
        worst_tensor=worst[0],
    )


def summarize(reports: Sequence) -> FitSummary:
    """Count the tensors by kind and summarise the diagnostics of the fitted ones (``reports``: the
    engine's TensorReports, or anything with their name, numel, diagnostics, zero_delta, nonfinite)."""
    fitted = [r for r in reports if r.diagnostics is not None and not r.zero_delta]
    return FitSummary(
        extrapolated=len(fitted),
        zero_delta=sum(1 for r in reports if r.zero_delta),
        copied=sum(1 for r in reports if r.diagnostics is None and not r.nonfinite),
        nonfinite=tuple(r.name for r in reports if r.nonfinite),
        explained_variance_1=_distribution([(r.name, r.numel, r.diagnostics.explained_variance_1) for r in fitted]),
        explained_variance_r=_distribution([(r.name, r.numel, r.diagnostics.explained_variance_r) for r in fitted]),
        linear_r2=_distribution([(r.name, r.numel, r.diagnostics.linear_r2) for r in fitted]),
    )

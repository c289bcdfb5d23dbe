"""Backtests inside the window, computed from the Gram matrices alone: how far each candidate fit
holds, and whether it beats stopping (core.verdict turns this into a verdict per target).

Fit on the first K checkpoints of the window and predict each later one. The prediction is
sum_k w_k delta_k, so its error and cosine against the held-back delta_j need only inner
products of deltas, which G holds:

    ||pred||^2 = w^T G_FF w,   <pred, delta_j> = w^T G_Fj,   ||delta_j||^2 = G_jj

Summed over tensors these give the whole model's relative error, cosine and norm ratio as a
function of the horizon, in multiples of the fit span (s_K - s_1). "Stopping" (predicting the
last fitted checkpoint, w = e_K) is scored the same way: a prediction that does not beat it
is worse than not extrapolating at all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from relex_merge.core import fits
from relex_merge.core.kernels import single_threaded
from relex_merge.core.relex import (
    FitSpec,
    RelexSpec,
    direct_weights,
    linear_map,
    predict_coefficients,
    top_components,
    window_indices,
)
from relex_merge.core.rule import DEFAULT_TOLERANCE

__all__ = [
    "STOP",
    "DEFAULT_TOLERANCE",
    "Holdout",
    "HoldoutSums",
    "Backtest",
    "horizon",
    "window_steps",
    "auto_candidates",
    "hint_candidates",
    "shape_candidates",
    "fit_counts",
    "holdouts",
]

log = logging.getLogger(__name__)

STOP = "stop"  # the candidate that predicts the last fitted checkpoint
TIE = 0.01  # errors within 1% of the best count as ties: the simpler family wins
TIE_ABSOLUTE = 1e-4  # ... and so do differences below 0.01 percentage points


def window_steps(steps: Sequence[int], spec: RelexSpec) -> list[int]:
    """The steps of the checkpoints the fit uses (the last ``window`` of them)."""
    return [steps[k] for k in window_indices(len(steps), spec.window)]


def horizon(used_steps: Sequence[int], target: float) -> float:
    """How far past the window a target lies, in multiples of the window's span: (s* - s_T) /
    (s_T - s_1). The one definition the backtest, verdict, analyze and the card share."""
    span = used_steps[-1] - used_steps[0]
    return (target - used_steps[-1]) / span if span else math.nan


@dataclass(frozen=True)
class Holdout:
    """One backtest point: fit on the first ``fit_count`` checkpoints, predict one held back."""

    fit_count: int  # K: checkpoints the fit used (the first K of the window)
    step: int  # step of the held-back checkpoint
    horizon: float  # (step - s_K) / (s_K - s_1)


@dataclass
class HoldoutSums:
    """Inner products summed over tensors (or for one tensor)."""

    err2: float = 0.0  # ||pred - true||^2
    true2: float = 0.0  # ||true||^2 (the held-back delta)
    pred2: float = 0.0  # ||pred||^2
    dot: float = 0.0  # <pred, true>

    def add(self, other: HoldoutSums) -> None:
        """Accumulate another tensor's (or group's) sums into these."""
        self.err2 += other.err2
        self.true2 += other.true2
        self.pred2 += other.pred2
        self.dot += other.dot

    @property
    def relative_error(self) -> float:
        """||pred - true|| / ||true|| (NaN when nothing moved)."""
        return math.sqrt(self.err2 / self.true2) if self.true2 > 0 else math.nan

    @property
    def cosine(self) -> float:
        """Cosine between the predicted and the true displacement (NaN when either is zero)."""
        denom = math.sqrt(self.pred2 * self.true2)
        return self.dot / denom if denom > 0 else math.nan

    @property
    def norm_ratio(self) -> float:
        """||pred|| / ||true||: above 1 the prediction overshoots."""
        return math.sqrt(self.pred2 / self.true2) if self.true2 > 0 else math.nan


def fit_counts(n_checkpoints: int, min_points: int) -> list[int]:
    """Prefix lengths K to fit on: enough points for every candidate, one checkpoint held back."""
    smallest = max(2, min_points)
    candidates = {math.ceil(n_checkpoints * f) for f in (0.25, 1 / 3, 0.5, 2 / 3)} | {smallest}
    return sorted(k for k in candidates if smallest <= k <= n_checkpoints - 1)


def holdouts(steps: Sequence[int], min_points: int) -> list[Holdout]:
    """Every backtest point of a window: for each fit count K (``fit_counts``), each later
    checkpoint held back, with its horizon in multiples of the first K's span."""
    out = []
    for k in fit_counts(len(steps), min_points):
        span = steps[k - 1] - steps[0]
        for j in range(k, len(steps)):
            out.append(Holdout(k, steps[j], (steps[j] - steps[k - 1]) / span))
    return out


def auto_candidates(spec: RelexSpec, steps: Sequence[int]) -> list[FitSpec]:
    """Every family in `fit: auto`, each shape on its grid (in registry order: simplest first)."""
    origin = spec.fit.origin_step
    used = window_steps(steps, spec)
    out = []
    for fam in fits.families():
        if not fam.in_auto:
            continue
        shapes = fam.shape.candidates(used, origin) if fam.shape is not None else [None]
        out += [FitSpec(fam.name, shape, origin) for shape in shapes]
    return out


def hint_candidates(spec: RelexSpec, steps: Sequence[int]) -> list[FitSpec]:
    """What a merge with a fixed fit also scores, to name a better family when its own fails:
    the auto candidates that are linear in their coefficients (cheap to backtest)."""
    return [c for c in auto_candidates(spec, steps) if isinstance(c.curve_family, fits.BasisFamily)]


def shape_candidates(fit: FitSpec, steps: Sequence[int], spec: RelexSpec) -> list[FitSpec]:
    """A family without its shape: the shape grid; anything else: itself."""
    if fit.family == fits.AUTO:
        return auto_candidates(spec, steps)
    if fit.resolved is not None:
        return [fit.resolved]
    shape = fit.curve_family.shape
    return [replace(fit, shape=s) for s in shape.candidates(window_steps(steps, spec), fit.origin_step)]


@dataclass
class Backtest:
    """Whole-model backtest sums for candidate fits (and stopping), added tensor by tensor."""

    steps: list[int]  # the window the fit uses
    spec: RelexSpec
    candidates: list[FitSpec]  # the fits scored (stopping is always scored too)
    min_points: int = field(init=False)  # checkpoints the smallest fit count holds
    points: list[Holdout] = field(init=False)  # every (fit count, held-back checkpoint) pair
    _totals: dict[FitSpec | str, torch.Tensor] = field(init=False, repr=False)  # per point: err2, true2, pred2, dot
    _cache: dict = field(init=False, repr=False)

    def __post_init__(self):
        # the same fit counts whichever candidates are scored, so verdicts agree between a plain
        # merge, `fit: auto` and analyze: enough points for every family `auto` knows
        self.min_points = max([self.spec.rank, FitSpec(fits.AUTO).min_points] + [c.min_points for c in self.candidates])
        self.points = holdouts(self.steps, self.min_points)
        self._totals = {key: torch.zeros(len(self.points), 4, dtype=torch.float64) for key in [*self.candidates, STOP]}
        self._cache = {}

    @classmethod
    def for_fits(cls, steps: Sequence[int], spec: RelexSpec, wanted: Iterable[FitSpec]) -> Backtest:
        """A backtest over the candidates the given fits need (auto: every family and shape)."""
        candidates: list[FitSpec] = []
        for fit in wanted:
            candidates += [c for c in shape_candidates(fit, steps, spec) if c not in candidates]
        return cls(window_steps(steps, spec), spec, candidates)

    @single_threaded
    def add(self, gram: torch.Tensor) -> None:
        """One tensor's Gram matrix (over all the checkpoints; the window is taken here)."""
        if not bool(torch.isfinite(gram).all()):
            return
        idx = list(window_indices(gram.shape[0], self.spec.window))
        g = gram.to(torch.float64)[idx][:, idx]
        offset = 0
        for k in sorted({p.fit_count for p in self.points}):
            held = len(self.steps) - k
            fitted, ahead = g[:k, :k], g[k:, :k]  # ahead[j, :] = <delta_{k+j}, delta_i>, i < k
            true2 = torch.diagonal(g)[k:]
            sigma, u = top_components(fitted, min(self.spec.rank, k))
            keys, maps, direct_keys, direct, others = self._maps(k)
            stop = torch.zeros(1, held, k, dtype=torch.float64)
            stop[0, :, k - 1] = 1.0  # the last fitted checkpoint itself, not its rank-r projection
            weights = [stop, maps @ (u @ u.T), direct]  # linear families: W = P U U^T, all at once
            weights += [self._weights(key, k, sigma, u).unsqueeze(0) for key in others]
            w = torch.cat(weights)  # candidates x held x k
            pred2 = ((w @ fitted) * w).sum(2)
            dot = (w * ahead).sum(2)
            err2 = (pred2 - 2 * dot + true2).clamp_min(0.0)
            rows = torch.stack([err2, true2.expand_as(err2), pred2, dot], 2)
            for key, row in zip([STOP, *keys, *direct_keys, *others], rows):
                self._totals[key][offset : offset + held] += row
            offset += held

    def _maps(self, k: int) -> tuple[list, torch.Tensor, list, torch.Tensor, list]:
        """For fit count k: the candidate fits whose prediction is a fixed linear map of the
        coefficients and their maps stacked; the fits that weigh the checkpoints directly and
        their weights stacked; and the other fits (stopping is not among any)."""
        if k not in self._cache:
            keys, maps, direct_keys, direct, others = [], [], [], [], []
            held = len(self.steps) - k
            for key in self.candidates:
                spec = replace(self.spec, fit=key, window=None, scale=1.0, mode="extrapolate")
                w = direct_weights(self.steps[:k], self.steps[k:], spec)
                m = linear_map(self.steps[:k], self.steps[k:], spec) if w is None else None
                if w is not None:
                    direct_keys.append(key)
                    direct.append(w)
                elif m is None:
                    others.append(key)
                else:
                    keys.append(key)
                    maps.append(m)
            empty = torch.zeros(0, held, k, dtype=torch.float64)
            self._cache[k] = (
                keys,
                torch.stack(maps) if maps else empty,
                direct_keys,
                torch.stack(direct) if direct else empty,
                others,
            )
        return self._cache[k]

    def _weights(self, key, k: int, sigma: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        held = len(self.steps) - k
        if sigma.numel() == 0:
            return torch.zeros(held, k, dtype=torch.float64)
        spec = replace(self.spec, fit=key, window=None, scale=1.0, mode="extrapolate")
        predicted = predict_coefficients(self.steps[:k], sigma * u, self.steps[k:], spec)
        return (predicted / sigma) @ u.T

    # ---- reading the sums ---------------------------------------------------------------

    def order(self) -> list[int]:
        """Point indices sorted by horizon, then fit count."""
        return sorted(range(len(self.points)), key=lambda i: (self.points[i].horizon, self.points[i].fit_count))

    def curve(self, key) -> list[tuple[Holdout, HoldoutSums]]:
        """(point, sums) sorted by horizon, then fit count."""
        totals = self._totals[key]
        return [(self.points[i], HoldoutSums(*map(float, totals[i]))) for i in self.order()]

    @property
    def tested_horizon(self) -> float:
        """The longest horizon among the points (0 when the window is too short to backtest)."""
        return max((p.horizon for p in self.points), default=0.0)

    def matched(self, target_horizon: float) -> list[int]:
        """Indices of the points near the target's horizon: those within a factor of 2 of it, or
        of the longest horizon tested when the target lies beyond (the window cannot test
        further). A target inside the window (horizon <= 0) is matched with each fit count's
        shortest horizon."""
        if not self.points:
            return []
        if target_horizon <= 0:
            by_k: dict[int, int] = {}
            for i in self.order():
                by_k.setdefault(self.points[i].fit_count, i)
            return sorted(by_k.values())
        # clamped into the tested range: a target nearer than the shortest horizon tested is
        # judged there, one farther than the longest at the longest
        shortest = min(p.horizon for p in self.points)
        h = min(max(target_horizon, shortest), self.tested_horizon)
        return [i for i, p in enumerate(self.points) if h / 2 <= p.horizon <= 2 * h]

    def error(self, key, ids: Sequence[int], scale: float = 1.0) -> float:
        """Whole-model relative error pooled over the given points, of the prediction times
        ``scale`` (the config's scale multiplies the predicted displacement: the output is
        judged, not the fit alone)."""
        if not ids:
            return math.nan
        err2, true2, pred2, dot = (float(x) for x in self._totals[key][list(ids)].sum(0))
        if scale != 1.0:  # ||s p - t||^2 from the same sums
            err2 = max(scale * scale * pred2 - 2 * scale * dot + true2, 0.0)
        return math.sqrt(err2 / true2) if true2 > 0 else math.nan

    def supported_horizon(self, key, tolerance: float = DEFAULT_TOLERANCE, scale: float = 1.0) -> float | None:
        """The longest horizon up to which every point held (error <= tolerance). None when
        even the shortest failed. (Whether the fit beats stopping is judged at each target's
        own horizon, where it matters: one step ahead, stopping is nearly always closer.)"""
        supported = None
        for i in self.order():
            if not self.error(key, [i], scale) <= tolerance:
                break
            supported = self.points[i].horizon
        return supported

    def best(self, target_horizon: float, keys: Sequence[FitSpec] | None = None, scale: float = 1.0) -> FitSpec:
        """The candidate with the lowest error near the horizon; near-ties go to the simpler."""
        return self.best_over(self.matched(target_horizon), keys, scale)

    def best_over(self, ids: Sequence[int], keys: Sequence[FitSpec] | None = None, scale: float = 1.0) -> FitSpec:
        """The candidate with the lowest error pooled over the points ``ids``: inside each family
        the strict minimum over its shapes; across families, errors within TIE of the lowest count
        as ties, won by the family listed first (simplest first)."""
        keys = list(keys or self.candidates)
        errors = {key: self.error(key, ids, scale) for key in keys}
        best: dict[str, FitSpec] = {}  # family -> its lowest-error shape, families in the order given
        for key in keys:
            if math.isnan(errors[key]):
                continue
            family = key.family if isinstance(key, FitSpec) else str(key)
            if family not in best or errors[key] < errors[best[family]]:
                best[family] = key
        if not best:
            return keys[0]
        lowest = min(errors[key] for key in best.values())
        return next(key for key in best.values() if errors[key] <= lowest * (1 + TIE) + TIE_ABSOLUTE)

    def on_grid_edge(self, fit: FitSpec) -> bool:
        """Whether ``fit``'s shape is the first or last value its family's grid offered here (the
        best shape may lie beyond the grid)."""
        shapes = sorted({c.shape for c in self.candidates if c.family == fit.family and c.shape is not None})
        return len(shapes) > 2 and fit.shape in (shapes[0], shapes[-1])

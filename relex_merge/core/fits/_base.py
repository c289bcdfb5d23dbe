"""What a fit family is: a curve c(s) fitted to one direction's coefficients against the step.

A family maps (window steps, coefficients, target steps) to predicted coefficients. Whatever the
curve, the prediction is a number per direction, so the output stays a weight vector over the
window (see fit.relex_weights): one Gram pass serves every family, shape, target and scale.

Most families are linear in their coefficients once a shape parameter (p, tau, degree) is fixed:
an ordinary least squares on a transformed step. Their prediction is then a fixed linear map of
the observed coefficients (``BasisFamily.predictor``), the same for every tensor, which makes
backtests and autoregressive re-fitting cheap. Shape parameters are never fitted per tensor
(a 20-point window would overfit them): they come from the config or are chosen for the whole
model by the backtest over ``Shape.grid``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Shape", "Curve", "FitFamily", "BasisFamily", "DirectFamily", "r_squared"]


@dataclass(frozen=True)
class Shape:
    """A family's shape parameter, named by its config key under ``parameters:``."""

    key: str  # "p", "tau", "degree"
    meaning: str  # for messages and the card
    low: float  # allowed values: between low and high (config validation)
    high: float = math.inf
    low_inclusive: bool = False
    high_inclusive: bool = True
    integer: bool = False  # only whole numbers (degree)
    default: float | None = None  # None: chosen for the whole model by the backtest
    grid: tuple[float, ...] = ()  # candidates tried by the backtest
    grid_in_window_spans: bool = False  # grid values are multiples of the window's reach (s_T - s0)

    def problem(self, value: float) -> str | None:
        """Why ``value`` is not allowed, or None."""
        if not math.isfinite(value):  # inf passes a range with no upper bound, NaN every comparison
            return f"expected a finite number, got {value}"
        if self.integer and float(value) != int(value):
            return f"expected an integer, got {value}"
        low_ok = value >= self.low if self.low_inclusive else value > self.low
        high_ok = value <= self.high if self.high_inclusive else value < self.high
        if low_ok and high_ok:
            return None
        lo = "[" if self.low_inclusive else "("
        hi = "]" if self.high_inclusive and math.isfinite(self.high) else ")"
        high = f"{self.high:g}" if math.isfinite(self.high) else "inf"
        return f"expected a value in {lo}{self.low:g}, {high}{hi}, got {value:g}"

    def candidates(self, steps: Sequence[float], origin: float) -> list[float]:
        """The grid in the parameter's own units (steps for tau)."""
        if not self.grid_in_window_spans:
            return list(self.grid)
        reach = max(float(steps[-1]) - origin, 1.0)
        return [g * reach for g in self.grid]


class Curve:
    """A fitted curve for every column (direction) of the coefficients: ``curve(x)`` gives
    ``len(x) x r`` values; ``r2`` is each column's coefficient of determination in the window."""

    def __init__(self, evaluate: Callable[[torch.Tensor], torch.Tensor], r2: torch.Tensor):
        self._evaluate = evaluate
        self.r2 = r2

    def __call__(self, x: torch.Tensor | Sequence[float]) -> torch.Tensor:
        return self._evaluate(torch.as_tensor(x, dtype=torch.float64).reshape(-1))


def r_squared(values: torch.Tensor, fitted: torch.Tensor) -> torch.Tensor:
    """Each column's coefficient of determination (1 for a constant column)."""
    residual = ((values - fitted) ** 2).sum(0)
    total = ((values - values.mean(0)) ** 2).sum(0)
    return torch.where(total > 0, 1.0 - residual / total.clamp_min(1e-300), torch.ones_like(total))


class FitFamily(ABC):
    """One curve family. Subclasses set the class attributes and implement ``fit``."""

    name: str
    formula: str  # one line for the card, e.g. "c = a + b·ln(s − s0 + tau)"
    shape: Shape | None = None
    complexity: int = 2  # ties in `fit: auto` go to the lower value (then to registry order)
    in_auto: bool = True  # scored by `fit: auto`

    def coefficients(self, shape: float | None) -> int:
        """Linear coefficients fitted per direction (the fewest points needed)."""
        return 2

    def min_points(self, shape: float | None) -> int:
        """Checkpoints a fit needs at least (plan checks the window; backtests fit on no fewer)."""
        return self.coefficients(shape)

    def too_few_points(self, shape: float | None, need: int, have: int) -> str:
        """The one-line error when the window holds fewer checkpoints than the fit needs."""
        return f"parameters.fit: {self.name} needs at least {need} checkpoints in the window, got {have}"

    def describe(self, shape: float | None) -> str:
        """The family with its shape, as the card and the verdict print it: ``log (tau=12)``."""
        if self.shape is None or shape is None:
            return self.name
        return f"{self.name} ({self.shape.key}={shape:.4g})"

    @abstractmethod
    def fit(self, steps: torch.Tensor, values: torch.Tensor, shape: float | None, origin: float) -> Curve:
        """Fit every column of ``values`` (T x r, float64) against ``steps`` (T, float64)."""

    def predictor(
        self, steps: torch.Tensor, targets: torch.Tensor, shape: float | None, origin: float
    ) -> torch.Tensor | None:
        """P (n x T) with prediction = P @ values for any values, or None when the family is not
        linear in the observed coefficients."""
        return None


class BasisFamily(FitFamily):
    """A family linear in its coefficients given the shape: c(s) = sum_i beta_i * basis_i(s)."""

    has_intercept: bool = True  # first basis column is the constant 1

    @abstractmethod
    def basis(self, x: torch.Tensor, shape: float | None, origin: float, frame: tuple[float, float]) -> torch.Tensor:
        """The design matrix (len(x) x coefficients) at steps ``x``. ``frame`` is the (centre,
        spread) of the fitted steps, for families that condition their basis with it."""

    def predictor(self, steps, targets, shape, origin):
        """The least-squares map from the values at ``steps`` to the curve at ``targets``, on
        the basis centred and scaled column by column (the same fit, better conditioned)."""
        centre = float(steps.mean())
        frame = (centre, float((steps - centre).abs().max()) or 1.0)
        fit_design = self.basis(steps, shape, origin, frame)
        target_design = self.basis(targets, shape, origin, frame)
        if self.has_intercept and fit_design.shape[1] > 1:
            # the same function space, better conditioned: centre the non-constant columns
            mean = fit_design[:, 1:].mean(0)
            fit_design = torch.cat([fit_design[:, :1], fit_design[:, 1:] - mean], 1)
            target_design = torch.cat([target_design[:, :1], target_design[:, 1:] - mean], 1)
        scale = fit_design.abs().amax(0).clamp_min(1e-300)
        return (target_design / scale) @ torch.linalg.pinv(fit_design / scale)

    def fit(self, steps, values, shape, origin):
        """The least-squares curve through ``values``, evaluated through ``predictor``."""
        hat = self.predictor(steps, steps, shape, origin)
        r2 = r_squared(values, hat @ values)
        return Curve(lambda x: self.predictor(steps, x, shape, origin) @ values, r2)


class DirectFamily(FitFamily):
    """A prediction that is a fixed weight vector over the window's own checkpoints, with no
    rank-r projection and no coefficient curve: checkpoint averaging (LAWA, EMA) or two-point
    extrapolation (ExPO). Its weights depend on the steps only, so like a ``BasisFamily`` it costs
    nothing to backtest, and ``fit: auto``, the verdict and the engine treat it like any family.
    Extrapolate mode only (no autoregressive re-fitting, no fit_reconstruct)."""

    @abstractmethod
    def window_weights(self, steps: torch.Tensor, targets: torch.Tensor, shape: float | None) -> torch.Tensor:
        """W (n_targets x T, float64): the prediction at each target is sum_k W[j, k] * delta_k,
        with delta_k the displacement of the checkpoint at ``steps[k]`` from the base."""

    def coefficients(self, shape):
        return 1

    def fit(self, steps, values, shape, origin):
        raise TypeError(f"fit: {self.name} weighs the window's checkpoints directly: it fits no coefficient curve")

"""The RELEX math, pure torch and free of IO.

Per tensor the engine only ever needs the T x T Gram matrix of the window's deltas
(accumulated in float64) and the checkpoints' step values. From them this module finds
the top-r directions, fits their coefficients against the step with a fit family
(relex_merge.core.fits) and returns the weights ``w`` such that the prediction is
``theta0 + sum_k w_k * delta_k``:

    G = U diag(sigma^2) U^T        c_{k,i} = sigma_i U_{k,i}      (coefficient of checkpoint k)
    c_hat_i = curve_i(target)      w = sum_i (c_hat_i / sigma_i) U_i

Whatever the family, the prediction is a number per direction, so every family, target and
scale is only another w over the same Gram matrix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from relex_merge.core import fits
from relex_merge.core.kernels import single_threaded

__all__ = [
    "FitSpec",
    "RelexSpec",
    "spec_from_parameters",
    "TensorDiagnostics",
    "top_components",
    "predict_coefficients",
    "linear_map",
    "relex_weights",
    "direct_weights",
    "diagnostics",
    "window_indices",
]

Mode = Literal["extrapolate", "reconstruct", "fit_reconstruct"]

# Components whose singular value is this small relative to the largest carry only noise.
RELATIVE_SIGMA_CUTOFF = 1e-6


@dataclass(frozen=True)
class FitSpec:
    """How coefficients are regressed on the step value: a registered family (or ``auto``,
    resolved for the whole model by the backtest) and its shape parameter."""

    family: str = "linear"  # a registered family's name, or "auto"
    shape: float | None = None  # degree, p or tau; None: the family's default, or chosen by the backtest
    origin_step: float = 0.0  # s0: the base model's step

    def __post_init__(self):
        if self.family != fits.AUTO:
            fits.family(self.family)  # unknown names fail here, not deep inside a merge

    @property
    def curve_family(self) -> fits.FitFamily:
        """The registered family (KeyError for ``auto``, which is not one)."""
        return fits.family(self.family)

    @property
    def resolved(self) -> FitSpec | None:
        """This spec with its shape filled in from the family's default, or None when the
        backtest must choose (``auto``, or a shape with no default and none given)."""
        if self.family == fits.AUTO:
            return None
        shape = self.curve_family.shape
        if shape is None:
            return replace(self, shape=None) if self.shape is not None else self
        if self.shape is not None:
            return self
        return replace(self, shape=shape.default) if shape.default is not None else None

    @property
    def min_points(self) -> int:
        """Checkpoints the fit needs at least (for ``auto``: what every family in it needs)."""
        if self.family == fits.AUTO:
            return max(f.min_points(f.shape.default if f.shape else None) for f in fits.families() if f.in_auto)
        shape = (
            self.shape
            if self.shape is not None
            else (self.curve_family.shape.default if self.curve_family.shape else None)
        )
        return self.curve_family.min_points(shape)

    def describe(self) -> str:
        """The fit as messages, the verdict and the card name it: ``log (tau=12)``, ``auto``."""
        if self.family == fits.AUTO:
            return fits.AUTO
        return self.curve_family.describe(self.shape)


@dataclass(frozen=True)
class RelexSpec:
    """Everything that turns a Gram matrix into output weights."""

    rank: int = 1  # directions (top singular vectors) fitted per tensor
    fit: FitSpec = FitSpec()
    window: int | None = None  # use only the last `window` checkpoints
    scale: float = 1.0  # multiplies the predicted displacement from the base
    mode: Mode = "extrapolate"
    refit_every: int | None = None  # autoregressive: re-fit after every F predicted checkpoints
    refit_window: int | None = None  # ... on the last W (observed or predicted); None: all of the window


@dataclass(frozen=True)
class TensorDiagnostics:
    """Per-tensor quality of the low-rank, linear-in-step picture."""

    explained_variance_1: float  # lambda_1 / sum(lambda), uncentred
    explained_variance_r: float  # top-r share
    linear_r2: float  # R^2 of the rank-1 coefficient against the step (linear fit)
    singular_values: tuple[float, ...]  # of the window's deltas, largest first (noise dropped)


def spec_from_parameters(
    *,
    rank: int = 1,
    fit: str = "linear",
    window: int | None = None,
    scale: float = 1.0,
    mode: Mode = "extrapolate",
    refit_every: int | None = None,
    refit_window: int | None = None,
    base_step: int | float = 0,
    **shapes: float | None,
) -> RelexSpec:
    """The one place config parameters (YAML, or mergekit's) become a RelexSpec: the family's
    shape comes from its own key (degree, p, tau: whatever the families declare)."""
    unknown = sorted(set(shapes) - set(fits.shape_keys()))
    if unknown:
        raise TypeError(f"unknown parameter {unknown[0]!r} (shape parameters: {', '.join(fits.shape_keys())})")
    given = {key: shapes.get(key) for key in fits.shape_keys()}
    for key, value in {**given, "scale": scale}.items():  # mergekit's parameters skip our config schema
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{key}: expected a finite number, got {value}")
    shape = None
    if fit != fits.AUTO:
        family_shape = fits.family(fit).shape
        shape = given.get(family_shape.key) if family_shape is not None else None
    return RelexSpec(
        rank=rank,
        fit=FitSpec(fit, None if shape is None else float(shape), float(base_step)),
        window=window,
        scale=scale,
        mode=mode,
        refit_every=refit_every,
        refit_window=refit_window,
    )


def top_components(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``rank`` singular values and left singular vectors of M from G = M M^T.

    Returns ``(sigma[r'], U[T, r'])`` with r' <= rank: components with
    sigma <= RELATIVE_SIGMA_CUTOFF * sigma_1 are dropped, all of them when G is zero.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.to(torch.float64))
    eigenvalues = eigenvalues.flip(0).clamp_min(0.0)
    eigenvectors = eigenvectors.flip(1)
    sigma = eigenvalues.sqrt()
    if sigma.numel() == 0 or sigma[0] <= 0:
        return sigma[:0], eigenvectors[:, :0]
    keep = min(rank, int((sigma > RELATIVE_SIGMA_CUTOFF * sigma[0]).sum()))
    return sigma[:keep], eigenvectors[:, :keep]


def window_indices(n_checkpoints: int, window: int | None) -> range:
    """Positions of the checkpoints the fit uses: the last ``window`` of them (all for None)."""
    w = n_checkpoints if window is None else window
    return range(n_checkpoints - w, n_checkpoints)


def _autoregress(
    steps: torch.Tensor, values: torch.Tensor, targets: torch.Tensor, fit: FitSpec, every: int, keep: int | None
) -> torch.Tensor:
    """The reference scripts' autoregressive re-fitting: fit on the last ``keep`` points, predict
    the next ``every`` checkpoints (spaced like the window: its median gap), append them, re-fit.
    A target between two predicted checkpoints is read off the fit in force there."""
    family = fit.curve_family
    xs, vs = steps.clone(), values.clone()
    gap = float(torch.median(steps[1:] - steps[:-1])) if steps.numel() > 1 else 1.0
    out = torch.empty(targets.numel(), values.shape[1], dtype=torch.float64)
    pending = sorted(range(targets.numel()), key=lambda i: float(targets[i]))
    keep = keep or steps.numel()  # the reference's default: as many points as the window
    while pending:
        curve = family.fit(xs[-keep:], vs[-keep:], fit.shape, fit.origin_step)
        last = float(xs[-1])
        reach = last + every * gap
        while pending and float(targets[pending[0]]) <= reach + 1e-9:
            i = pending.pop(0)
            out[i] = curve(targets[i : i + 1])[0]
        ahead = last + gap * torch.arange(1, every + 1, dtype=torch.float64)
        xs, vs = torch.cat([xs, ahead]), torch.cat([vs, curve(ahead)])
    return out


@functools.lru_cache(maxsize=256)
def _linear_map(
    steps: tuple[float, ...], targets: tuple[float, ...], fit: FitSpec, every: int | None, keep: int | None
) -> torch.Tensor | None:
    """P with predictions = P @ coefficients for families linear in the observed coefficients:
    it depends only on the steps, so one P serves every tensor of the model."""
    family = fit.curve_family
    x = torch.tensor(steps, dtype=torch.float64)
    t = torch.tensor(targets, dtype=torch.float64)
    if every is None:
        return family.predictor(x, t, fit.shape, fit.origin_step)
    if family.predictor(x, x, fit.shape, fit.origin_step) is None:
        return None
    # each re-fit is linear, so the whole recursion is: run it on the identity
    return _autoregress(x, torch.eye(len(steps), dtype=torch.float64), t, fit, every, keep)


def _resolved(spec: RelexSpec) -> tuple[FitSpec, int | None, int | None]:
    fit = spec.fit.resolved
    if fit is None:
        raise ValueError(f"fit {spec.fit.describe()} is not resolved: the backtest chooses it (fit: auto)")
    every = spec.refit_every if spec.mode == "extrapolate" else None
    return fit, every, spec.refit_window if every is not None else None


def linear_map(steps: Sequence[float], targets: Sequence[float], spec: RelexSpec) -> torch.Tensor | None:
    """P (n_targets x T) with predicted coefficients = P @ observed coefficients, for every tensor
    and direction; None when the fit is not linear in the coefficients (sine). Do not modify it."""
    fit, every, keep = _resolved(spec)
    return _linear_map(tuple(float(s) for s in steps), tuple(float(t) for t in targets), fit, every, keep)


def predict_coefficients(
    steps: Sequence[float], coefficients: torch.Tensor, targets: Sequence[float], spec: RelexSpec
) -> torch.Tensor:
    """Predicted coefficients (n_targets x r) of every direction at the target steps."""
    fit, every, keep = _resolved(spec)
    key_steps, key_targets = tuple(float(s) for s in steps), tuple(float(t) for t in targets)
    linear = _linear_map(key_steps, key_targets, fit, every, keep)
    values = coefficients.to(torch.float64)
    if linear is not None:
        return linear @ values
    x = torch.tensor(key_steps, dtype=torch.float64)
    t = torch.tensor(key_targets, dtype=torch.float64)
    if every is not None:
        return _autoregress(x, values, t, fit, every, keep)
    return fit.curve_family.fit(x, values, fit.shape, fit.origin_step)(t)


@single_threaded
def relex_weights(
    gram: torch.Tensor, steps: Sequence[float], targets: Sequence[float], spec: RelexSpec
) -> torch.Tensor:
    """Weights W (n_targets x T, float64): output_j = theta0 + sum_k W[j, k] * delta_k.

    extrapolate: the fitted curve at the target steps; fit_reconstruct: the same curve at
    observed steps (the reference scripts' oracle check); reconstruct: observed checkpoints
    projected onto the rank-r subspace. The scale multiplies the whole predicted displacement
    (this is the only place it is applied).
    """
    n_ckpt = gram.shape[0]
    idx = list(window_indices(n_ckpt, spec.window))
    sub_gram = gram.to(torch.float64)[idx][:, idx]
    sub_steps = [float(steps[k]) for k in idx]
    weights = torch.zeros(len(targets), n_ckpt, dtype=torch.float64)
    direct = direct_weights(sub_steps, targets, spec)
    if direct is not None:  # a fixed weight vector over the window: no projection
        weights[:, idx] = direct * spec.scale
        return weights
    sigma, u = top_components(sub_gram, spec.rank)
    if sigma.numel() == 0:
        return weights  # all deltas zero: the output is the base tensor
    if spec.mode == "reconstruct":
        rows = [sub_steps.index(float(t)) for t in targets]
        sub_weights = u[rows] @ u.T
    else:
        predicted = predict_coefficients(sub_steps, sigma * u, targets, spec)  # c_{k,i} = sigma_i u_{k,i}
        sub_weights = (predicted / sigma) @ u.T
    weights[:, idx] = sub_weights * spec.scale
    return weights


def direct_weights(steps: Sequence[float], targets: Sequence[float], spec: RelexSpec) -> torch.Tensor | None:
    """W (n_targets x T) of a family that weighs the window's checkpoints directly (average,
    ema, expo), in extrapolate mode; None for every other family and mode."""
    if spec.mode != "extrapolate" or spec.fit.family == fits.AUTO:
        return None
    family = spec.fit.curve_family
    if not isinstance(family, fits.DirectFamily):
        return None
    fit, _, _ = _resolved(spec)
    x = torch.tensor([float(s) for s in steps], dtype=torch.float64)
    t = torch.tensor([float(s) for s in targets], dtype=torch.float64)
    return family.window_weights(x, t, fit.shape)


@single_threaded
def diagnostics(gram: torch.Tensor, steps: Sequence[float], spec: RelexSpec) -> TensorDiagnostics:
    """Explained variance and linear R^2 of the window used by ``spec``."""
    idx = list(window_indices(gram.shape[0], spec.window))
    sub_gram = gram.to(torch.float64)[idx][:, idx]
    total = float(sub_gram.trace())
    if total <= 0:
        nan = math.nan
        return TensorDiagnostics(nan, nan, nan, ())
    sigma, u = top_components(sub_gram, len(idx))
    lam = sigma**2
    sub_steps = torch.tensor([float(steps[k]) for k in idx], dtype=torch.float64)
    r2 = fits.family("linear").fit(sub_steps, sigma[:1] * u[:, :1], None, 0.0).r2
    return TensorDiagnostics(
        explained_variance_1=float(lam[0] / total),
        explained_variance_r=float(lam[: spec.rank].sum() / total),
        linear_r2=float(r2[0]),
        singular_values=tuple(float(s) for s in sigma),
    )

"""The RELEX math, pure torch and free of IO.

Per tensor the engine only ever needs the T x T Gram matrix of the window's deltas
(accumulated in float64) and the checkpoints' step values. From them this module finds
the top-r directions, fits their coefficients against the step and returns the weights
``w`` such that the prediction is ``theta0 + sum_k w_k * delta_k`` (see DESIGN.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

FitKind = Literal["linear", "linear_origin", "polynomial"]
Mode = Literal["extrapolate", "reconstruct"]

# Components whose singular value is this small relative to the largest carry only noise.
RELATIVE_SIGMA_CUTOFF = 1e-6


@dataclass(frozen=True)
class FitSpec:
    """How coefficients are regressed on the step value."""

    kind: FitKind = "linear"
    degree: int = 2  # polynomial only
    origin_step: float = 0.0  # linear_origin: the line passes through (origin_step, 0)

    @property
    def n_params(self) -> int:
        return {"linear": 2, "linear_origin": 1}.get(self.kind, self.degree + 1)


@dataclass(frozen=True)
class RelexSpec:
    """Everything that turns a Gram matrix into output weights."""

    rank: int = 1
    fit: FitSpec = FitSpec()
    window: int | None = None  # use only the last `window` checkpoints
    scale: float = 1.0
    mode: Mode = "extrapolate"


@dataclass(frozen=True)
class TensorDiagnostics:
    """Per-tensor quality of the low-rank, linear-in-step picture."""

    explained_variance_1: float  # lambda_1 / sum(lambda), uncentred
    explained_variance_r: float  # top-r share
    linear_r2: float  # R^2 of the rank-1 coefficient against the step (linear fit)
    delta_norm: float  # RMS over the window of ||delta_k||
    singular_values: tuple[float, ...]


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


def _design(x: torch.Tensor, fit: FitSpec, centre: float, spread: float) -> torch.Tensor:
    if fit.kind == "linear_origin":
        return ((x - fit.origin_step) / spread).unsqueeze(1)
    degree = 1 if fit.kind == "linear" else fit.degree
    z = (x - centre) / spread  # affine change of x: same fitted curve, better conditioning
    return torch.stack([z**p for p in range(degree + 1)], dim=1)


def fit_predict(
    steps: torch.Tensor, values: torch.Tensor, targets: torch.Tensor, fit: FitSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares fit of each column of ``values`` (T x r) on ``steps``.

    Returns predictions at ``targets`` (n x r) and each column's R^2 (r,).
    """
    steps = steps.to(torch.float64)
    targets = targets.to(torch.float64)
    values = values.to(torch.float64)
    centre = float(steps.mean())
    spread = float((steps - centre).abs().max()) or 1.0
    if fit.kind == "linear_origin":
        spread = float((steps - fit.origin_step).abs().max()) or 1.0
    design = _design(steps, fit, centre, spread)
    coef = torch.linalg.lstsq(design, values, driver="gelsd").solution
    fitted = design @ coef
    residual = ((values - fitted) ** 2).sum(0)
    total = ((values - values.mean(0)) ** 2).sum(0)
    r2 = torch.where(total > 0, 1.0 - residual / total.clamp_min(1e-300), torch.ones_like(total))
    return _design(targets, fit, centre, spread) @ coef, r2


def window_indices(n_checkpoints: int, window: int | None) -> range:
    w = n_checkpoints if window is None else window
    return range(n_checkpoints - w, n_checkpoints)


def relex_weights(
    gram: torch.Tensor, steps: Sequence[float], targets: Sequence[float], spec: RelexSpec
) -> torch.Tensor:
    """Weights W (n_targets x T, float64): output_j = theta0 + sum_k W[j, k] * delta_k.

    In extrapolate mode targets are steps to predict; in reconstruct mode they must be
    observed steps inside the window, which are denoised onto the rank-r subspace.
    The scale factor multiplies the whole predicted displacement.
    """
    n_ckpt = gram.shape[0]
    idx = list(window_indices(n_ckpt, spec.window))
    sub_gram = gram.to(torch.float64)[idx][:, idx]
    sub_steps = torch.tensor([float(steps[k]) for k in idx], dtype=torch.float64)
    weights = torch.zeros(len(targets), n_ckpt, dtype=torch.float64)
    sigma, u = top_components(sub_gram, spec.rank)
    if sigma.numel() == 0:
        return weights  # all deltas zero: the output is the base tensor
    if spec.mode == "reconstruct":
        rows = [sub_steps.tolist().index(float(t)) for t in targets]
        sub_weights = u[rows] @ u.T
    else:
        coefficients = sigma * u  # c_{k,i} = sigma_i u_{k,i}
        predicted, _ = fit_predict(
            sub_steps, coefficients, torch.tensor(list(targets), dtype=torch.float64), spec.fit
        )
        sub_weights = (predicted / sigma) @ u.T
    weights[:, idx] = sub_weights * spec.scale
    return weights


def diagnostics(gram: torch.Tensor, steps: Sequence[float], spec: RelexSpec) -> TensorDiagnostics:
    """Explained variance and linear R^2 of the window used by ``spec``."""
    idx = list(window_indices(gram.shape[0], spec.window))
    sub_gram = gram.to(torch.float64)[idx][:, idx]
    total = float(sub_gram.trace())
    if total <= 0:
        nan = float("nan")
        return TensorDiagnostics(nan, nan, nan, 0.0, ())
    sigma, u = top_components(sub_gram, len(idx))
    lam = sigma**2
    sub_steps = torch.tensor([float(steps[k]) for k in idx], dtype=torch.float64)
    _, r2 = fit_predict(sub_steps, (sigma[:1] * u[:, :1]), sub_steps, FitSpec("linear"))
    return TensorDiagnostics(
        explained_variance_1=float(lam[0] / total),
        explained_variance_r=float(lam[: spec.rank].sum() / total),
        linear_r2=float(r2[0]),
        delta_norm=math.sqrt(total / len(idx)),
        singular_values=tuple(float(s) for s in sigma),
    )

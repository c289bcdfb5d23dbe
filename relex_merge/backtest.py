"""Backtests inside the window, computed from the Gram matrix alone.

Fit RELEX on the first K checkpoints and predict each later one. The prediction is
sum_k w_k delta_k, so its error and cosine against the held-back delta_j need only inner
products of deltas, which G holds:

    ||pred||^2 = w^T G_FF w,   <pred, delta_j> = w^T G_Fj,   ||delta_j||^2 = G_jj

Summed over tensors these give the whole model's relative error, cosine and norm ratio as a
function of the horizon, measured in multiples of the fit span (s_K - s_1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from relex_merge.fit import RelexSpec, relex_weights


@dataclass(frozen=True)
class Holdout:
    fit_count: int  # K: checkpoints the line was fitted on
    step: int  # step of the held-back checkpoint
    horizon: float  # (step - s_K) / (s_K - s_1)


@dataclass
class HoldoutSums:
    """Inner products summed over tensors (or for one tensor)."""

    err2: float = 0.0
    true2: float = 0.0
    pred2: float = 0.0
    dot: float = 0.0

    def add(self, other: "HoldoutSums") -> None:
        self.err2 += other.err2
        self.true2 += other.true2
        self.pred2 += other.pred2
        self.dot += other.dot

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.err2 / self.true2) if self.true2 > 0 else float("nan")

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.pred2 * self.true2)
        return self.dot / denom if denom > 0 else float("nan")

    @property
    def norm_ratio(self) -> float:
        return math.sqrt(self.pred2 / self.true2) if self.true2 > 0 else float("nan")


def fit_counts(n_checkpoints: int, spec: RelexSpec) -> list[int]:
    """Prefix lengths K to fit on: enough points for the fit, at least one checkpoint held back."""
    smallest = max(2, spec.fit.n_params, spec.rank)
    candidates = {math.ceil(n_checkpoints * f) for f in (0.25, 1 / 3, 0.5, 2 / 3)} | {smallest}
    return sorted(k for k in candidates if smallest <= k <= n_checkpoints - 1)


def holdouts(steps: Sequence[int], spec: RelexSpec) -> list[Holdout]:
    out = []
    for k in fit_counts(len(steps), spec):
        span = steps[k - 1] - steps[0]
        for j in range(k, len(steps)):
            out.append(Holdout(k, steps[j], (steps[j] - steps[k - 1]) / span))
    return out


def backtest_tensor(gram: torch.Tensor, steps: Sequence[int], spec: RelexSpec) -> list[HoldoutSums]:
    """One HoldoutSums per entry of holdouts(steps, spec), for one tensor."""
    gram = gram.to(torch.float64)
    results: list[HoldoutSums] = []
    for k in fit_counts(len(steps), spec):
        sub = replace(spec, window=None, scale=1.0, rank=min(spec.rank, k), mode="extrapolate")
        held = list(range(k, len(steps)))
        weights = relex_weights(gram[:k, :k], steps[:k], [steps[j] for j in held], sub)
        for row, j in enumerate(held):
            w = weights[row]
            pred2 = float(w @ gram[:k, :k] @ w)
            dot = float(w @ gram[:k, j])
            true2 = float(gram[j, j])
            results.append(HoldoutSums(max(pred2 - 2 * dot + true2, 0.0), true2, pred2, dot))
    return results

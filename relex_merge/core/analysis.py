"""What ``relex-merge analyze`` reports, as data, and how it is computed from the Gram matrices
alone (pure: no IO): per-tensor spectrum and fit quality, the backtest of the analysed fit, every
family's pooled errors by horizon, the plain-language reading and the verdict per target."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from relex_merge.common.units import horizon_text
from relex_merge.core import fits
from relex_merge.core.backtest import STOP, Backtest, horizon, window_steps
from relex_merge.core.kernels import single_threaded
from relex_merge.core.relex import FitSpec, RelexSpec, diagnostics, top_components, window_indices
from relex_merge.core.rule import DEFAULT_RULE
from relex_merge.core.verdict import assess

__all__ = [
    "HORIZON_BINS",
    "Analysis",
    "TensorAnalysis",
    "HorizonPoint",
    "FamilyRow",
    "analyze_grams",
    "backtest_reading",
    "representative_curves",
    "summary_rows",
]

HORIZON_BINS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, math.inf)  # the family x horizon table's columns


@dataclass(frozen=True)
class TensorAnalysis:
    """One tensor's row of analysis.json: how rank-1 and how linear its window is, and how its
    own backtest of the analysed fit ends."""

    name: str
    numel: int
    explained_variance_1: float  # lambda_1 / sum(lambda) of the window's Gram matrix
    explained_variance_r: float  # the top-r share (r = parameters.rank)
    linear_r2: float  # R^2 of the rank-1 coefficient against the step
    singular_values: list[float]  # normalised by the largest
    worst_backtest_error: float  # of the analysed fit, at the longest horizon tested


@dataclass(frozen=True)
class HorizonPoint:
    """One backtest point of the analysed fit, pooled over every tensor (the whole model)."""

    fit_count: int  # K: the fit used the first K checkpoints of the window
    step: int  # the held-back checkpoint it predicted
    horizon: float  # (step - s_K) / (s_K - s_1)
    relative_error: float  # ||pred - true|| / ||true|| of the displacement from the base
    cosine: float
    norm_ratio: float  # ||pred|| / ||true||: > 1 overshoots


@dataclass(frozen=True)
class FamilyRow:
    """One family at its best shape: pooled backtest error per horizon bin."""

    fit: str  # e.g. "log (tau=5)"
    family: str
    shape: float | None  # the best on the family's grid; None for families without a shape
    errors: list[float | None]  # per bin of Analysis.horizon_bins; None: no point there
    supported_horizon: float | None  # see Backtest.supported_horizon


@dataclass
class Analysis:
    """What ``relex-merge analyze`` reports (and writes as analysis.json): the window's fit
    quality per tensor, the backtest of the analysed fit, every family's pooled errors by
    horizon, and plain-language verdicts. Built by ``analyze_grams`` from Gram matrices alone."""

    steps: list[int]  # the window the fit uses
    targets: list[int]
    spec: dict  # the RelexSpec as plain data (JSON)
    fit: str  # the fit whose backtest is `backtest` (the configured one, or the one chosen for the farthest target)
    tensors: list[TensorAnalysis]
    backtest: list[HorizonPoint]
    supported_horizon: float | None  # longest horizon with error <= tolerance throughout
    tested_horizon: float  # longest horizon the window can backtest
    target_horizons: dict[int, float]  # target step -> its horizon in window spans
    horizon_bins: list[tuple[float, float]]  # [lo, hi) columns of the family table that hold points
    families: list[FamilyRow]  # every family, then stopping
    target_verdicts: list[dict]  # TargetVerdict.as_dict() per target
    verdict: list[str]  # the lines the CLI prints under "verdict"
    tolerance: float
    coefficients: dict[str, dict] = field(default_factory=dict)  # for plots

    def to_json(self) -> str:
        """The analysis as indented JSON, as written to analysis.json. Non-finite numbers (an
        open-ended horizon bin, a NaN error) are written as null: NaN and Infinity are not JSON,
        and strict parsers (jq, JavaScript, Go) refuse the whole file over them."""
        return json.dumps(_finite_or_null(asdict(self)), indent=2, allow_nan=False)


def _finite_or_null(value):
    """``value`` with every non-finite float replaced by None (tuples become lists, as json writes them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _points(bt: Backtest, key) -> list[HorizonPoint]:
    return [
        HorizonPoint(p.fit_count, p.step, p.horizon, s.relative_error, s.cosine, s.norm_ratio) for p, s in bt.curve(key)
    ]


def _bins(bt: Backtest) -> list[tuple[float, float]]:
    edges = list(zip(HORIZON_BINS, HORIZON_BINS[1:]))
    return [(lo, hi) for lo, hi in edges if any(lo <= p.horizon < hi for p in bt.points)]


def _family_rows(bt: Backtest, bins: list[tuple[float, float]], tolerance: float) -> list[FamilyRow]:
    everything = list(range(len(bt.points)))
    rows = []
    for fam in fits.families():
        mine = [c for c in bt.candidates if c.family == fam.name]
        if not mine:
            continue
        best = min(mine, key=lambda c: bt.error(c, everything))
        rows.append(
            FamilyRow(
                best.describe(), fam.name, best.shape, _binned(bt, best, bins), bt.supported_horizon(best, tolerance)
            )
        )
    rows.append(FamilyRow(STOP, STOP, None, _binned(bt, STOP, bins), None))
    return rows


def _binned(bt: Backtest, key, bins) -> list[float | None]:
    out = []
    for lo, hi in bins:
        ids = [i for i, p in enumerate(bt.points) if lo <= p.horizon < hi]
        out.append(bt.error(key, ids) if ids else None)
    return out


@single_threaded
def analyze_grams(
    names: Sequence[str],
    numels: Sequence[int],
    grams: Sequence[torch.Tensor],
    steps: Sequence[int],
    targets: Sequence[int],
    spec: RelexSpec,
    tolerance: float | None = None,
) -> Analysis:
    """Everything `analyze` reports, from the Gram matrices alone (pure: no IO)."""
    tolerance = DEFAULT_RULE.with_tolerance(tolerance).tolerance
    usable = [
        (n, k, g) for n, k, g in zip(names, numels, grams) if bool(torch.isfinite(g).all()) and float(g.trace()) > 0
    ]
    used = window_steps(steps, spec)
    specs = [spec] * len(targets)
    assessment = assess([g for _, _, g in usable], steps, targets, specs, tolerance) if targets else None
    # the family table scores every family, whatever the config's fit
    bt = Backtest.for_fits(steps, spec, [spec.fit, FitSpec(fits.AUTO, origin_step=spec.fit.origin_step)])
    for _, _, g in usable:
        bt.add(g)
    if spec.fit.resolved is not None:
        main = spec.fit.resolved
    elif assessment is not None:
        farthest = max(range(len(targets)), key=lambda j: targets[j])
        main = assessment.fits[farthest]
    else:
        main = bt.best(
            bt.tested_horizon,
            [c for c in bt.candidates if c.family == spec.fit.family] if spec.fit.family != fits.AUTO else None,
        )
    tensors = []
    for name, numel, gram in usable:
        d = diagnostics(gram, steps, spec)
        own = Backtest(bt.steps, spec, [main])
        own.add(gram)
        curve = own.curve(main)
        worst = curve[-1][1].relative_error if curve else math.nan
        top = d.singular_values[0] if d.singular_values else 1.0
        tensors.append(
            TensorAnalysis(
                name,
                numel,
                d.explained_variance_1,
                d.explained_variance_r,
                d.linear_r2,
                [s / top for s in d.singular_values],
                worst,
            )
        )
    bins = _bins(bt)
    analysis = Analysis(
        steps=list(used),
        targets=list(targets),
        spec=_spec_dict(spec),
        fit=main.describe(),
        tensors=tensors,
        backtest=_points(bt, main),
        supported_horizon=bt.supported_horizon(main, tolerance),
        tested_horizon=bt.tested_horizon,
        target_horizons={t: horizon(used, t) for t in targets},
        horizon_bins=bins,
        families=_family_rows(bt, bins, tolerance),
        target_verdicts=[v.as_dict() for v in assessment.verdicts if v is not None] if assessment else [],
        verdict=[],
        tolerance=tolerance,
    )
    analysis.verdict = backtest_reading(analysis, bt, main) + (
        [v.line() for v in assessment.verdicts if v is not None] if assessment else []
    )
    return analysis


def _spec_dict(spec: RelexSpec) -> dict:
    data = asdict(spec)
    data["fit"] = {"family": spec.fit.family, "shape": spec.fit.shape, "origin_step": spec.fit.origin_step}
    return data


def backtest_reading(a: Analysis, bt: Backtest, main: FitSpec) -> list[str]:
    """Plain-language reading of the backtest of the analysed fit, and of the other families."""
    if not a.backtest:
        return ["The window is too short to backtest: add checkpoints (at least 5)."]
    lines: list[str] = []
    tol = f"{a.tolerance:.0%}"
    name = main.describe()
    near, far = a.backtest[0], a.backtest[-1]
    if a.supported_horizon is None:
        lines.append(
            f"{name} does not hold even at the shortest horizon tested ({horizon_text(near.horizon)} the fit span: "
            f"error {near.relative_error:.0%}; tolerance {tol}). Extrapolation with it from this window is not "
            "supported."
        )
    elif a.supported_horizon >= a.tested_horizon:
        lines.append(
            f"{name} held at every horizon the window can test, up to {horizon_text(a.tested_horizon)} the fit span "
            f"(backtest error at most {max(p.relative_error for p in a.backtest):.1%}, tolerance {tol})."
        )
    else:
        lines.append(
            f"{name} holds up to {horizon_text(a.supported_horizon)} the fit span (backtest error <= {tol}); "
            f"beyond that the error grows, to {far.relative_error:.0%} at {horizon_text(far.horizon)}."
        )
    if far.relative_error > 2 * max(near.relative_error, 1e-3) and far.relative_error > a.tolerance / 2:
        lines.append(
            f"Backtest error grows with horizon ({near.relative_error:.1%} at {horizon_text(near.horizon)}, "
            f"{far.relative_error:.1%} at {horizon_text(far.horizon)}): the trajectory does not follow {name}."
        )
    if far.norm_ratio > 1.1:
        lines.append(
            f"At the longest horizon {name} overshoots: the predicted displacement is {far.norm_ratio:.2f}x the "
            "true one, so the run decelerates. Far targets will overshoot more; a decelerating family "
            "(fit: auto, log, power, saturating) or scale < 1 may do better."
        )
    elif far.norm_ratio < 0.9:
        lines.append(
            f"At the longest horizon {name} undershoots ({far.norm_ratio:.2f}x the true displacement): "
            "the run accelerates."
        )
    everything = list(range(len(bt.points)))
    rows = [FitSpec(r.family, r.shape, bt.spec.fit.origin_step) for r in a.families if r.family != STOP]
    if rows:
        best = bt.best_over(everything, rows)
        lines.append(
            f"Over every backtest point the best fit is {best.describe()} ({bt.error(best, everything):.1%} pooled "
            f"error; {name}: {bt.error(main, everything):.1%}; stopping at the last fitted checkpoint: "
            f"{bt.error(STOP, everything):.1%})."
        )
    return lines


def _coefficients(
    gram: torch.Tensor, steps: Sequence[int], spec: RelexSpec, rows: Sequence[FamilyRow], targets: Sequence[int]
) -> dict:
    """The rank-1 coefficient c_k = sigma_1 u_k1 (sign made positive at the end) and every
    family's fitted curve through it, carried to the farthest target."""
    idx = list(window_indices(gram.shape[0], spec.window))
    sigma, u = top_components(gram.to(torch.float64)[idx][:, idx], 1)
    if sigma.numel() == 0:
        return {}
    c = sigma[0] * u[:, 0]
    if c[-1] < 0:
        c = -c
    used = [float(steps[k]) for k in idx]
    x = torch.tensor(used, dtype=torch.float64)
    last = max([used[-1], *[float(t) for t in targets]])
    grid = torch.linspace(used[0], last, 80, dtype=torch.float64)
    curves = {}
    for row in rows:
        if row.family == STOP or isinstance(fits.family(row.family), fits.DirectFamily):
            continue  # stopping and the direct families have no coefficient curve
        fit = FitSpec(row.family, row.shape, spec.fit.origin_step)
        curve = fit.curve_family.fit(x, c.unsqueeze(1), row.shape, fit.origin_step)
        curves[row.fit] = {"x": grid.tolist(), "y": curve(grid)[:, 0].tolist()}
    return {"steps": used, "coefficients": c.tolist(), "targets": list(targets), "curves": curves}


def representative_curves(grams: dict[str, torch.Tensor], analysis: Analysis, steps, spec: RelexSpec) -> dict:
    """Coefficient curves of the three largest tensors and of the one the line fits worst (for
    the plots)."""
    chosen: dict[str, str] = {}
    for t in sorted(analysis.tensors, key=lambda t: -t.numel)[:3]:
        chosen[t.name] = f"one of the 3 largest tensors ({t.numel:,} parameters)"
    if analysis.tensors:
        worst = min(analysis.tensors, key=lambda t: t.linear_r2)
        chosen.setdefault(worst.name, f"the worst linear R² ({worst.linear_r2:.2f})")
    out = {}
    for name, why in chosen.items():
        data = _coefficients(grams[name], steps, spec, analysis.families, analysis.targets)
        if data:
            out[name] = {**data, "why": why}
    return out


def summary_rows(a: Analysis) -> list[tuple[str, str]]:
    """(label, value) rows of the summary table the CLI prints first for ``analyze``."""

    def stat(values: list[float]) -> str:
        finite = sorted(v for v in values if not math.isnan(v))
        if not finite:
            return "n/a"
        return f"median {finite[len(finite) // 2]:.4f}, min {finite[0]:.4f}"

    return [
        ("tensors analysed", str(len(a.tensors))),
        ("rank-1 explained variance", stat([t.explained_variance_1 for t in a.tensors])),
        ("linear R² (rank-1 coefficient)", stat([t.linear_r2 for t in a.tensors])),
        ("fit analysed", a.fit),
        (
            "supported horizon",
            f"{horizon_text(a.supported_horizon)} the fit span" if a.supported_horizon is not None else "none",
        ),
        ("longest horizon tested", horizon_text(a.tested_horizon)),
    ]

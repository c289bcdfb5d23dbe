"""How far does the line hold? Per-tensor spectrum and fit quality, backtests inside the
window, a whole-model verdict, and the fit cache (every tensor's Gram matrix) that lets
later merges skip the Gram pass."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from relex_merge.backtest import HoldoutSums, backtest_tensor, holdouts
from relex_merge.engine import EngineOptions, EngineStats, TensorReport, run_merge
from relex_merge.errors import RelexError
from relex_merge.fit import RelexSpec, top_components
from relex_merge.io.writer import OutputTensor, ShardedModelWriter
from relex_merge.io.readers import TensorMeta, read_safetensors_header
from relex_merge.plan import MergePlan

CACHE_NAME = "fit_cache.safetensors"
DEFAULT_TOLERANCE = 0.2  # relative backtest error under which the line counts as holding


@dataclass(frozen=True)
class TensorAnalysis:
    name: str
    numel: int
    explained_variance_1: float
    explained_variance_r: float
    linear_r2: float
    singular_values: list[float]  # normalised by the largest
    worst_backtest_error: float  # at the longest horizon tested


@dataclass(frozen=True)
class HorizonPoint:
    fit_count: int
    step: int
    horizon: float
    relative_error: float
    cosine: float
    norm_ratio: float


@dataclass
class Analysis:
    steps: list[int]
    targets: list[int]
    spec: dict
    tensors: list[TensorAnalysis]
    backtest: list[HorizonPoint]
    supported_horizon: float | None  # longest horizon with error <= tolerance throughout
    tested_horizon: float
    target_horizons: dict[int, float]
    verdict: list[str]
    tolerance: float
    coefficients: dict[str, dict] = field(default_factory=dict)  # for plots

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, allow_nan=True)


def _window_horizon(steps: Sequence[int], target: int) -> float:
    span = steps[-1] - steps[0]
    return (target - steps[-1]) / span if span else float("nan")


def _coefficients(gram: torch.Tensor, steps: Sequence[int], targets: Sequence[int]) -> dict:
    """c_k = sigma_1 u_k1 for the plots, with its fitted line (sign made positive at the end)."""
    sigma, u = top_components(gram, 1)
    if sigma.numel() == 0:
        return {}
    c = (sigma[0] * u[:, 0]).tolist()
    if c[-1] < 0:
        c = [-x for x in c]
    x = torch.tensor(steps, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], 1)
    line = torch.linalg.lstsq(design, torch.tensor(c, dtype=torch.float64).unsqueeze(1)).solution[:, 0]
    return {"steps": list(steps), "coefficients": c, "intercept": float(line[0]), "slope": float(line[1]),
            "targets": list(targets)}


def analyze_grams(
    names: Sequence[str],
    numels: Sequence[int],
    grams: Sequence[torch.Tensor],
    steps: Sequence[int],
    targets: Sequence[int],
    spec: RelexSpec,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Analysis:
    """Everything `analyze` reports, from the Gram matrices alone (pure: no IO)."""
    from relex_merge.fit import diagnostics

    points = holdouts(steps, spec)
    totals = [HoldoutSums() for _ in points]
    tensors: list[TensorAnalysis] = []
    for name, numel, gram in zip(names, numels, grams):
        if not bool(torch.isfinite(gram).all()) or float(gram.trace()) <= 0:
            continue
        d = diagnostics(gram, steps, spec)
        per_tensor = backtest_tensor(gram, steps, spec)
        for total, sums in zip(totals, per_tensor):
            total.add(sums)
        longest = max(range(len(points)), key=lambda i: points[i].horizon, default=None)
        worst = per_tensor[longest].relative_error if longest is not None else float("nan")
        top = d.singular_values[0] if d.singular_values else 1.0
        tensors.append(
            TensorAnalysis(name, numel, d.explained_variance_1, d.explained_variance_r, d.linear_r2,
                           [s / top for s in d.singular_values], worst)
        )
    curve = [
        HorizonPoint(p.fit_count, p.step, p.horizon, t.relative_error, t.cosine, t.norm_ratio)
        for p, t in zip(points, totals)
    ]
    curve.sort(key=lambda p: (p.horizon, p.fit_count))
    supported = None
    for point in curve:
        if not point.relative_error <= tolerance:
            break
        supported = point.horizon
    tested = max((p.horizon for p in curve), default=0.0)
    target_horizons = {t: _window_horizon(steps, t) for t in targets}
    analysis = Analysis(
        steps=list(steps), targets=list(targets), spec=asdict(spec), tensors=tensors, backtest=curve,
        supported_horizon=supported, tested_horizon=tested, target_horizons=target_horizons,
        verdict=[], tolerance=tolerance,
    )
    analysis.verdict = verdict(analysis)
    return analysis


def verdict(a: Analysis) -> list[str]:
    """Plain-language reading of the backtest."""
    lines: list[str] = []
    if not a.backtest:
        return ["The window is too short to backtest: add checkpoints (at least fit size + 1)."]
    tol = f"{a.tolerance:.0%}"
    near, far = a.backtest[0], a.backtest[-1]
    if a.supported_horizon is None:
        lines.append(
            f"The line does not hold even at the shortest horizon tested ({near.horizon:.2f}x the fit span: "
            f"error {near.relative_error:.0%} > {tol}). Extrapolation from this window is not supported."
        )
    elif a.supported_horizon >= a.tested_horizon:
        lines.append(
            f"The line held at every horizon the window can test, up to {a.tested_horizon:.1f}x the fit span "
            f"(backtest error at most {max(p.relative_error for p in a.backtest):.1%}, tolerance {tol})."
        )
    else:
        lines.append(
            f"The line holds up to {a.supported_horizon:.1f}x the fit span (backtest error <= {tol}); "
            f"beyond that the error grows, to {far.relative_error:.0%} at {far.horizon:.1f}x."
        )
    if far.relative_error > 2 * max(near.relative_error, 1e-3) and far.relative_error > a.tolerance / 2:
        lines.append(
            f"Backtest error grows with horizon ({near.relative_error:.1%} at {near.horizon:.1f}x, "
            f"{far.relative_error:.1%} at {far.horizon:.1f}x): the trajectory is not a straight line."
        )
    if far.norm_ratio > 1.1:
        lines.append(
            f"At the longest horizon the line overshoots: the predicted displacement is {far.norm_ratio:.2f}x the "
            "true one, so the run decelerates. Far targets will overshoot more; consider scale < 1."
        )
    elif far.norm_ratio < 0.9:
        lines.append(
            f"At the longest horizon the line undershoots ({far.norm_ratio:.2f}x the true displacement): "
            "the run accelerates."
        )
    limit = a.supported_horizon if a.supported_horizon is not None else 0.0
    span = a.steps[-1] - a.steps[0]
    for target, horizon in a.target_horizons.items():
        if a.supported_horizon is None:
            lines.append(f"Target step {target} ({horizon:.1f}x the window span past its end): no horizon passed "
                         "the backtest, so expect this prediction to be off; evaluate before use.")
        elif horizon <= limit:
            lines.append(f"Target step {target} ({horizon:.1f}x the window span past its end) is within the supported range.")
        elif horizon <= a.tested_horizon:
            lines.append(f"Target step {target} ({horizon:.1f}x) is past where the backtest held ({limit:.1f}x): expect errors.")
        else:
            safe = a.steps[-1] + int(limit * span)
            lines.append(
                f"Target step {target} is {horizon:.1f}x the window span past its end, beyond anything this "
                f"window can test ({a.tested_horizon:.1f}x). Treat it as a guess: evaluate it (relex-merge sweep), "
                f"prefer targets up to about step {safe}, or shrink with scale."
            )
    return lines


def run_analysis(
    plan: MergePlan, options: EngineOptions, tolerance: float = DEFAULT_TOLERANCE, progress=lambda n, d: None
) -> tuple[Analysis, EngineStats]:
    """Read the window once (Gram matrices only) and analyse."""
    stats = run_merge(plan.job.gram_only(), [], options, progress)
    reports = [r for r in stats.tensors if r.gram is not None]
    analysis = analyze_grams(
        [r.name for r in reports], [r.numel for r in reports], [r.gram for r in reports],
        list(plan.job.steps), list(plan.job.targets), plan.job.spec, tolerance,
    )
    analysis.coefficients = _representative(reports, analysis, plan.job.steps, plan.job.targets)
    return analysis, stats


def _representative(reports: Sequence[TensorReport], analysis: Analysis, steps, targets) -> dict:
    """Coefficient curves of the three largest tensors and of the worst-fitting one."""
    by_name = {r.name: r for r in reports}
    chosen = [t.name for t in sorted(analysis.tensors, key=lambda t: -t.numel)[:3]]
    if analysis.tensors:
        chosen.append(min(analysis.tensors, key=lambda t: t.linear_r2).name)
    return {name: _coefficients(by_name[name].gram, steps, targets) for name in dict.fromkeys(chosen)}


# ---- fit cache -------------------------------------------------------------------------


def write_fit_cache(path: Path, plan: MergePlan, reports: Sequence[TensorReport]) -> None:
    """Every tensor's Gram matrix (T x T float64) with the steps and input fingerprints."""
    tensors = [r for r in reports if r.gram is not None]
    metadata = {
        "format": "pt",
        "relex_fit_cache": "1",
        "steps": json.dumps(list(plan.job.steps)),
        "inputs": json.dumps([record.fingerprint for record in plan.fingerprints()]),
    }
    n = len(plan.job.steps)
    layout = [OutputTensor(t.name, TensorMeta((n, n), torch.float64)) for t in tensors]
    writer = ShardedModelWriter(path.parent, layout, shard_size=1 << 62, metadata=metadata, file_name=path.name)
    for t in tensors:
        writer.write(t.name, t.gram.to(torch.float64).contiguous())
    writer.close()


def load_fit_cache(path: Path, plan: MergePlan) -> dict[str, torch.Tensor]:
    """The cached Gram matrices, refused if they came from other checkpoints or steps."""
    from safetensors import safe_open

    if not path.is_file():
        raise RelexError(f"--fit-cache: {path} does not exist (relex-merge analyze CONFIG --out DIR writes one)")
    read_safetensors_header(path)  # one-line errors for damaged files
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("relex_fit_cache") != "1":
            raise RelexError(f"--fit-cache: {path} is not a relex fit cache")
        if json.loads(meta["steps"]) != list(plan.job.steps):
            raise RelexError(f"--fit-cache: {path} was made for steps {meta['steps']}, not {list(plan.job.steps)}")
        now = [record.fingerprint for record in plan.fingerprints()]
        if json.loads(meta["inputs"]) != now:
            raise RelexError(f"--fit-cache: {path} was made from other checkpoint files; rerun relex-merge analyze")
        return {name: f.get_tensor(name) for name in f.keys()}


def summary_rows(a: Analysis) -> list[tuple[str, str]]:
    def stat(values: list[float]) -> str:
        finite = sorted(v for v in values if not math.isnan(v))
        if not finite:
            return "n/a"
        return f"median {finite[len(finite) // 2]:.4f}, min {finite[0]:.4f}"

    return [
        ("tensors analysed", str(len(a.tensors))),
        ("rank-1 explained variance", stat([t.explained_variance_1 for t in a.tensors])),
        ("linear R² (rank-1 coefficient)", stat([t.linear_r2 for t in a.tensors])),
        ("supported horizon", f"{a.supported_horizon:.2f}x the fit span" if a.supported_horizon is not None else "none"),
        ("longest horizon tested", f"{a.tested_horizon:.2f}x"),
    ]

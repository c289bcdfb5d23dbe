"""What the backtest says about a target: the fit to use, and whether the prediction can be
trusted (the verdict every output carries: printed, in its card and atop relex_config.yml)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from relex_merge.core.backtest import (
    STOP,
    TIE,
    Backtest,
    hint_candidates,
    horizon,
    shape_candidates,
    window_steps,
)
from relex_merge.core.kernels import single_threaded
from relex_merge.core.relex import FitSpec, RelexSpec
from relex_merge.core.rule import DEFAULT_RULE, WORDS, VerdictRule

__all__ = ["VerdictRule", "DEFAULT_RULE", "WORDS", "TargetVerdict", "Assessment", "assess", "judge", "config_hint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetVerdict:
    """The verdict printed for one output and written into its card and relex_config.yml."""

    target: int  # the target step
    horizon: float  # of the target, in window spans
    fit: FitSpec  # resolved: the shape is known
    chosen_by_backtest: bool  # auto, or a shape the config left open
    error: float  # backtest error of the fit near the target's horizon
    stop_error: float  # ... of stopping at the last fitted checkpoint
    at_horizon: float  # mean horizon of the points those errors pool
    supported_horizon: float | None  # see Backtest.supported_horizon
    tested_horizon: float
    tolerance: float
    last_step: int  # the window's last step (what "stopping" means for the user)
    better_fit: FitSpec | None = None  # another family that holds where this one fails
    scale: float = 1.0  # the config's scale, part of what was judged
    margin: float = 1.0  # see VerdictRule
    reach: float = 1.0

    @property
    def word(self) -> str:
        """supported, not supported or untested (see VerdictRule)."""
        if math.isnan(self.error) or self.horizon > self.reach * self.tested_horizon + 1e-9:
            return "untested"
        needed = min(self.horizon, self.tested_horizon)
        held = self.supported_horizon is not None and self.supported_horizon >= needed - 1e-9
        return "supported" if held and self.error < self.margin * self.stop_error else "not supported"

    @property
    def supported(self) -> bool:
        """The verdict is "supported": go."""
        return self.word == "supported"

    @property
    def beyond_tested(self) -> bool:
        """The target lies farther out than any horizon the window can test."""
        return self.horizon > self.tested_horizon + 1e-9

    def line(self) -> str:
        """The one-line verdict (``SUPPORTED: ...``, ``NOT SUPPORTED: ...`` or ``UNTESTED: ...``)
        the CLI prints and the card and relex_config.yml record."""
        if math.isnan(self.error):
            return (
                f"UNTESTED: step {self.target}: the window is too short to backtest (it needs more "
                "checkpoints than the fit uses); evaluate the prediction before use."
            )
        fit = (
            self.fit.describe()
            + (f" at scale {self.scale:g}" if self.scale != 1.0 else "")
            + (" (chosen by the backtest)" if self.chosen_by_backtest else "")
        )
        where = f"step {self.target} is {self.horizon:.1f}x the window span past its end"
        # one decimal when whole percents would show the error equal to the tolerance it missed
        digits = 1 if _pct(self.error) == _pct(self.tolerance) and self.error != self.tolerance else 0
        errors = (
            f"backtest error {_pct(self.error, digits)} near {self.at_horizon:.1f}x vs "
            f"{_pct(self.stop_error, digits)} for stopping"
        )
        word = self.word
        if word == "untested":
            return (
                f"UNTESTED: {where}, beyond the {self.reach * self.tested_horizon:.1f}x this window can test "
                f"({errors}); nothing here says whether {fit} beats stopping at step {self.last_step}: evaluate it "
                "(relex-merge sweep) before use."
            )
        if word == "supported":
            reach = (
                f"holds up to {self.supported_horizon:.1f}x"
                if not self.beyond_tested
                else (f"held at every horizon tested, up to {self.tested_horizon:.1f}x")
            )
            return f"SUPPORTED: {where}; {fit} {reach} ({errors})."
        needed = min(self.horizon, self.tested_horizon)
        held = self.supported_horizon is not None and self.supported_horizon >= needed - 1e-9
        if held:  # it holds there, yet stopping is (nearly) as close
            but = (
                f"stopping at step {self.last_step} is at least as close there"
                if self.margin == 1.0
                else f"its error there is not below {self.margin:.2g}x that of stopping at step {self.last_step}"
            )
            return (
                f"NOT SUPPORTED: {where}; {fit} holds up to {self.supported_horizon:.1f}x, but {but} ({errors}): "
                "do not extrapolate from this window."
            )
        if self.supported_horizon is None:
            held_text = f"{fit} held at no horizon the window can test"
        else:
            held_text = f"{fit} holds only up to {self.supported_horizon:.1f}x"
        if self.error >= self.stop_error:
            advice = f"stopping at step {self.last_step} is closer: do not extrapolate from this window"
        else:
            advice = (
                f"closer than stopping there, but beyond the {self.tolerance:.0%} tolerance: do not rely on it; "
                f"evaluate it against the last window checkpoint (step {self.last_step}) before use"
            )
        line = f"NOT SUPPORTED: {where}; {held_text} ({errors}); {advice}."
        if self.beyond_tested:
            line += f" The window can test horizons up to {self.tested_horizon:.1f}x only."
        if self.better_fit is not None:
            line += f" {self.better_fit.describe()} holds here: {config_hint(self.better_fit)}."
        return line

    def as_dict(self) -> dict:
        """The verdict as JSON-ready data (analysis.json's ``target_verdicts``), rounded."""
        return {
            "target_step": self.target,
            "horizon": round(self.horizon, 4),
            "fit": self.fit.describe(),
            "scale": self.scale,
            "chosen_by_backtest": self.chosen_by_backtest,
            "verdict": self.word,
            "supported": self.supported,
            "supported_horizon": None if self.supported_horizon is None else round(self.supported_horizon, 4),
            "tested_horizon": round(self.tested_horizon, 4),
            "backtest_error": round(self.error, 4),
            "stop_error": round(self.stop_error, 4),
            "tolerance": self.tolerance,
            "margin": self.margin,
            "reach": self.reach,
        }


def config_hint(fit: FitSpec) -> str:
    """The config lines that select ``fit``."""
    fam = fit.curve_family
    parts = [f"fit: {fit.family}"]
    if fam.shape is not None and fit.shape is not None:
        parts.append(f"{fam.shape.key}: {fit.shape:.4g}")
    return "set " + " and ".join(f"`{p}`" for p in parts) + " under parameters (or fit: auto)"


def _pct(x: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}%}"


@dataclass(frozen=True)
class Assessment:
    """What the backtest says about a merge's outputs: each one's fit (resolved: auto and
    missing shapes chosen here) and its verdict (None outside extrapolate mode, and for a target
    inside the window: interpolation)."""

    backtest: Backtest
    fits: list[FitSpec]  # per output, in the order of the targets
    verdicts: list[TargetVerdict | None]
    notes: list[str] = field(default_factory=list)  # warnings about the choice (a shape on its grid's edge)

    @property
    def unsupported(self) -> list[TargetVerdict]:
        """The verdicts of the outputs the backtest does not support (--require-supported)."""
        return [v for v in self.verdicts if v is not None and not v.supported]


@single_threaded
def assess(
    grams: Iterable[torch.Tensor],
    steps: Sequence[int],
    targets: Sequence[int],
    specs: Sequence[RelexSpec],
    tolerance: float | None = None,
    rule: VerdictRule = DEFAULT_RULE,
    hints: bool = True,
) -> Assessment:
    """Backtest every output's fit (its shape grid, or every family for auto; plus, with
    ``hints``, the cheap families, to name a better one) from the Gram matrices, and give each
    output a verdict by ``rule`` (its tolerance replaced by ``tolerance`` when given). The
    training callback passes ``hints=False``: it only needs the verdicts, and the hint
    families are most of the backtest's cost."""
    rule = rule.with_tolerance(tolerance)
    spec = specs[0]  # rank, window, mode and re-fitting are shared by the outputs
    wanted = [s.fit for s in specs]
    if hints and any(fit.resolved is not None for fit in wanted):
        wanted += hint_candidates(spec, steps)
    backtest = Backtest.for_fits(steps, spec, wanted)
    for gram in grams:
        backtest.add(gram)
    last = window_steps(steps, spec)[-1]
    log.debug(
        "backtest: %d candidate fit(s) and stopping scored at %d point(s) (fit counts %s, horizons up to %.2fx)",
        len(backtest.candidates),
        len(backtest.points),
        sorted({p.fit_count for p in backtest.points}),
        backtest.tested_horizon,
    )
    chosen, verdicts, notes = [], [], []
    for target, output in zip(targets, specs):
        fit = output.fit.resolved
        by_backtest = fit is None
        if fit is None:
            h = horizon(backtest.steps, target)
            candidates = shape_candidates(output.fit, steps, spec)
            fit = backtest.best(h, candidates, output.scale)
            if log.isEnabledFor(logging.DEBUG):
                near = backtest.matched(h)
                log.debug(
                    "step %d (%.2fx the window span): %s is the best of %d candidate(s), backtest error %s "
                    "near there (stopping: %s)",
                    target,
                    h,
                    fit.describe(),
                    len(candidates),
                    _pct(backtest.error(fit, near, output.scale)),
                    _pct(backtest.error(STOP, near)),
                )
        if by_backtest and backtest.on_grid_edge(fit):
            grid = sorted({c.shape for c in backtest.candidates if c.family == fit.family and c.shape is not None})
            notes.append(
                f"step {target}: the backtest chose {fit.describe()}, at the edge of the {fit.family} grid it tried "
                f"({grid[0]:.4g} .. {grid[-1]:.4g}); the best {fit.curve_family.shape.key} may lie beyond it"
            )
        chosen.append(fit)
        # a target inside the window is interpolation (planning warns): the backtest judges
        # extrapolation past the window's end only, so it gets no verdict
        extrapolating = output.mode == "extrapolate" and target > last
        verdicts.append(judge(backtest, target, fit, by_backtest, last, rule, output.scale) if extrapolating else None)
    return Assessment(backtest, chosen, verdicts, notes)


def judge(
    backtest: Backtest,
    target: int,
    fit: FitSpec,
    chosen_by_backtest: bool,
    last_step: int,
    rule: VerdictRule | float = DEFAULT_RULE,
    scale: float = 1.0,
) -> TargetVerdict:
    """What the backtest says about predicting ``target`` with ``fit`` (already resolved)
    times ``scale``, by ``rule`` (a number: the default rule with that tolerance)."""
    if not isinstance(rule, VerdictRule):
        rule = DEFAULT_RULE.with_tolerance(rule)
    tolerance = rule.tolerance
    h = horizon(backtest.steps, target)
    ids = backtest.matched(h)
    supported = backtest.supported_horizon(fit, tolerance, scale)
    better = None
    if not chosen_by_backtest and fit in backtest.candidates:
        alternative = backtest.best(h, scale=scale)
        if alternative != fit and backtest.error(alternative, ids, scale) < backtest.error(fit, ids, scale) * (1 - TIE):
            alt_support = backtest.supported_horizon(alternative, tolerance, scale)
            if alt_support is not None and alt_support >= min(h, backtest.tested_horizon):
                better = alternative
    return TargetVerdict(
        target=target,
        horizon=h,
        fit=fit,
        chosen_by_backtest=chosen_by_backtest,
        error=backtest.error(fit, ids, scale),
        stop_error=backtest.error(STOP, ids),
        at_horizon=sum(backtest.points[i].horizon for i in ids) / len(ids) if ids else math.nan,
        supported_horizon=supported,
        tested_horizon=backtest.tested_horizon,
        tolerance=tolerance,
        last_step=last_step,
        better_fit=better,
        scale=scale,
        margin=rule.margin,
        reach=rule.reach,
    )

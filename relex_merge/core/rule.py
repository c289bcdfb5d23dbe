"""The verdict rule: when a prediction counts as supported. Plain numbers (no torch), so the
command line can show the defaults without loading the math."""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["DEFAULT_TOLERANCE", "WORDS", "VerdictRule", "DEFAULT_RULE"]

DEFAULT_TOLERANCE = 0.2  # whole-model relative error under which a fit counts as holding
WORDS = ("supported", "not supported", "untested")  # the three verdicts


@dataclass(frozen=True)
class VerdictRule:
    """When a prediction counts as supported ("go"). A target is *untested* when the window is too
    short to backtest or the target lies beyond ``reach`` times the longest horizon the window can
    test; it is *supported* when the fit held (backtest error <= ``tolerance``) at every tested
    horizon up to the target's (or up to the longest tested, for a target beyond it) and, near
    the target's horizon, its error is below ``margin`` times that of stopping at the last fitted
    checkpoint; otherwise *not supported*. The defaults are measured on scored runs
    (demo/calibration/verdict.py, leave-one-run-out; demo/calibration/verdict.md): on the
    calibration corpus they say go on none of the real predictions, and no rule on the tuning
    grids reaches 90 % precision of go on held-out runs, so they are kept (see docs/results.md,
    "The verdict, measured")."""

    tolerance: float = DEFAULT_TOLERANCE
    margin: float = 1.0
    reach: float = 1.0

    def with_tolerance(self, tolerance: float | None) -> VerdictRule:
        """The rule with the user's --tolerance (None: unchanged)."""
        return self if tolerance is None else replace(self, tolerance=tolerance)


DEFAULT_RULE = VerdictRule()

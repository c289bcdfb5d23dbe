"""relex_merge.core.backtest against expectations written here: the holdout plan by hand, the
whole-model sums against a dense backtest on the explicit deltas (SVD of the first K deltas, the
family's own least squares, the held-out delta), the sine route on an exact sinusoid, and the
verdicts. Found by mutation testing (scripts/mutation.py)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch

from relex_merge.core import fits
from relex_merge.core.backtest import (
    STOP,
    Backtest,
    HoldoutSums,
    auto_candidates,
    fit_counts,
    hint_candidates,
    holdouts,
    horizon,
    window_steps,
)
from relex_merge.core.relex import FitSpec, RelexSpec
from relex_merge.core.rule import VerdictRule
from relex_merge.core.verdict import TargetVerdict, assess, config_hint, judge
from tests.helpers import dense_direct, dense_refit, fit_curve

F64 = torch.float64


# ---- the plan of holdout points ------------------------------------------------------------


def test_fit_counts_are_quarter_third_half_two_thirds_and_the_fewest_needed():
    # ceil(n * f) for f in 1/4, 1/3, 1/2, 2/3, and the fewest points the fits need (at least 2),
    # keeping those that leave a checkpoint to predict
    assert fit_counts(12, 3) == [3, 4, 6, 8]
    assert fit_counts(12, 5) == [5, 6, 8]
    assert fit_counts(12, 1) == [2, 3, 4, 6, 8]
    assert fit_counts(5, 4) == [4]
    assert fit_counts(4, 4) == []


def test_holdouts_predict_every_later_checkpoint_at_its_horizon():
    steps = [1, 2, 4, 7, 11]  # fit counts 2, 3, 4
    got = [(h.fit_count, h.step, h.horizon) for h in holdouts(steps, 2)]
    assert got == [(2, 4, 2.0), (2, 7, 5.0), (2, 11, 9.0), (3, 7, 1.0), (3, 11, 7 / 3), (4, 11, 4 / 6)]


def test_horizon_and_window_steps():
    assert horizon([2, 5, 8], 14) == 1.0
    assert horizon([2, 5, 8], 5) == -0.5
    assert math.isnan(horizon([3, 3], 9))
    assert window_steps([1, 2, 4, 7, 11], RelexSpec(window=3)) == [4, 7, 11]
    assert window_steps([1, 2, 4], RelexSpec()) == [1, 2, 4]


def test_holdout_sums_add_up_and_read_as_error_cosine_norm_ratio():
    total = HoldoutSums()
    total.add(HoldoutSums(err2=1.0, true2=4.0, pred2=2.0, dot=1.5))
    total.add(HoldoutSums(err2=2.0, true2=5.0, pred2=6.0, dot=3.5))
    assert (total.err2, total.true2, total.pred2, total.dot) == (3.0, 9.0, 8.0, 5.0)
    assert total.relative_error == pytest.approx(math.sqrt(3 / 9))
    assert total.cosine == pytest.approx(5 / math.sqrt(72))
    assert total.norm_ratio == pytest.approx(math.sqrt(8 / 9))


def test_candidates_cover_every_auto_family_and_its_grid_from_the_base_step():
    spec = RelexSpec(fit=FitSpec("auto", origin_step=2.0), window=3)
    steps = [1, 4, 6, 10]  # the window: 4, 6, 10; its reach from the base step: 8
    got = auto_candidates(spec, steps)
    expected = []
    for fam in fits.families():
        if fam.in_auto:
            if fam.shape is None:
                expected.append(FitSpec(fam.name, None, 2.0))
            else:
                scale = 8.0 if fam.shape.grid_in_window_spans else 1.0
                expected += [FitSpec(fam.name, g * scale, 2.0) for g in fam.shape.grid]
    assert got == expected
    assert {c.family for c in got} == {
        "linear_origin",
        "linear",
        "average",
        "ema",
        "expo",
        "polynomial",
        "power",
        "log",
        "saturating",
        "sine",
    }
    # the hints are the cheap curve families (a fixed linear map of the coefficients)
    assert hint_candidates(spec, steps) == [c for c in expected if c.family not in ("sine", "average", "ema", "expo")]


# ---- the sums against a dense backtest --------------------------------------------------------


def planted(steps, d=300, seed=0, noise=0.02):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(2, d, generator=gen, dtype=F64)
    s = torch.tensor(steps, dtype=F64)
    coef = torch.stack([0.4 * s**0.5, 0.02 * s], 1)
    return coef @ v + noise * torch.randn(len(steps), d, generator=gen, dtype=F64)


def dense_point(m, steps, k, j, fit: FitSpec | str, rank):
    """err2, true2, pred2, dot of predicting delta j from the first k deltas."""
    if fit == STOP:
        pred = m[k - 1]
    elif fit.family in ("expo", "average", "ema"):  # the raw checkpoints, written out in tests/helpers.py
        pred = dense_direct(None, list(m[:k]), steps[:k], steps[j], fit.family, fit.shape)
    else:
        u, sigma, vh = torch.linalg.svd(m[:k], full_matrices=False)
        r = min(rank, k)
        coefficients = (u * sigma)[:, :r]
        predicted = fit_curve(fit.family, steps[:k], coefficients, fit.shape, fit.origin_step)([steps[j]])[0]
        pred = predicted @ vh[:r]
    true = m[j]
    return [float((pred - true) @ (pred - true)), float(true @ true), float(pred @ pred), float(pred @ true)]


def test_backtest_sums_equal_a_dense_backtest_on_the_deltas():
    """Two tensors, a window of the last 9 of 11 checkpoints, rank 2, base step 0.5: linear,
    power and stopping, each point's err2 / true2 / pred2 / dot summed over the tensors."""
    all_steps = [1, 2, 3, 4, 6, 7, 9, 10, 12, 13, 15]
    spec = RelexSpec(rank=2, window=9)
    candidates = [
        FitSpec("linear", None, 0.5),
        FitSpec("power", 0.5, 0.5),
        FitSpec("expo", 0.7, 0.5),
        FitSpec("average", 3, 0.5),
        FitSpec("ema", 2.5, 0.5),
    ]
    tensors = [planted(all_steps, seed=s) for s in (0, 1)]
    backtest = Backtest.for_fits(all_steps, spec, candidates)
    for m in tensors:
        backtest.add(m @ m.T)
    backtest.add(torch.full((11, 11), math.nan, dtype=F64))  # a non-finite tensor is left out
    as32, as64 = Backtest.for_fits(all_steps, spec, candidates), Backtest.for_fits(all_steps, spec, candidates)
    for m in tensors:  # float32 Gram matrices are promoted before any arithmetic
        as32.add((m @ m.T).float())
        as64.add((m @ m.T).float().double())
    for key in candidates:
        assert [s.err2 for _, s in as32.curve(key)] == [s.err2 for _, s in as64.curve(key)]
    steps = all_steps[2:]
    assert backtest.steps == steps
    points = [(p.fit_count, steps.index(p.step)) for p in backtest.points]
    assert sorted({k for k, _ in points}) == fit_counts(9, 4)
    for key in candidates:
        for point, got in backtest.curve(key):
            k, j = point.fit_count, steps.index(point.step)
            expected = [sum(x) for x in zip(*(dense_point(m[2:], steps, k, j, key, 2) for m in tensors))]
            assert [got.err2, got.true2, got.pred2, got.dot] == pytest.approx(expected, rel=1e-8), (key, k, j)
    assert backtest.order() == sorted(
        range(len(points)), key=lambda i: (backtest.points[i].horizon, backtest.points[i].fit_count)
    )


@pytest.mark.parametrize(
    "rank",
    [
        20,  # at least the fit count: the subspace is everything, and stopping is the checkpoint itself
        1,  # below it: stopping is still the checkpoint itself, not its rank-1 projection
    ],
)
def test_stopping_is_scored_as_the_last_fitted_checkpoint(rank):
    all_steps = [1, 2, 3, 4, 6, 7, 9, 10, 12, 13, 15]
    tensors = [planted(all_steps, seed=s) for s in (0, 1)]
    backtest = Backtest(all_steps, RelexSpec(rank=rank), [FitSpec("linear")])
    for m in tensors:
        backtest.add(m @ m.T)
    for point, got in backtest.curve(STOP):
        k, j = point.fit_count, all_steps.index(point.step)
        expected = [sum(x) for x in zip(*(dense_point(m, all_steps, k, j, STOP, rank) for m in tensors))]
        assert [got.err2, got.true2, got.pred2, got.dot] == pytest.approx(expected, rel=1e-8), (k, j)


def test_backtest_of_sine_on_an_exact_sinusoid_has_no_error_once_the_fit_sees_a_period():
    steps = list(range(1, 25))
    v = torch.randn(200, generator=torch.Generator().manual_seed(3), dtype=F64)
    c = torch.tensor([0.8 * math.sin(2 * math.pi * 0.13 * s + 0.4) + 1.2 for s in steps], dtype=F64)
    m = c.unsqueeze(1) * v
    backtest = Backtest(steps, RelexSpec(), [FitSpec("sine")])
    backtest.add(m @ m.T)
    backtest.add(torch.zeros(24, 24, dtype=F64))  # a tensor that never moved adds nothing
    long_fits = [(p, s) for p, s in backtest.curve(FitSpec("sine")) if p.fit_count >= 12]
    assert len(long_fits) > 10
    for point, sums in long_fits:
        true2 = float(c[steps.index(point.step)] ** 2 * (v @ v))
        assert sums.true2 == pytest.approx(true2, rel=1e-12)
        assert sums.pred2 == pytest.approx(true2, rel=1e-6) and sums.dot == pytest.approx(true2, rel=1e-6)
        assert sums.err2 < 1e-10 * true2


# ---- reading the sums: matched points, errors, support, the best fit, verdicts --------------


def line_backtest(curve=lambda s: 0.3 * s + 0.1, noise=1e-3, steps=tuple(range(1, 13))):
    steps = list(steps)
    gen = torch.Generator().manual_seed(0)
    grams = []
    for _ in range(2):
        v = torch.randn(400, generator=gen, dtype=F64)
        m = torch.stack([curve(s) * v + noise * torch.randn(400, generator=gen, dtype=F64) for s in steps])
        grams.append(m @ m.T)
    return steps, grams


def test_matched_points_are_within_a_factor_of_two_of_the_horizon():
    steps, grams = line_backtest()
    bt = Backtest(steps, RelexSpec(), [FitSpec("linear")])
    for g in grams:
        bt.add(g)
    hs = [p.horizon for p in bt.points]
    assert bt.tested_horizon == max(hs)
    for h in (0.25, 0.5, 1.0, 2 * min(hs), max(hs) / 2):  # the last two: points exactly on the bounds
        assert bt.matched(h) == [i for i, x in enumerate(hs) if h / 2 <= x <= 2 * h]
    assert bt.matched(0.0) == bt.matched(-0.3)  # a target at the window's last step is inside it
    assert bt.matched(100.0) == bt.matched(bt.tested_horizon)  # beyond: the longest tested
    inside = bt.matched(-0.3)  # a target inside the window: each fit count's shortest horizon
    assert sorted({bt.points[i].fit_count for i in inside}) == sorted({p.fit_count for p in bt.points})
    for i in inside:
        k = bt.points[i].fit_count
        assert bt.points[i].horizon == min(p.horizon for p in bt.points if p.fit_count == k)
    ids = bt.matched(1.0)
    err2 = sum(float(bt._totals[FitSpec("linear")][i, 0]) for i in ids)
    true2 = sum(float(bt._totals[FitSpec("linear")][i, 1]) for i in ids)
    assert bt.error(FitSpec("linear"), ids) == pytest.approx(math.sqrt(err2 / true2))
    assert math.isnan(bt.error(FitSpec("linear"), []))
    tiny = Backtest(steps, RelexSpec(), [FitSpec("linear")])  # deltas a thousand times smaller
    for g in grams:
        tiny.add(g * 1e-6)
    assert tiny.error(FitSpec("linear"), ids) == pytest.approx(bt.error(FitSpec("linear"), ids), rel=1e-6)
    frozen = Backtest(steps, RelexSpec(), [FitSpec("linear")])  # no tensor moved: nothing to compare with
    frozen.add(torch.zeros(12, 12, dtype=F64))
    assert math.isnan(frozen.error(FitSpec("linear"), ids))
    empty = Backtest([1, 2, 3], RelexSpec(), [FitSpec("linear")])
    assert empty.points == [] and empty.matched(1.0) == [] and empty.tested_horizon == 0.0


def test_supported_horizon_is_the_longest_that_every_shorter_point_held():
    steps, grams = line_backtest(curve=lambda s: math.sqrt(s), noise=1e-4)
    bt = Backtest(steps, RelexSpec(), [FitSpec("linear"), FitSpec("power", 0.5)])
    for g in grams:
        bt.add(g)
    for key in (FitSpec("linear"), FitSpec("power", 0.5)):
        for tolerance in (0.01, 0.05, 0.2, 1.0):
            expected = None
            for i in bt.order():
                e = bt.error(key, [i])
                if not e <= tolerance:  # tolerance only: beating stopping is judged at the target
                    break
                expected = bt.points[i].horizon
            assert bt.supported_horizon(key, tolerance) == expected
    assert bt.supported_horizon(FitSpec("power", 0.5), 0.01) == bt.tested_horizon  # the true family
    assert bt.supported_horizon(FitSpec("linear"), 0.01) is None


def test_best_prefers_the_simpler_family_within_the_tie():
    steps, grams = line_backtest(noise=0.0)  # exactly linear: linear and the quadratic fit it to rounding
    keys = [FitSpec("linear"), FitSpec("polynomial", 2.0), FitSpec("power", 0.5)]
    bt = Backtest(steps, RelexSpec(), keys)
    for g in grams:
        bt.add(g)
    assert bt.best(1.0) == FitSpec("linear")
    assert bt.best_over(bt.matched(1.0), keys[1:]) == FitSpec("polynomial", 2.0)
    curved_steps, curved = line_backtest(curve=lambda s: math.sqrt(s), noise=0.0)
    bt = Backtest(curved_steps, RelexSpec(), keys)
    for g in curved:
        bt.add(g)
    assert bt.best(1.0) == FitSpec("power", 0.5)
    assert Backtest([1, 2, 3], RelexSpec(), keys).best(1.0) == keys[0]  # no point to judge by


@pytest.mark.parametrize(
    "errors,best",
    [
        ((0.1009, 0.1, 0.05), 2),  # a clear winner
        ((0.1009, 0.1, 0.2), 0),  # within 1% of the lowest: the simpler family
        ((0.1013, 0.1, 0.2), 1),  # outside 1% + 0.0001
        ((0.00019, 0.0001, 0.2), 0),  # within 0.01 percentage points
        ((0.00021, 0.0001, 0.2), 1),
        ((math.nan, 0.3, 0.2), 2),  # a candidate without a number loses
    ],
)
def test_ties_within_one_percent_or_a_hundredth_of_a_point_go_to_the_simpler(errors, best):
    keys = [FitSpec("linear"), FitSpec("polynomial", 2.0), FitSpec("power", 0.5)]
    bt = Backtest(list(range(1, 9)), RelexSpec(), keys)
    for key, e in zip(keys, errors):  # every point: err2 = e^2, true2 = 1
        bt._totals[key][:, 0] = e * e
        bt._totals[key][:, 1] = 1.0
    assert bt.best_over(range(len(bt.points))) == keys[best]


def verdict_for(curve, target, fit=FitSpec("linear"), tolerance=0.2, noise=1e-4):
    steps, grams = line_backtest(curve=curve, noise=noise)
    return assess(grams, steps, [target], [RelexSpec(fit=fit)], tolerance).verdicts[0]


def test_verdict_line_of_a_supported_target():
    steps, grams = line_backtest(curve=lambda s: 0.3 * s + 0.1, noise=1e-4)
    a = assess(grams, steps, [18], [RelexSpec()])
    v = a.verdicts[0]
    assert v.supported and not v.beyond_tested and v.better_fit is None and v.fit == FitSpec("linear")
    ids = a.backtest.matched(6 / 11)
    assert v.at_horizon == pytest.approx(sum(a.backtest.points[i].horizon for i in ids) / len(ids))
    assert v.line() == (
        f"SUPPORTED: step 18 is 0.5x the window span past its end; linear holds up to "
        f"{v.supported_horizon:.1f}x (backtest error {v.error:.0%} near {v.at_horizon:.1f}x vs "
        f"{v.stop_error:.0%} for stopping)."
    )
    assert v.as_dict() == {
        "target_step": 18,
        "horizon": round(6 / 11, 4),
        "fit": "linear",
        "scale": 1.0,
        "chosen_by_backtest": False,
        "verdict": "supported",
        "supported": True,
        "supported_horizon": round(v.supported_horizon, 4),
        "tested_horizon": round(v.tested_horizon, 4),
        "backtest_error": round(v.error, 4),
        "stop_error": round(v.stop_error, 4),
        "tolerance": 0.2,
        "margin": 1.0,
        "reach": 1.0,
    }


def test_verdict_line_beyond_the_tested_horizon():
    v = verdict_for(lambda s: 0.3 * s + 0.1, 60)
    assert not v.supported and v.beyond_tested and v.word == "untested"
    assert v.line() == (
        f"UNTESTED: step 60 is 4.4x the window span past its end, beyond the {v.tested_horizon:.1f}x this "
        f"window can test (backtest error {v.error:.0%} near {v.at_horizon:.1f}x vs {v.stop_error:.0%} for "
        "stopping); nothing here says whether linear beats stopping at step 12: evaluate it (relex-merge sweep) "
        "before use."
    )
    # a rule that reaches twice as far judges it, and the line held everywhere
    far = replace(v, reach=2.0)
    assert far.word == "supported" and far.line().startswith(
        f"SUPPORTED: step 60 is 4.4x the window span past its end; linear held at every horizon tested, up to "
        f"{v.tested_horizon:.1f}x ("
    )


def test_verdict_line_of_a_fit_that_holds_only_part_of_the_way():
    v = verdict_for(lambda s: math.sqrt(s + 3), 30, tolerance=0.05)
    assert v.supported_horizon is not None and not v.supported and v.error < v.stop_error
    assert v.line().startswith(
        f"NOT SUPPORTED: step 30 is 1.6x the window span past its end; linear holds only "
        f"up to {v.supported_horizon:.1f}x (backtest error {v.error:.0%} near "
        f"{v.at_horizon:.1f}x vs {v.stop_error:.0%} for stopping); closer than stopping there, but "
        f"beyond the 5% tolerance: do not rely on it; evaluate it against the last "
        f"window checkpoint (step 12) before use."
    )
    assert v.better_fit is not None and v.better_fit.family != "linear"
    assert v.line().endswith(f" {v.better_fit.describe()} holds here: {config_hint(v.better_fit)}.")


def test_verdict_line_when_stopping_is_closer():
    gen = torch.Generator().manual_seed(5)
    steps = list(range(1, 17))
    grams = []
    for _ in range(2):
        walk = torch.cumsum(torch.randn(len(steps), 500, generator=gen, dtype=F64), 0)
        grams.append(walk @ walk.T)
    v = assess(
        grams,
        steps,
        [100],
        [
            RelexSpec(),
        ],
        rule=VerdictRule(reach=math.inf),
    ).verdicts[0]
    assert v.supported_horizon is None and v.error >= v.stop_error and v.beyond_tested
    assert v.line() == (
        f"NOT SUPPORTED: step 100 is 5.6x the window span past its end; linear held at no horizon "
        f"the window can test (backtest error {v.error:.0%} near {v.at_horizon:.1f}x vs "
        f"{v.stop_error:.0%} for stopping); stopping at step 16 is closer: do not extrapolate from "
        f"this window. The window can test horizons up to {v.tested_horizon:.1f}x only."
    )
    assert assess(grams, steps, [100], [RelexSpec()]).verdicts[0].word == "untested"  # the default reach


def test_verdict_of_a_window_too_short_to_backtest():
    steps, grams = [1, 2, 3], [torch.eye(3, dtype=F64)]
    v = assess(grams, steps, [10], [RelexSpec()]).verdicts[0]
    assert math.isnan(v.error) and not v.supported and v.word == "untested"
    assert v.line() == (
        "UNTESTED: step 10: the window is too short to backtest (it needs more checkpoints "
        "than the fit uses); evaluate the prediction before use."
    )
    assert v.as_dict()["backtest_error"] != v.as_dict()["backtest_error"]  # NaN, written as such


def test_config_hint_names_the_family_and_its_shape():
    assert config_hint(FitSpec("power", 0.5)) == "set `fit: power` and `p: 0.5` under parameters (or fit: auto)"
    assert config_hint(FitSpec("linear")) == "set `fit: linear` under parameters (or fit: auto)"
    assert config_hint(FitSpec("log")) == "set `fit: log` under parameters (or fit: auto)"


def test_assess_resolves_each_output_and_judges_only_extrapolation():
    steps, grams = line_backtest(curve=lambda s: math.sqrt(s), noise=1e-4)
    specs = [
        RelexSpec(fit=FitSpec("auto")),
        RelexSpec(fit=FitSpec("log")),
        RelexSpec(fit=FitSpec("power", 0.5)),
        RelexSpec(mode="fit_reconstruct"),
    ]
    a = assess(grams, steps, [24, 24, 24, 6], specs)
    assert a.fits[0].family != "linear" and a.fits[0].resolved == a.fits[0]
    assert a.fits[1].family == "log" and a.fits[1].shape is not None  # the shape chosen on its grid
    assert a.fits[2] == FitSpec("power", 0.5)
    assert [v is None for v in a.verdicts] == [False, False, False, True]
    assert a.verdicts[0].chosen_by_backtest and a.verdicts[1].chosen_by_backtest
    assert not a.verdicts[2].chosen_by_backtest
    assert a.verdicts[1].better_fit is None  # its shape was the backtest's choice already
    assert a.unsupported == [v for v in a.verdicts[:3] if not v.supported]
    # the log shape chosen is the best of its grid near the target's horizon
    bt = a.backtest
    grid = [c for c in bt.candidates if c.family == "log"]
    errors = {c: bt.error(c, bt.matched(horizon(steps, 24))) for c in grid}
    assert errors[a.fits[1]] <= min(errors.values()) * 1.01 + 1e-4


def test_verdict_line_of_support_short_of_the_tested_horizon():
    """Supported to 2.0x of the 2.7x tested: not 'held at every horizon tested'."""
    v = verdict_for(lambda s: math.sqrt(s + 3), 40, tolerance=0.1)
    assert v.supported_horizon == 2.0 and v.tested_horizon == pytest.approx(8 / 3) and not v.supported
    assert v.line().startswith(
        "NOT SUPPORTED: step 40 is 2.5x the window span past its end; linear holds only up to 2.0x (backtest error"
    )


def test_assess_names_the_fit_the_backtest_chose():
    steps, grams = line_backtest(curve=lambda s: math.sqrt(s), noise=1e-4)
    a = assess(grams, steps, [20], [RelexSpec(fit=FitSpec("auto"))])
    assert f"; {a.fits[0].describe()} (chosen by the backtest) holds up to" in a.verdicts[0].line()
    fixed = assess(grams, steps, [20], [RelexSpec(fit=a.fits[0])])
    assert f"; {a.fits[0].describe()} holds up to" in fixed.verdicts[0].line()


def backtest_with_errors(errors: dict, stop: float, steps=tuple(range(1, 13))):
    """A backtest whose every point has the given relative error per candidate (err2 = e^2,
    true2 = 1), so the verdict's rules can be checked against numbers chosen by hand."""
    keys = list(errors)
    bt = Backtest(list(steps), RelexSpec(), keys)
    for key, e in [*errors.items(), (STOP, stop)]:
        bt._totals[key][:, 0] = e * e
        bt._totals[key][:, 1] = 1.0
    return bt


@pytest.mark.parametrize(
    "linear,power,tolerance,better",
    [
        (0.05, 0.3, 0.2, True),  # clearly better, and it holds
        (0.1005, 0.1, 0.2, False),  # the simpler family is within 1%: no hint
        (0.096, 0.1, 0.2, True),  # 4% better
        (0.0992, 0.1, 0.2, False),  # less than 1% better: not named
        (0.1, 0.3, 0.08, False),  # better, but does not hold under the tolerance
    ],
)
def test_verdict_names_a_better_fit_only_when_it_is_clearly_better_and_holds(linear, power, tolerance, better):
    linear_fit, power_fit = FitSpec("linear"), FitSpec("power", 0.5)
    bt = backtest_with_errors({linear_fit: linear, power_fit: power}, stop=0.5)
    for target in (18, 60):  # inside the tested horizon, and beyond it
        v = judge(bt, target, power_fit, chosen_by_backtest=False, last_step=12, rule=tolerance)
        assert v.better_fit == (linear_fit if better else None), target
        assert v.supported_horizon == (bt.tested_horizon if power <= tolerance else None)


def test_a_fit_chosen_by_the_backtest_gets_no_alternative():
    linear_fit, power_fit = FitSpec("linear"), FitSpec("power", 0.5)
    bt = backtest_with_errors({linear_fit: 0.05, power_fit: 0.1}, stop=0.5)
    assert judge(bt, 18, power_fit, chosen_by_backtest=True, last_step=12).better_fit is None


def test_backtest_of_a_refit_equals_the_reference_loop():
    """Autoregressive re-fitting is backtested as it extrapolates: each point's prediction runs
    the reference loop (fit on the last 3, predict 2 ahead, append, re-fit) from its fit count."""
    steps = list(range(1, 12))
    spec = RelexSpec(rank=2, fit=FitSpec("power", 0.5), refit_every=2, refit_window=3)
    tensors = [planted(steps, seed=s) for s in (0, 1)]
    bt = Backtest(steps, spec, [spec.fit])
    for m in tensors:
        bt.add(m @ m.T)
    for point, got in bt.curve(spec.fit):
        k, j = point.fit_count, steps.index(point.step)
        expected = [0.0, 0.0, 0.0, 0.0]
        for m in tensors:
            u, sigma, vh = torch.linalg.svd(m[:k], full_matrices=False)
            coefficients = (u * sigma)[:, :2]
            pred = dense_refit(steps[:k], coefficients, steps[j], "power", 0.5, 2, 3) @ vh[:2]
            true = m[j]
            for n, x in enumerate([(pred - true) @ (pred - true), true @ true, pred @ pred, pred @ true]):
                expected[n] += float(x)
        assert [got.err2, got.true2, got.pred2, got.dot] == pytest.approx(expected, rel=1e-8), (k, j)


def test_backtest_of_a_sine_refit_uses_only_the_refit_window():
    """The first two checkpoints are off the sinusoid; re-fitting on the last 10 never sees them,
    so every point fitted on 12 or more checkpoints is predicted exactly."""
    steps = list(range(1, 25))
    v = torch.randn(200, generator=torch.Generator().manual_seed(4), dtype=F64)
    c = torch.tensor(
        [0.8 * math.sin(2 * math.pi * 0.13 * s + 0.4) + 1.2 + (1.5 if s <= 2 else 0.0) for s in steps], dtype=F64
    )
    m = c.unsqueeze(1) * v
    spec = RelexSpec(fit=FitSpec("sine"), refit_every=1, refit_window=10)
    bt = Backtest(steps, spec, [spec.fit])
    bt.add(m @ m.T)
    late = [(p, s) for p, s in bt.curve(spec.fit) if p.fit_count >= 12]
    assert len(late) > 10
    for point, sums in late:
        assert sums.err2 < 1e-10 * sums.true2, point


def test_the_verdict_judges_the_output_at_its_scale():
    """An exact line predicts each held-back delta t exactly, so scale s is off by |s - 1| ||t||."""
    steps, grams = line_backtest(noise=0.0)
    a = assess(grams, steps, [18, 18, 18], [RelexSpec(), RelexSpec(scale=3.0), RelexSpec(scale=0.5)])
    one, three, half = a.verdicts
    assert one.error == pytest.approx(0.0, abs=1e-6) and one.supported
    assert three.error == pytest.approx(2.0, rel=1e-6) and not three.supported and three.scale == 3.0
    assert half.error == pytest.approx(0.5, rel=1e-6) and not half.supported
    assert three.stop_error == one.stop_error  # stopping has no scale
    assert three.supported_horizon is None and "linear at scale 3 held at no horizon" in three.line()
    assert three.as_dict()["scale"] == 3.0


def test_auto_chooses_the_fit_for_the_scaled_output():
    """Scaled by 0.6, a line through a sqrt-shaped run can beat the sqrt fit itself: auto judges
    what will be written, so its choice may change with the scale, and its error is the lowest."""
    steps, grams = line_backtest(curve=lambda s: math.sqrt(s), noise=0.0)
    keys = [FitSpec("linear"), FitSpec("power", 0.5)]
    bt = Backtest(steps, RelexSpec(), keys)
    for g in grams:
        bt.add(g)
    ids = bt.matched(1.0)
    for scale in (0.6, 1.0, 1.4):
        chosen = bt.best(1.0, keys, scale)
        assert bt.error(chosen, ids, scale) == min(bt.error(k, ids, scale) for k in keys)
    assert bt.best(1.0, keys, 1.0) == FitSpec("power", 0.5)


def test_a_target_nearer_than_every_tested_horizon_is_judged_at_the_shortest():
    steps, grams = line_backtest()
    bt = Backtest(steps, RelexSpec(), [FitSpec("linear")])
    for g in grams:
        bt.add(g)
    shortest = min(p.horizon for p in bt.points)
    assert bt.matched(shortest / 10) == bt.matched(shortest) != []
    v = assess(grams, steps, [13], [RelexSpec()]).verdicts[0]  # 1/11 of the window span past its end
    assert v.horizon < shortest and not math.isnan(v.error) and v.supported


def test_held_everywhere_but_stopping_closer_says_do_not_extrapolate():
    v = TargetVerdict(
        target=100,
        horizon=8.0,
        fit=FitSpec("linear"),
        chosen_by_backtest=False,
        error=0.15,
        stop_error=0.1,
        at_horizon=3.0,
        supported_horizon=4.0,
        tested_horizon=4.0,
        tolerance=0.2,
        last_step=12,
        reach=math.inf,
    )
    assert v.line() == (
        "NOT SUPPORTED: step 100 is 8.0x the window span past its end; linear holds up to 4.0x, but stopping at "
        "step 12 is at least as close there (backtest error 15% near 3.0x vs 10% for stopping): do not "
        "extrapolate from this window."
    )


def test_an_error_that_rounds_to_the_tolerance_is_printed_with_a_decimal():
    v = TargetVerdict(
        target=30,
        horizon=1.5,
        fit=FitSpec("linear"),
        chosen_by_backtest=False,
        error=0.2031,
        stop_error=0.4,
        at_horizon=1.4,
        supported_horizon=None,
        tested_horizon=3.0,
        tolerance=0.2,
        last_step=12,
    )
    assert "(backtest error 20.3% near 1.4x vs 40.0% for stopping)" in v.line()
    assert "beyond the 20% tolerance" in v.line()
    assert "(backtest error 25% near" in replace(v, error=0.25).line()


def verdict_at(horizon, supported_horizon, tested, error, stop_error):
    return TargetVerdict(
        target=40,
        horizon=horizon,
        fit=FitSpec("linear"),
        chosen_by_backtest=False,
        error=error,
        stop_error=stop_error,
        at_horizon=1.0,
        supported_horizon=supported_horizon,
        tested_horizon=tested,
        tolerance=0.2,
        last_step=12,
    )


def test_verdict_boundaries_are_inclusive():
    """At exactly the supported horizon the fit holds; at exactly stopping's error stopping wins."""
    holds = verdict_at(horizon=2.0, supported_horizon=2.0, tested=3.0, error=0.1, stop_error=0.3)
    assert holds.supported and holds.line().startswith("SUPPORTED")
    tie = verdict_at(horizon=2.0, supported_horizon=2.0, tested=3.0, error=0.3, stop_error=0.3)
    assert not tie.supported
    assert tie.line() == (
        "NOT SUPPORTED: step 40 is 2.0x the window span past its end; linear holds up to 2.0x, "
        "but stopping at step 12 is at least as close there (backtest error 30% near 1.0x vs 30% "
        "for stopping): do not extrapolate from this window."
    )
    beyond = verdict_at(horizon=3.0001, supported_horizon=3.0, tested=3.0, error=0.1, stop_error=0.3)
    assert beyond.word == "untested"  # past the longest horizon tested (reach 1)
    at_edge = verdict_at(horizon=3.0, supported_horizon=3.0, tested=3.0, error=0.1, stop_error=0.3)
    assert at_edge.word == "supported"
    everywhere_tie = replace(verdict_at(5.0, 3.0, 3.0, error=0.3, stop_error=0.3), reach=2.0)
    assert "linear holds up to 3.0x, but stopping at step 12 is at least as close" in everywhere_tie.line()
    everywhere = replace(
        verdict_at(horizon=5.0, supported_horizon=3.0, tested=3.0, error=0.1, stop_error=0.3), reach=2.0
    )
    assert everywhere.supported and "held at every horizon tested, up to 3.0x (backtest error 10%" in everywhere.line()
    partway_tie = replace(
        verdict_at(horizon=5.0, supported_horizon=1.0, tested=3.0, error=0.3, stop_error=0.3), reach=2
    )
    assert "stopping at step 12 is closer: do not extrapolate" in partway_tie.line()
    margin = replace(holds, margin=0.3)  # error 0.1 vs 0.3 x 0.3 = 0.09: not enough below stopping
    assert margin.word == "not supported"
    assert "but its error there is not below 0.3x that of stopping at step 12" in margin.line()


def test_the_better_fit_hint_is_judged_at_the_outputs_scale():
    """Hand-set sums (true2 = 1 at every point): linear predicts t, power predicts 2t. At scale
    0.5 power is exact and linear is off by half, so power is named; at scale 1 it would not be."""
    linear, power = FitSpec("linear"), FitSpec("power", 0.5)
    bt = Backtest(list(range(1, 13)), RelexSpec(), [linear, power])
    for key, k in ((linear, 1.0), (power, 2.0)):  # prediction k t: pred2 = k^2, dot = k
        bt._totals[key][:] = torch.tensor([k * k - 2 * k + 1, 1.0, k * k, k], dtype=F64)
    bt._totals[STOP][:] = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    half = judge(bt, 30, linear, False, 12, 0.2, scale=0.5)
    assert half.error == pytest.approx(0.5) and half.better_fit == power
    assert judge(bt, 30, linear, False, 12, 0.2).better_fit is None


def test_relative_errors_do_not_depend_on_the_size_of_the_weights_at_any_scale():
    steps, grams = line_backtest(noise=0.0)
    bt, tiny = (Backtest(steps, RelexSpec(), [FitSpec("linear")]) for _ in range(2))
    for g in grams:
        bt.add(g)
        tiny.add(g * 1e-12)
    ids = bt.matched(1.0)
    for scale in (0.5, 3.0):
        assert tiny.error(FitSpec("linear"), ids, scale) == pytest.approx(bt.error(FitSpec("linear"), ids, scale))
        assert bt.error(FitSpec("linear"), ids, scale) == pytest.approx(abs(scale - 1), rel=1e-6)


def test_assess_chooses_auto_at_the_outputs_scale_and_logs_its_reasons(caplog):
    steps, grams = line_backtest(curve=lambda s: math.sqrt(s), noise=0.0)
    with caplog.at_level(logging.DEBUG, logger="relex_merge.core.verdict"):
        a = assess(grams, steps, [30], [RelexSpec(fit=FitSpec("auto"), scale=0.6)])
    bt, chosen = a.backtest, a.fits[0]
    h = horizon(steps, 30)
    near = bt.matched(h)
    errors = {key: bt.error(key, near, 0.6) for key in bt.candidates}
    assert errors[chosen] <= min(errors.values()) * (1 + 0.01) + 1e-4
    assert chosen != bt.best(h)  # at scale 1 the choice differs: the scale was used
    assert a.verdicts[0].error == pytest.approx(errors[chosen])
    fit_counts = sorted({p.fit_count for p in bt.points})
    assert caplog.messages == [
        f"backtest: {len(bt.candidates)} candidate fit(s) and stopping scored at {len(bt.points)} point(s) "
        f"(fit counts {fit_counts}, horizons up to {bt.tested_horizon:.2f}x)",
        f"step 30 ({h:.2f}x the window span): {chosen.describe()} is the best of {len(bt.candidates)} candidate(s), "
        f"backtest error {errors[chosen]:.0%} near there (stopping: {bt.error(STOP, near):.0%})",
    ]

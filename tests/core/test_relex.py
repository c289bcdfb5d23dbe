"""The RELEX math (relex_merge.core.relex): planted trajectories, equality with a dense SVD
reference, and its edges, each against a dense float64 expectation written here or in
tests/helpers.py (never the code under test): degenerate Gram matrices, the diagnostics,
autoregressive re-fitting, the fit registry."""

from __future__ import annotations

import itertools
import math
import re
import sys

import pytest
import torch

from relex_merge.core import fits, kernels
from relex_merge.core.kernels import Scratch, fold_grams, span_gram
from relex_merge.core.relex import (
    FitSpec,
    RelexSpec,
    diagnostics,
    linear_map,
    predict_coefficients,
    relex_weights,
    spec_from_parameters,
    top_components,
)
from relex_merge.engine import EngineOptions, MergeJob, run_job
from tests.helpers import (
    CollectSink,
    assert_close,
    dense_family,
    dense_refit,
    dense_relex,
    design,
    engine_outputs,
    fit_curve,
    random_window,
)


@pytest.mark.parametrize(
    "steps",
    [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 4, 7, 11, 16], [10, 20, 25, 60]],
    ids=["even", "uneven", "gappy"],
)
def test_planted_linear_trajectory_is_predicted_far_ahead(steps):
    gen = torch.Generator().manual_seed(1)
    d = 4000
    base = torch.randn(d, generator=gen)
    v = torch.randn(d, generator=gen)
    v /= v.norm()
    a, b, noise = 0.5, 0.3, 1e-3

    def truth(s):
        return base + (a * s + b) * v

    checkpoints = [{"x": truth(s) + noise * torch.randn(d, generator=gen)} for s in steps]
    target = 10 * steps[-1]
    sinks, _ = engine_outputs({"x": base}, checkpoints, steps, [target], RelexSpec())
    predicted = sinks[0].tensor("x")
    displacement = truth(target) - base
    err = (predicted - truth(target)).norm() / displacement.norm()
    # The direction estimate is off by about |noise| / ||M||_F radians; extrapolating the
    # fitted coefficient keeps that relative error. Allow 2x.
    signal = sum((a * s + b) ** 2 for s in steps) ** 0.5
    assert err < 2 * noise * d**0.5 / signal
    assert err < 0.02


CASES = [
    dict(rank=1, fit="linear"),
    dict(rank=3, fit="linear"),
    dict(rank=1, fit="linear_origin"),
    dict(rank=3, fit="linear_origin", base_step=0.0),
    dict(rank=1, fit="polynomial", degree=2),
    dict(rank=3, fit="polynomial", degree=3),
    dict(rank=1, fit="linear", window=4),
    dict(rank=3, fit="linear", window=4, scale=0.5),
    dict(rank=1, fit="linear", scale=1.7),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_engine_equals_dense_reference(case):
    base, checkpoints = random_window(n_ckpt=6)
    steps = [3, 5, 6, 9, 12, 14]
    targets = [30, 50, 100]
    spec = RelexSpec(
        rank=case["rank"],
        fit=FitSpec(
            case["fit"], case.get("degree", 2) if case["fit"] == "polynomial" else None, case.get("base_step", 0.0)
        ),
        window=case.get("window"),
        scale=case.get("scale", 1.0),
    )
    sinks, _ = engine_outputs(base, checkpoints, steps, targets, spec)
    for j, target in enumerate(targets):
        for name in base:
            expected = dense_relex(base[name], [c[name] for c in checkpoints], steps, target, **case)
            assert_close(sinks[j].tensor(name), expected.reshape(-1))


@pytest.mark.parametrize("rank", [1, 3])
def test_reconstruct_mode_equals_dense_reference(rank):
    base, checkpoints = random_window(n_ckpt=5, seed=3)
    steps = [2, 4, 6, 8, 10]
    targets = [4, 10]
    spec = RelexSpec(rank=rank, mode="reconstruct")
    sinks, _ = engine_outputs(base, checkpoints, steps, targets, spec)
    for j, target in enumerate(targets):
        for name in base:
            expected = dense_relex(
                base[name], [c[name] for c in checkpoints], steps, target, rank=rank, mode="reconstruct"
            )
            assert_close(sinks[j].tensor(name), expected.reshape(-1))


def test_reconstruct_with_full_rank_returns_the_observed_checkpoint():
    base, checkpoints = random_window(n_ckpt=4, seed=5)
    spec = RelexSpec(rank=4, mode="reconstruct")
    sinks, _ = engine_outputs(base, checkpoints, [1, 2, 3, 4], [3], spec)
    assert_close(sinks[0].tensor("w"), checkpoints[2]["w"].reshape(-1))


@pytest.mark.parametrize("rank,spec_kw", list(itertools.product([1, 3], [{}, {"window": 3}])))
def test_chunked_equals_unchunked(rank, spec_kw, monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1)  # Gram chunks of one row: spans of one row
    base, checkpoints = random_window(n_ckpt=5, shapes={"big": (64, 32), "vec": (300,)}, seed=7)
    spec = RelexSpec(rank=rank, **spec_kw)
    steps, targets = [1, 2, 3, 5, 8], [20, 40]
    whole, whole_stats = engine_outputs(base, checkpoints, steps, targets, spec)
    # 2 KB cannot hold 5+1 copies of even one row of "big": one row per span, on two workers
    chunked, chunked_stats = engine_outputs(base, checkpoints, steps, targets, spec, max_memory=2048)
    assert all(len(c) == 1 for c in whole[0].chunks.values())
    assert len(chunked[0].chunks["big"]) == 64
    assert all(r.passes == 2 for r in whole_stats.tensors + chunked_stats.tensors)
    for j in range(len(targets)):
        for name in base:  # the same chunks, added in the same order: the same bits
            assert torch.equal(chunked[j].tensor(name), whole[j].tensor(name))


def test_zero_deltas_copy_the_base_and_integers_are_copied():
    base = {"w": torch.randn(5, 3), "ids": torch.arange(7)}
    checkpoints = [{"w": base["w"].clone(), "ids": base["ids"] + 1} for _ in range(3)]
    sinks, stats = engine_outputs(base, checkpoints, [1, 2, 3], [10], RelexSpec())
    assert torch.equal(sinks[0].tensor("w"), base["w"].reshape(-1))
    assert torch.equal(sinks[0].tensor("ids"), base["ids"])
    reports = {r.name: r for r in stats.tensors}
    assert reports["w"].zero_delta and reports["ids"].diagnostics is None


def test_gram_accumulates_in_float64_across_blocks():
    """An RL-like window: weights near 1, deltas a thousand times smaller along one direction
    plus a little noise, over 8192 blocks of 8 columns. Each block's product is taken in float32;
    summed across blocks in float32 the Gram matrix misses the dense float64 one by ~1e-6 and its
    small eigenvalues (what rank > 1 and the diagnostics see) by ~1e-3; summed in float64 it
    keeps ~1e-9 and ~1e-6."""
    gen = torch.Generator().manual_seed(0)
    n, columns, steps = 1 << 16, 8, [1, 2, 3, 4]
    base = 1.0 + torch.randn(n, generator=gen)
    v = torch.randn(n, generator=gen)
    v *= n**0.5 / v.norm()
    inputs = [base] + [base + 1e-3 * s * v + 1e-4 * torch.randn(n, generator=gen) for s in steps]
    m = torch.stack([x.double() - base.double() for x in inputs[1:]])
    dense = m @ m.T
    gram = fold_grams(span_gram(inputs, Scratch.allocate(4, columns, torch.float32, torch.device("cpu")), n))
    assert float((gram.double() - dense).norm() / dense.norm()) < 2e-8
    eig, dense_eig = torch.linalg.eigvalsh(gram.double()), torch.linalg.eigvalsh(dense)
    assert dense_eig[0] < 1e-3 * dense_eig[-1]  # three small eigenvalues: noise next to the trajectory
    assert float(((eig - dense_eig) / dense_eig).abs().max()) < 5e-5
    assert gram.dtype == torch.float64


def test_small_components_are_dropped():
    v = torch.randn(100, dtype=torch.float64)
    m = torch.stack([v * k for k in (1.0, 2.0, 3.0)])
    sigma, u = top_components(m @ m.T, rank=3)
    assert sigma.numel() == 1


def test_fit_uses_step_values_not_positions():
    steps = [1.0, 2.0, 4.0, 8.0]
    x = torch.tensor(steps, dtype=torch.float64)
    values = (3.0 * x + 1.0).unsqueeze(1)
    pred = predict_coefficients(steps, values, [16.0], RelexSpec(fit=FitSpec("linear")))
    assert pred.item() == pytest.approx(49.0)
    pred0 = predict_coefficients(steps, 2.0 * x.unsqueeze(1), [10.0], RelexSpec(fit=FitSpec("linear_origin")))
    assert pred0.item() == pytest.approx(20.0)


def test_mixed_input_dtypes_with_odd_sizes(tmp_path):
    """A bf16 base with fp32 checkpoints (odd element counts): reads land on aligned buffers."""
    from safetensors.torch import save_file

    from relex_merge.io.formats.safetensors import SafetensorsReader

    gen = torch.Generator().manual_seed(0)
    base = {"odd": torch.randn(7, 3, generator=gen).to(torch.bfloat16), "v": torch.randn(5, generator=gen).bfloat16()}
    save_file(base, tmp_path / "base.safetensors")
    checkpoints = []
    for k in range(3):
        state = {n: t.float() + 0.01 * (k + 1) * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        save_file(state, tmp_path / f"c{k}.safetensors")
        checkpoints.append(SafetensorsReader(tmp_path / f"c{k}.safetensors"))
    job = MergeJob(SafetensorsReader(tmp_path / "base.safetensors"), checkpoints, [1, 2, 3], [6], RelexSpec())
    sinks = [CollectSink()]
    run_job(job, sinks, EngineOptions(max_memory=1 << 20))
    for name, t in base.items():
        expected = dense_relex(t.float(), [c.read(name) for c in checkpoints], [1, 2, 3], 6)
        assert_close(sinks[0].tensor(name).float(), expected.reshape(-1), rel=1e-2)  # output in base's bf16


# ---- edges (first found by mutation testing) ----------------------------------------


F64 = torch.float64


def trend_deltas(steps, d=40, seed=0, scale=1.0):
    """T x d deltas: a curved trajectory along two directions plus noise (float64)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(2, d, generator=gen, dtype=F64)
    s = torch.tensor(steps, dtype=F64)
    coef = torch.stack([s**0.5, 0.1 * s], 1)
    return scale * (coef @ v + 0.05 * torch.randn(len(steps), d, generator=gen, dtype=F64))


# ---- top_components on degenerate Gram matrices ----------------------------------------------


def test_top_components_of_degenerate_grams_match_the_svd():
    # all deltas zero, or no checkpoint at all: no component
    for gram in (torch.zeros(3, 3, dtype=F64), torch.zeros(0, 0, dtype=F64)):
        sigma, u = top_components(gram, 2)
        assert sigma.numel() == 0 and u.shape == (gram.shape[0], 0)
    # a single checkpoint: its delta's norm
    sigma, u = top_components(torch.tensor([[4.0]], dtype=F64), 1)
    assert sigma.tolist() == [2.0] and u.abs().tolist() == [[1.0]]
    # exactly rank one (the other eigenvalues are exact zeros): the one component is kept
    m = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=F64)
    sigma, u = top_components(m @ m.T, 3)
    assert sigma.tolist() == [3.0] and u[:, 0].abs().tolist() == [1.0, 0.0, 0.0]


def test_components_below_the_relative_cutoff_are_dropped_above_it_kept():
    """RELATIVE_SIGMA_CUTOFF (1e-6 of the largest singular value) decides the rank used."""
    u, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=F64))
    for ratio, kept in [(1e-7, 1), (1e-5, 2)]:  # relative to the largest, here 1e3 (not 1: a ratio, not a level)
        gram = u @ torch.diag(torch.tensor([1.0, ratio**2, 0.0, 0.0], dtype=F64) * 1e6) @ u.T
        sigma, _ = top_components(gram, 4)
        assert sigma.numel() == kept, ratio


def test_float32_inputs_give_the_float64_answer():
    """A Gram matrix or coefficients handed over in float32 are promoted before any math."""
    steps = [1.0, 2.0, 4.0, 7.0, 9.0]
    m = trend_deltas(steps).float()
    gram32 = m @ m.T  # float32
    gram64 = gram32.double()  # the same numbers
    s32, u32 = top_components(gram32, 2)
    s64, u64 = top_components(gram64, 2)
    assert s32.dtype == F64 and torch.equal(s32, s64) and torch.equal(u32.abs(), u64.abs())
    d32, d64 = diagnostics(gram32, steps, RelexSpec(rank=2)), diagnostics(gram64, steps, RelexSpec(rank=2))
    assert d32 == d64
    c = torch.tensor([[0.5], [1.0], [2.0], [3.5], [4.5]])
    assert torch.equal(
        predict_coefficients(steps, c, [12.0], RelexSpec()),
        predict_coefficients(steps, c.double(), [12.0], RelexSpec()),
    )


# ---- diagnostics --------------------------------------------------------------------------


def dense_diagnostics(m, steps, rank):
    """Explained variance from the SVD of the deltas; R^2 of a least-squares line through the
    rank-1 coefficients."""
    sigma = torch.linalg.svdvals(m)
    u = torch.linalg.svd(m, full_matrices=False).U
    c = u[:, 0] * sigma[0]
    s = torch.tensor(steps, dtype=F64)
    design = torch.stack([torch.ones_like(s), s], 1)
    fitted = design @ torch.linalg.lstsq(design, c.unsqueeze(1)).solution[:, 0]
    r2 = 1 - float(((c - fitted) ** 2).sum() / ((c - c.mean()) ** 2).sum())
    lam = sigma**2
    return float(lam[0] / lam.sum()), float(lam[:rank].sum() / lam.sum()), r2, sigma


@pytest.mark.parametrize("window", [None, 4])
def test_diagnostics_equal_the_dense_svd(window):
    steps = [1, 2, 3, 5, 8, 13]
    m = trend_deltas(steps, scale=1e-3)  # small deltas: the Gram trace is far below 1
    got = diagnostics(m @ m.T, steps, RelexSpec(rank=2, window=window))
    used = slice(-window, None) if window else slice(None)
    ev1, evr, r2, sigma = dense_diagnostics(m[used], steps[used], 2)
    assert got.explained_variance_1 == pytest.approx(ev1, rel=1e-9)
    assert got.explained_variance_r == pytest.approx(evr, rel=1e-9)
    assert 0.5 < got.linear_r2 < 0.999 and got.linear_r2 == pytest.approx(r2, rel=1e-9)
    assert got.singular_values == pytest.approx(sigma.tolist(), rel=1e-7)


def test_diagnostics_of_zero_deltas_are_nan():
    got = diagnostics(torch.zeros(4, 4, dtype=F64), [1, 2, 3, 4], RelexSpec())
    assert all(math.isnan(x) for x in (got.explained_variance_1, got.explained_variance_r, got.linear_r2))
    assert got.singular_values == ()


# ---- autoregressive re-fitting ------------------------------------------------------------


def test_refit_with_gap_two_and_unsorted_targets_equals_the_reference_loop():
    """Steps 2 apart (the prediction reach is every * gap), targets given out of order: each
    is read off the fit in force at its own step, a predicted checkpoint (12) or between two (17)."""
    steps = [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    m = trend_deltas(steps, seed=1)
    targets = [17.0, 12.0, 21.0]
    spec = RelexSpec(rank=2, fit=FitSpec("power", 0.5), refit_every=2, refit_window=3)
    w = relex_weights(m @ m.T, steps, targets, spec)
    u, sigma, vh = torch.linalg.svd(m, full_matrices=False)
    coefficients = (u * sigma)[:, :2]
    for j, target in enumerate(targets):
        expected = dense_refit(steps, coefficients, target, "power", 0.5, 2, 3) @ vh[:2]
        got = w[j] @ m
        assert float((got - expected).norm() / expected.norm()) < 1e-9, target
    plain = relex_weights(m @ m.T, steps, targets, RelexSpec(rank=2, fit=FitSpec("power", 0.5)))
    assert float((plain - w).norm()) > 1e-3  # the re-fitting is not a no-op here


def test_linear_map_of_a_refit_equals_the_reference_loop():
    """The backtest's linear map (P with predictions = P @ coefficients) under re-fitting."""
    steps = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    values = torch.tensor([[0.0, 1.0], [1.0, 0.3], [1.8, -0.2], [2.1, 0.4], [2.6, 1.0], [2.8, 0.1]], dtype=F64)
    spec = RelexSpec(fit=FitSpec("saturating", 3.0), refit_every=1, refit_window=4)
    p = linear_map(steps, [9.0, 11.0], spec)
    for j, target in enumerate([9.0, 11.0]):
        expected = dense_refit(steps, values, target, "saturating", 3.0, 1, 4)
        assert torch.allclose(p[j] @ values, expected, rtol=1e-9, atol=1e-12)


def test_refit_at_steps_past_float32_integers_equals_the_reference_loop():
    """Steps above 2^24 (samples or tokens as the step) are not float32 numbers: predicted
    checkpoints must be placed in float64."""
    s0 = float(2**25)
    steps = [s0 + k for k in (1.0, 3.0, 5.0, 7.0, 9.0, 11.0)]  # odd: none is a float32
    values = torch.tensor([[0.0], [1.3], [2.0], [2.4], [2.9], [3.1]], dtype=F64)
    spec = RelexSpec(fit=FitSpec("power", 0.5, origin_step=s0), refit_every=1, refit_window=4)
    got = predict_coefficients(steps, values, [s0 + 17.0], spec)[0]
    expected = dense_refit(steps, values, s0 + 17.0, "power", 0.5, 1, 4, s0=s0)
    assert torch.allclose(got, expected, rtol=1e-7)


def test_sine_at_steps_past_float32_integers_recovers_the_curve():
    """The per-tensor (sine) route, on an exact sinusoid sampled at odd steps above 2^25."""
    s0 = float(2**25)
    steps = [s0 + 2 * k + 1 for k in range(14)]

    def truth(s):
        return 0.8 * math.sin(2 * math.pi * 0.07 * (s - s0) + 0.3) + 1.5

    values = torch.tensor([[truth(s)] for s in steps], dtype=F64)
    targets = [s0 + 31.0, s0 + 35.0]
    got = predict_coefficients(steps, values, targets, RelexSpec(fit=FitSpec("sine")))
    assert got[:, 0].tolist() == pytest.approx([truth(t) for t in targets], abs=1e-6)


def test_sine_refit_uses_only_the_refit_window():
    """The first two points are off the sinusoid; a re-fit on the last 10 never sees them and
    recovers the sinusoid exactly, step after step."""

    def truth(s):
        return 0.8 * math.sin(2 * math.pi * 0.09 * s + 0.3) + 1.5

    steps = [float(s) for s in range(1, 13)]
    values = torch.tensor([[truth(s) + (2.0 if s <= 2 else 0.0)] for s in steps], dtype=F64)
    spec = RelexSpec(fit=FitSpec("sine"), refit_every=1, refit_window=10)
    got = predict_coefficients(steps, values, [15.0], spec)
    assert float(got[0, 0]) == pytest.approx(truth(15.0), abs=1e-6)


def test_refit_with_one_checkpoint_keeps_the_line_through_the_base():
    """linear_origin needs one point: with one checkpoint there is no gap to space predicted
    checkpoints by, and the line through the base and that checkpoint is the answer."""
    spec = RelexSpec(fit=FitSpec("linear_origin", origin_step=1.0), refit_every=1)
    got = predict_coefficients([5.0], torch.tensor([[2.0]], dtype=F64), [11.0], spec)
    assert float(got[0, 0]) == pytest.approx(2.0 * (11.0 - 1.0) / (5.0 - 1.0), rel=1e-12)


def test_fit_reconstruct_ignores_refit_settings():
    """Re-fitting is an extrapolation scheme: fit_reconstruct reads the one fitted curve."""
    steps = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0]
    m = trend_deltas(steps, seed=2)
    spec = RelexSpec(rank=2, fit=FitSpec("power", 0.5), mode="fit_reconstruct", refit_every=1, refit_window=3)
    w = relex_weights(m @ m.T, steps, [4.0, 8.0], spec)
    expected = dense_family(torch.zeros(m.shape[1], dtype=F64), list(m), steps, [4.0, 8.0], "power", 0.5, rank=2)
    for j in range(2):
        assert torch.allclose(w[j] @ m, expected[j], rtol=1e-9, atol=1e-12)


def test_an_unresolved_fit_is_refused_with_a_reason():
    with pytest.raises(ValueError, match=r"fit auto is not resolved: the backtest chooses it"):
        predict_coefficients([1.0, 2.0], torch.ones(2, 1, dtype=F64), [3.0], RelexSpec(fit=FitSpec("auto")))
    with pytest.raises(ValueError, match=r"fit log is not resolved"):  # a shape without a default
        linear_map([1.0, 2.0], [3.0], RelexSpec(fit=FitSpec("log")))


# ---- config parameters -> spec ------------------------------------------------------------


def test_spec_from_parameters_without_parameters_is_the_default_spec():
    assert spec_from_parameters() == RelexSpec() == RelexSpec(1, FitSpec("linear", None, 0.0), None, 1.0, "extrapolate")


@pytest.mark.parametrize(
    "fit,shape",
    [
        ("power", 0.5),
        ("log", 7.0),
        ("saturating", 7.0),
        ("polynomial", 3.0),
        ("linear", None),
        ("sine", None),
        ("auto", None),
    ],
)
def test_spec_from_parameters_takes_each_family_its_own_shape_key(fit, shape):
    spec = spec_from_parameters(
        rank=3,
        fit=fit,
        degree=3,
        p=0.5,
        tau=7,
        window=5,
        scale=0.8,
        mode="fit_reconstruct",
        refit_every=2,
        refit_window=4,
        base_step=10,
    )
    assert spec == RelexSpec(
        rank=3,
        fit=FitSpec(fit, shape, 10.0),
        window=5,
        scale=0.8,
        mode="fit_reconstruct",
        refit_every=2,
        refit_window=4,
    )
    assert spec.fit.shape is None or type(spec.fit.shape) is float


def test_fit_descriptions_name_the_family_and_its_shape():
    assert FitSpec("auto").describe() == "auto"
    assert FitSpec("log", 12.0).describe() == "log (tau=12)"
    assert FitSpec("power", 0.123456).describe() == "power (p=0.1235)"
    assert FitSpec("linear").describe() == "linear"


# ---- the fit families ----------------------------------------------------------------------

ORIGIN_FAMILIES = [("linear_origin", None), ("power", 0.5), ("power", 1.3), ("log", 2.0), ("saturating", 4.0)]


@pytest.mark.parametrize("family,shape", ORIGIN_FAMILIES)
def test_families_measure_the_step_from_the_base_step(family, shape):
    """A base step s0 away from 0 (and a first checkpoint less than one step past it): each
    family's least squares on its own basis of (s - s0), as tests/helpers.design writes it."""
    s0 = 6.5
    steps = [7.0, 8.0, 10.0, 13.0, 15.0, 18.0]
    values = trend_deltas(steps, d=3, seed=4)  # three columns
    targets = [25.0, 40.0]
    got = predict_coefficients(steps, values, targets, RelexSpec(fit=FitSpec(family, shape, s0)))
    s = torch.tensor(steps, dtype=F64)
    coef = torch.linalg.lstsq(design(family, s, shape, s0), values, driver="gelsd").solution
    expected = design(family, torch.tensor(targets, dtype=F64), shape, s0) @ coef
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "family,shape",
    [("linear", None), ("polynomial", 2.0), ("polynomial", 3.0), ("power", 0.5), ("log", 8.0), ("saturating", 30.0)],
)
def test_families_recover_an_exact_curve_at_large_steps(family, shape):
    """Steps around 3e7 (samples as the step), base step 3e7 - 10: a curve of the family itself is
    recovered to rounding, which needs the basis centred and scaled before the least squares."""
    s0 = 3e7 - 10
    steps = [s0 + k for k in (10.0, 11.0, 12.0, 14.0, 15.0, 17.0, 19.0)]
    beta = torch.tensor(
        [0.3, -0.2, 0.05, 0.01][: design(family, torch.zeros(1, dtype=F64), shape, 0.0).shape[1]], dtype=F64
    )

    def truth(x):  # the family's curve in (s - s0), written out here
        x = torch.as_tensor(x, dtype=F64)
        if family.startswith("poly") or family == "linear":
            return torch.stack([(x - s0 - 14) ** k for k in range(len(beta))], 1) @ beta
        return design(family, x, shape, s0) @ beta

    values = truth(steps).unsqueeze(1)
    targets = [s0 + 30.0, s0 + 60.0]
    got = predict_coefficients(steps, values, targets, RelexSpec(fit=FitSpec(family, shape, s0)))[:, 0]
    expected = truth(targets)
    assert float((got - expected).abs().max()) < 1e-7 * float(expected.abs().max())
    # the curve itself, read at a list of steps (not float32 numbers: s0 + 31 is odd and above 2^24)
    curve = fits.family(family).fit(torch.tensor(steps, dtype=F64), values, shape, s0)
    odd = [s0 + 31.0, s0 + 61.0]
    assert torch.allclose(curve(odd)[:, 0], truth(odd), rtol=1e-9)


def test_r2_is_each_columns_coefficient_of_determination():
    steps = [1.0, 2.0, 3.0, 5.0, 8.0]
    s = torch.tensor(steps, dtype=F64)
    noisy = 1e-3 * torch.stack(
        [
            0.5 * s + torch.tensor([0.3, -0.2, 0.1, 0.4, -0.3], dtype=F64),
            torch.full_like(s, 2.0),  # constant: R^2 is 1 by convention
            s**2,
        ],
        1,
    )
    r2 = fits.family("linear").fit(s, noisy, None, 0.0).r2
    design_ = torch.stack([torch.ones_like(s), s], 1)
    for j in (0, 2):
        y = noisy[:, j]
        residual = y - design_ @ torch.linalg.lstsq(design_, y.unsqueeze(1)).solution[:, 0]
        assert float(r2[j]) == pytest.approx(1 - float((residual**2).sum() / ((y - y.mean()) ** 2).sum()), rel=1e-9)
    assert float(r2[1]) == 1.0
    assert 0.5 < float(r2[0]) < 0.99 and 0.5 < float(r2[2]) < 0.99


@pytest.mark.parametrize(
    "fit,shape,points",
    [
        ("linear", None, 2),
        ("linear_origin", None, 1),
        ("power", 0.5, 2),
        ("log", 3.0, 2),
        ("saturating", 3.0, 2),
        ("polynomial", 2.0, 3),
        ("polynomial", 4.0, 5),
        ("polynomial", None, 3),
        ("sine", None, 4),
    ],
)
def test_min_points_is_the_number_of_free_coefficients(fit, shape, points):
    """A + B s: 2; B (s - s0): 1; a degree-d polynomial: d + 1 (default degree 2); sine A, f, phi,
    C: 4. Validation and the backtest's fit counts read it."""
    assert fits.family(fit).min_points(shape) == points
    assert FitSpec(fit, shape).min_points == points


def test_describe_shows_the_shape_only_where_the_family_has_one():
    assert FitSpec("log").describe() == "log"  # shape left to the backtest
    assert fits.family("linear").describe(3.0) == "linear"
    assert fits.family("polynomial").describe(3.0) == "polynomial (degree=3)"


def test_shape_grids_are_multiples_of_the_window_reach_from_the_base():
    log = fits.family("log").shape
    assert log.candidates([20, 30, 50], 10.0) == pytest.approx([g * 40.0 for g in log.grid])
    assert log.candidates([0.2, 0.5], 0.0) == pytest.approx(list(log.grid))  # at least one step
    power = fits.family("power").shape
    assert power.candidates([20, 30, 50], 10.0) == list(power.grid)  # exponents: not in steps


@pytest.mark.parametrize(
    "fit,value,problem",
    [
        ("power", 1.5, None),
        ("power", 0.01, None),
        ("power", 0.0, "expected a value in (0, 1.5], got 0"),
        ("power", 2.0, "expected a value in (0, 1.5], got 2"),
        ("polynomial", 1.0, None),
        ("polynomial", 0.0, "expected a value in [1, inf), got 0"),
        ("polynomial", 2.5, "expected an integer, got 2.5"),
        ("log", 1e9, None),
        ("log", -1.0, "expected a value in (0, inf), got -1"),
    ],
)
def test_shape_problems_name_the_allowed_range(fit, value, problem):
    assert fits.family(fit).shape.problem(value) == problem


def test_shape_problem_with_an_exclusive_upper_bound():
    shape = fits.Shape("k", "a test shape", low=0.0, high=2.0, low_inclusive=True, high_inclusive=False)
    assert shape.problem(0.0) is None and shape.problem(1.99) is None
    assert shape.problem(2.0) == "expected a value in [0, 2), got 2"


FRACTIONAL = [0.0, 1.3, 2.1, 3.7, 4.4, 6.0, 7.2, 8.9, 9.5, 11.1, 12.6, 13.3, 15.0, 16.2]
SINES = {
    "even": ([float(s) for s in range(3, 17)], 0.05),
    "fast": ([float(s) for s in range(3, 17)], 0.37),
    "gap 3": ([float(s) for s in range(100, 142, 3)], 0.07),
    "uneven": ([1.0, 2.0, 4.0, 5.0, 7.0, 8.0, 10.0, 12.0, 13.0, 15.0, 16.0, 18.0], 0.11),
    "uneven fast": ([1.0, 2.0, 4.0, 5.0, 7.0, 8.0, 10.0, 12.0, 13.0, 15.0, 16.0, 18.0, 19.0, 21.0], 0.3),
    # steps that are not whole numbers: no alias at f + 1 fits them too
    "fractional slow": (FRACTIONAL, 0.06),
    "fractional": (FRACTIONAL, 0.21),
    "fractional late": ([100.0 + s for s in FRACTIONAL], 0.13),
}


@pytest.mark.parametrize("case", list(SINES))
def test_sine_recovers_an_exact_sinusoid(case):
    """Even, uneven and widely spaced steps, slow and fast (up to 0.37 cycles a step): the fit
    finds the one sinusoid through the points and predicts it ahead."""
    steps, freq = SINES[case]

    def truth(s):
        return 0.8 * math.sin(2 * math.pi * freq * s + 0.3) + 1.5

    values = torch.tensor([[truth(s), 2 * truth(s) - 1.0] for s in steps], dtype=F64)
    targets = [steps[-1] + 3.0, steps[-1] + 7.5]
    got = predict_coefficients(steps, values, targets, RelexSpec(fit=FitSpec("sine")))
    curve = fits.family("sine").fit(torch.tensor(steps, dtype=F64), values, None, 0.0)
    assert torch.equal(curve(targets), curve(torch.tensor(targets, dtype=F64)))  # a list of steps, or a tensor
    assert got[:, 0].tolist() == pytest.approx([truth(t) for t in targets], abs=1e-6)
    assert got[:, 1].tolist() == pytest.approx([2 * truth(t) - 1.0 for t in targets], abs=1e-6)
    assert fits.family("sine").fit(torch.tensor(steps, dtype=F64), values, None, 0.0).r2.tolist() == pytest.approx(
        [1.0, 1.0], abs=1e-9
    )


def test_sine_of_no_direction_is_empty():
    curve = fits.family("sine").fit(torch.arange(1.0, 6.0, dtype=F64), torch.zeros(5, 0, dtype=F64), None, 0.0)
    assert curve([7.0, 8.0]).shape == (2, 0)


SINE_TRENDS = {
    "trend": ([float(s) for s in range(1, 21)], lambda s: 0.05 * s + 0.2 * math.sin(2 * math.pi * 0.23 * s + 1)),
    "two tones": (
        [float(s) for s in range(1, 21)],
        lambda s: math.sin(2 * math.pi * 0.11 * s) + 0.5 * math.sin(2 * math.pi * 0.31 * s + 0.5),
    ),
    "gap 5": ([float(s) for s in range(10, 110, 5)], lambda s: 0.02 * s + 0.3 * math.sin(2 * math.pi * 0.043 * s)),
}


@pytest.mark.parametrize("case", list(SINE_TRENDS))
def test_sine_on_curves_that_are_not_sinusoids_matches_the_reference_scripts(case):
    """Where several frequencies fit about as well, the answer is the least-squares fit nearest
    the FFT guess: what the reference scripts' curve_fit from that guess converges to."""
    pytest.importorskip("scipy")
    steps, curve = SINE_TRENDS[case]
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor([[curve(s) + 0.01 * float(torch.randn(1, generator=gen))] for s in steps], dtype=F64)
    targets = [steps[-1] + 2.0, steps[-1] + 5.0]
    got = predict_coefficients(steps, values, targets, RelexSpec(fit=FitSpec("sine")))
    expected = fit_curve("sine", steps, values, None, 0.0)(targets)
    assert torch.allclose(got, expected, rtol=1e-3)


# ---- the registry ---------------------------------------------------------------------------


def test_the_registry_orders_families_simplest_first_then_by_name():
    found = fits.REGISTRY._discover()  # the scan the package runs at import, run again
    assert list(found) == [
        "linear_origin",
        "linear",
        "average",
        "ema",
        "expo",
        "log",
        "polynomial",
        "power",
        "saturating",
        "sine",
    ]
    assert all(found[name] is fits.family(name) for name in found)
    assert fits.shape_keys() == ["last", "halflife", "alpha", "tau", "degree", "p"]
    with pytest.raises(
        KeyError,
        match=r"unknown fit family 'cubic' \(known: linear_origin, linear, average, ema, expo, log, polynomial, "
        r"power, saturating, sine, or auto\)",
    ):
        fits.family("cubic")


@pytest.fixture
def extra_family_module(tmp_path, monkeypatch):
    """Writes relex_merge/fits/zz_extra.py (on an extra package path) for _discover to find."""
    monkeypatch.setattr(fits, "__path__", [*fits.__path__, str(tmp_path)])
    yield lambda source: (tmp_path / "zz_extra.py").write_text(source)
    sys.modules.pop("relex_merge.core.fits.zz_extra", None)


@pytest.mark.parametrize(
    "source,problem",
    [
        ("X = 1\n", "relex_merge.core.fits.zz_extra defines no FAMILY"),
        (
            "from relex_merge.core.fits.linear import Linear\nclass Twin(Linear):\n    pass\nFAMILY = Twin()\n",
            "fit family name 'linear' is taken",
        ),
        (
            "from relex_merge.core.fits.linear import Linear\nclass Auto(Linear):\n    name = 'auto'\n"
            "FAMILY = Auto()\n",
            "fit family name 'auto' is taken",
        ),
    ],
)
def test_a_family_module_must_define_one_new_family(source, problem, extra_family_module):
    extra_family_module(source)
    with pytest.raises(TypeError, match=re.escape(problem)):
        fits.REGISTRY._discover()


def test_a_new_family_module_is_found(extra_family_module):
    extra_family_module(
        "from relex_merge.core.fits.linear import Linear\nclass Cubic(Linear):\n    name = 'aaa_cubic'\n"
        "    complexity = 3\nFAMILY = Cubic()\n"
    )
    assert list(fits.REGISTRY._discover()) == [
        "linear_origin",
        "linear",
        "aaa_cubic",
        "average",
        "ema",
        "expo",
        "log",
        "polynomial",
        "power",
        "saturating",
        "sine",
    ]


@pytest.mark.parametrize("key", ["scale", "p", "tau", "degree"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_spec_from_parameters_refuses_non_finite_numbers_by_name(key, value):
    """mergekit's parameters skip the config schema: this is their only check."""
    fit = {"p": "power", "tau": "log", "degree": "polynomial"}.get(key, "linear")
    with pytest.raises(ValueError) as caught:
        spec_from_parameters(fit=fit, **{key: value})
    assert str(caught.value) == f"{key}: expected a finite number, got {value}"

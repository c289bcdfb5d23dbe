"""analyze: planted linear vs decelerating trajectories, backtests from the Gram matrix alone,
the fit cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from relex_merge.core.analysis import analyze_grams
from relex_merge.core.backtest import Backtest
from relex_merge.core.relex import FitSpec, RelexSpec
from relex_merge.testing.synthetic import make_planted_run
from tests.helpers import assert_relex_output, dense_relex, load_state, run_cli, write_config

STEPS = list(range(1, 13))


def planted_grams(curve, noise=1e-4, seed=0, n_tensors=3, d=3000):
    gen = torch.Generator().manual_seed(seed)
    grams, deltas_by_tensor = [], []
    for _ in range(n_tensors):
        v = torch.randn(d, generator=gen, dtype=torch.float64)
        v /= v.norm()
        m = torch.stack([curve(s) * v + noise * torch.randn(d, generator=gen, dtype=torch.float64) for s in STEPS])
        grams.append(m @ m.T)
        deltas_by_tensor.append(m)
    return grams, deltas_by_tensor


@pytest.mark.parametrize("fit", ["linear", "polynomial"])
def test_backtest_from_gram_equals_backtest_on_the_deltas(fit):
    """The Gram-matrix backtest against an independent one: the dense SVD reference fitted on
    the first K explicit deltas, compared with the held-out delta."""
    grams, deltas = planted_grams(lambda s: math.sqrt(s), noise=1e-2)
    spec = RelexSpec(rank=2, fit=FitSpec(fit, 2 if fit == "polynomial" else None))
    backtest = Backtest(STEPS, spec, [spec.fit])
    backtest.add(grams[0])
    m = deltas[0]
    assert len(backtest.points) > 10
    for point, got in backtest.curve(spec.fit):
        k = point.fit_count
        pred = dense_relex(
            torch.zeros(m.shape[1], dtype=torch.float64), list(m[:k]), STEPS[:k], point.step, rank=2, fit=fit
        )
        true = m[STEPS.index(point.step)]
        assert got.relative_error == pytest.approx(float((pred - true).norm() / true.norm()), rel=1e-6)
        assert got.cosine == pytest.approx(float(pred @ true / (pred.norm() * true.norm())), rel=1e-6)


def test_exactly_linear_trajectory_is_supported_everywhere():
    grams, _ = planted_grams(lambda s: 0.5 * s + 0.1, noise=0.0)
    a = analyze_grams(["a", "b", "c"], [3000] * 3, grams, STEPS, [24, 400], RelexSpec())
    assert all(t.linear_r2 == pytest.approx(1.0, abs=1e-9) for t in a.tensors)
    assert all(t.explained_variance_1 == pytest.approx(1.0, abs=1e-9) for t in a.tensors)
    assert max(p.relative_error for p in a.backtest) < 1e-6
    assert a.supported_horizon == a.tested_horizon
    assert a.verdict[0].startswith("linear held at every horizon the window can test")
    assert any(line.startswith("SUPPORTED: step 24 is 1.1x the window span") for line in a.verdict)
    assert any(
        line.startswith("UNTESTED: step 400 is 35.3x") and "beyond the 2.7x this window can test" in line
        for line in a.verdict
    )
    assert "Over every backtest point the best fit is linear (" in " ".join(a.verdict)


def test_decelerating_trajectory_is_flagged():
    grams, _ = planted_grams(lambda s: math.sqrt(s), noise=0.0)
    a = analyze_grams(["a", "b", "c"], [3000] * 3, grams, STEPS, [60], RelexSpec())
    # rank-1 and nearly linear inside the window, as on real runs ...
    assert min(t.explained_variance_1 for t in a.tensors) > 0.999
    assert min(t.linear_r2 for t in a.tensors) > 0.95
    # ... but the backtest error grows with the horizon and the line overshoots
    longest_fit = max(p.fit_count for p in a.backtest)
    shortest_fit = min(p.fit_count for p in a.backtest)
    far = [p for p in a.backtest if p.fit_count == shortest_fit]
    assert [p.relative_error for p in far] == sorted(p.relative_error for p in far)
    assert far[-1].relative_error > 5 * far[0].relative_error
    assert far[-1].norm_ratio > 1.1
    assert longest_fit > shortest_fit
    text = " ".join(a.verdict)
    assert "error grows with horizon" in text and "overshoots" in text and "decelerates" in text
    assert "does not follow linear" in text
    # linear misses by 6% already at the shortest horizon, and by more than the 20% tolerance past 1x
    assert a.supported_horizon == pytest.approx(1.0) and a.tested_horizon == pytest.approx(8 / 3)
    assert a.verdict[0] == (
        "linear holds up to 1.0x the fit span (backtest error <= 20%); beyond that the error grows, to 35% at 2.7x."
    )


def test_analysis_json_writes_null_for_non_finite_numbers():
    """NaN and Infinity are not JSON: strict parsers refuse analysis.json over one of them."""
    import dataclasses

    grams, _ = planted_grams(lambda s: s, noise=0.0)
    a = analyze_grams(["a", "b", "c"], [3000] * 3, grams, STEPS, [60], RelexSpec())
    finite = a.to_json()
    assert finite == json.dumps(dataclasses.asdict(a), indent=2)  # otherwise the file is unchanged
    tensors = [dataclasses.replace(a.tensors[0], linear_r2=float("nan")), *a.tensors[1:]]
    odd = dataclasses.replace(
        a, supported_horizon=float("inf"), horizon_bins=[(0.0, 1.0), (8.0, float("inf"))], tensors=tensors
    )

    def strict(constant):
        raise AssertionError(f"{constant} in analysis.json")

    data = json.loads(odd.to_json(), parse_constant=strict)
    assert data["supported_horizon"] is None and data["horizon_bins"] == [[0.0, 1.0], [8.0, None]]
    assert data["tensors"][0]["linear_r2"] is None
    assert data["tensors"][1] == json.loads(finite)["tensors"][1]


@pytest.fixture(scope="module")
def sqrt_run(tmp_path_factory):
    return make_planted_run(
        tmp_path_factory.mktemp("sqrt") / "run", steps=range(1, 13), rate=2e-3, noise=1e-6, curve=math.sqrt
    )


def test_analyze_cli_writes_json_cache_and_plots(sqrt_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", sqrt_run, list(range(1, 13)), 100)
    out = tmp_path / "analysis"
    result = run_cli("analyze", str(cfg), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "backtest" in result.stdout and "verdict" in result.stdout
    assert "error grows with horizon" in result.stdout
    data = json.loads((out / "analysis.json").read_text())
    assert data["steps"] == list(range(1, 13)) and data["targets"] == [100]
    assert len(data["tensors"]) == 27 and data["backtest"]
    assert (out / "fit_cache.safetensors").is_file()
    pytest.importorskip("matplotlib")
    for name in ("coefficients.png", "explained_variance.png", "backtest.png"):
        assert (out / name).stat().st_size > 1000


def test_fit_cache_gives_the_same_merge(sqrt_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", sqrt_run, list(range(1, 13)), [20, 40])
    assert run_cli("analyze", str(cfg), "--out", str(tmp_path / "a"), "-q").exit_code == 0
    cache = tmp_path / "a" / "fit_cache.safetensors"
    plain = run_cli(str(cfg), str(tmp_path / "plain"), "-q", "--max-memory", "4KB")
    cached = run_cli(str(cfg), str(tmp_path / "cached"), "--fit-cache", str(cache), "--max-memory", "4KB")
    assert plain.exit_code == 0 and cached.exit_code == 0, cached.output
    assert "Gram matrices from the fit cache" in " ".join(cached.stdout.split())  # the Gram pass was skipped
    for t in (20, 40):
        a, b = load_state(tmp_path / "plain" / f"step-{t}"), load_state(tmp_path / "cached" / f"step-{t}")
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-7), name
        assert_relex_output(tmp_path / "cached" / f"step-{t}", sqrt_run, STEPS, t)


def test_fit_cache_from_other_steps_is_refused(sqrt_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", sqrt_run, list(range(1, 13)), 20)
    assert run_cli("analyze", str(cfg), "--out", str(tmp_path / "a"), "-q").exit_code == 0
    other = write_config(tmp_path / "o.yml", sqrt_run, list(range(1, 12)), 20)
    result = run_cli(str(other), str(tmp_path / "out"), "--fit-cache", str(tmp_path / "a" / "fit_cache.safetensors"))
    assert result.exit_code == 2
    assert "was made for steps" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_analyze_json_on_stdout(sqrt_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", sqrt_run, list(range(1, 13)), 30)
    config = yaml.safe_load(cfg.read_text())
    config["parameters"].pop("target_step")  # analyze does not need a target
    cfg.write_text(yaml.safe_dump(config))
    result = run_cli("analyze", str(cfg), "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["targets"] == []

"""Fit families, fit: auto, fit_reconstruct and autoregressive re-fitting, each against a dense
reference written here (torch.linalg.svd of the stacked deltas and the family's own least
squares on the real steps), independent of relex_merge.core.fits and relex_merge.core.relex."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from relex_merge.core import fits
from relex_merge.core.relex import FitSpec, RelexSpec, relex_weights
from relex_merge.core.verdict import assess
from relex_merge.testing.synthetic import make_planted_run
from tests.helpers import (
    assert_close,
    dense_family,
    dense_refit,
    dense_svd,
    engine_outputs,
    load_state,
    random_window,
    run_cli,
    write_config,
)

# ---- the dense reference -----------------------------------------------------------------


def dense_autoregressive(base, checkpoints, steps, target, family, shape, every, keep, rank=1):
    """The reference scripts' --future_extrapolation_window loop, on real steps: fit on the
    last `keep` points, predict the next `every` checkpoints (one window gap apart), append
    them, re-fit. With every=1 this is the reference's loop exactly."""
    coefficients, directions = dense_svd(base, checkpoints, rank)
    predicted = dense_refit(steps, coefficients, target, family, shape, every, keep)
    return (base.double().reshape(-1) + predicted @ directions).reshape(base.shape)


FIXED = [
    ("linear", None),
    ("linear_origin", None),
    ("polynomial", 2),
    ("power", 0.5),
    ("log", 4.0),
    ("saturating", 6.0),
    ("expo", 0.5),
    ("average", 3),
    ("ema", 4.0),
]


# ---- every family through the engine ----------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("family,shape", FIXED, ids=[f for f, _ in FIXED])
def test_each_family_through_the_engine_equals_the_dense_reference(family, shape, rank):
    base, checkpoints = random_window(n_ckpt=7, seed=11)
    steps = [3, 5, 6, 9, 12, 14, 19]  # uneven, starting late: positions and steps differ
    targets = [30, 75]
    spec = RelexSpec(rank=rank, fit=FitSpec(family, shape))
    sinks, _ = engine_outputs(base, checkpoints, steps, targets, spec)
    for name in base:
        expected = dense_family(base[name], [c[name] for c in checkpoints], steps, targets, family, shape, rank)
        for j in range(len(targets)):
            assert_close(sinks[j].tensor(name), expected[j].reshape(-1))


def sinusoidal_window(steps, seed=0, d=600):
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(d, generator=gen, dtype=torch.float64)}
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    v /= v.norm()
    curve = [0.8 * math.sin(2 * math.pi * 0.09 * s + 0.3) + 1.5 for s in steps]
    checkpoints = [{"w": base["w"] + c * v + 1e-3 * torch.randn(d, generator=gen, dtype=torch.float64)} for c in curve]
    return base, checkpoints


def test_sine_matches_the_reference_scripts_curve_fit():
    pytest.importorskip("scipy")
    steps = list(range(1, 15))
    base, checkpoints = sinusoidal_window(steps)
    targets = [20, 31]
    sinks, _ = engine_outputs(base, checkpoints, steps, targets, RelexSpec(fit=FitSpec("sine")))
    expected = dense_family(base["w"], [c["w"] for c in checkpoints], steps, targets, "sine")
    for j in range(len(targets)):
        assert_close(sinks[j].tensor("w"), expected[j].reshape(-1))


def test_mergekit_method_runs_every_fixed_family(qwen_run, tmp_path):
    """Through mergekit's own runner, against the dense reference (not against the engine)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from relex_merge.interop.mergekit_method import register

    register()
    steps = [2, 3, 5, 6]
    base = load_state(qwen_run / "base")
    inputs = [load_state(qwen_run / f"checkpoint-{s}") for s in steps]
    for family, key, shape in [
        ("log", "tau", 3.0),
        ("power", "p", 0.75),
        ("saturating", "tau", 5.0),
        ("expo", "alpha", 0.5),
        ("average", "last", 3),
        ("ema", "halflife", 2.0),
    ]:
        doc = {
            "merge_method": "relex",
            "base_model": str(qwen_run / "base"),
            "models": [{"model": str(qwen_run / f"checkpoint-{s}"), "parameters": {"step": s}} for s in steps],
            "parameters": {"target_step": 15, "fit": family, key: shape},
            "dtype": "float32",
        }
        out = tmp_path / family
        run_merge(
            MergeConfiguration.model_validate(doc), str(out), options=MergeOptions(write_model_card=False, quiet=True)
        )
        merged = load_state(out)
        for name in ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"]:
            expected = dense_family(base[name], [c[name] for c in inputs], steps, [15], family, shape)[0]
            assert_close(merged[name], expected)


def test_mergekit_method_refuses_a_fit_it_cannot_resolve():
    from relex_merge.interop.mergekit_method import relex_group

    with pytest.raises(ValueError, match="needs the whole model's backtest"):
        relex_group(None, {}, 10, fit="auto")  # refused before the tensors are touched


# ---- fit_reconstruct and re-fitting -------------------------------------------------------


@pytest.mark.parametrize("family,shape", [("linear", None), ("log", 3.0)])
def test_fit_reconstruct_outputs_the_fitted_curve_at_observed_steps(family, shape):
    base, checkpoints = random_window(n_ckpt=6, seed=4)
    steps = [2, 4, 5, 7, 8, 11]
    targets = [4, 11]
    spec = RelexSpec(rank=2, fit=FitSpec(family, shape), mode="fit_reconstruct")
    sinks, _ = engine_outputs(base, checkpoints, steps, targets, spec)
    for name in base:
        expected = dense_family(base[name], [c[name] for c in checkpoints], steps, targets, family, shape, rank=2)
        for j in range(len(targets)):
            assert_close(sinks[j].tensor(name), expected[j].reshape(-1))
    # it is not the observed checkpoint (that would be reconstruct at full rank)
    assert (sinks[1].tensor("w") - checkpoints[-1]["w"].reshape(-1)).norm() > 1e-3


@pytest.mark.parametrize("every,keep", [(1, 4), (3, 5), (2, None)])
@pytest.mark.parametrize("family,shape", [("linear", None), ("saturating", 5.0)])
def test_refit_every_equals_the_reference_loop(family, shape, every, keep):
    base, checkpoints = random_window(n_ckpt=7, seed=9)
    steps = list(range(1, 8))
    target = 17
    spec = RelexSpec(fit=FitSpec(family, shape), refit_every=every, refit_window=keep)
    sinks, _ = engine_outputs(base, checkpoints, steps, [target], spec)
    for name in base:
        expected = dense_autoregressive(
            base[name], [c[name] for c in checkpoints], steps, target, family, shape, every, keep or len(steps)
        )
        assert_close(sinks[0].tensor(name), expected.reshape(-1))
    plain, _ = engine_outputs(base, checkpoints, steps, [target], RelexSpec(fit=FitSpec(family, shape)))
    if family != "linear" or keep is not None:  # a line re-fitted on its own extension is the same line
        assert (plain[0].tensor("w") - sinks[0].tensor("w")).norm() > 1e-6


def test_refit_sine_is_run_per_direction():
    pytest.importorskip("scipy")
    steps = list(range(1, 13))
    base, checkpoints = sinusoidal_window(steps, seed=2)
    spec = RelexSpec(fit=FitSpec("sine"), refit_every=1, refit_window=10)
    sinks, _ = engine_outputs(base, checkpoints, steps, [15], spec)
    expected = dense_autoregressive(base["w"], [c["w"] for c in checkpoints], steps, 15, "sine", None, 1, 10)
    assert_close(sinks[0].tensor("w"), expected.reshape(-1), rel=1e-4)


# ---- fit: auto on planted trajectories ------------------------------------------------------

CURVES = {
    "linear": lambda s: 0.05 * s + 0.3,
    "sqrt": lambda s: 0.3 * math.sqrt(s),
    "log": lambda s: 0.4 * math.log(s + 2.0),
    "saturating": lambda s: 1.2 * (1 - math.exp(-s / 9.0)),
}


def planted(curve, steps, noise, seed=0, tensors=4, d=2000):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(tensors):
        v = torch.randn(d, generator=gen, dtype=torch.float64)
        v /= v.norm()
        deltas = torch.stack(
            [curve(s) * v + noise * torch.randn(d, generator=gen, dtype=torch.float64) / math.sqrt(d) for s in steps]
        )
        out.append((v, deltas))
    return out


@pytest.mark.parametrize("name", list(CURVES))
def test_auto_picks_a_family_that_predicts_far_ahead(name):
    curve = CURVES[name]
    steps = [1, 2, 3, 5, 6, 8, 10, 11, 13, 15, 16, 18, 20]  # uneven
    noise = 0.002
    tensors = planted(curve, steps, noise)
    grams = [m @ m.T for _, m in tensors]
    target = 60  # 2x the window span past its end: as far as this window can test
    spec = RelexSpec(fit=FitSpec("auto"))
    assessment = assess(grams, steps, [target], [spec])
    chosen = assessment.fits[0]
    if name == "linear":
        assert chosen.family == "linear"
    errors = []
    for (v, m), gram in zip(tensors, grams):
        w = relex_weights(gram, steps, [target], RelexSpec(fit=chosen))[0]
        errors.append(float((w @ m - curve(target) * v).norm() / abs(curve(target))))
    # the prediction is close to the truth (the shape grids are 2^(1/4) apart, so a shape between
    # two grid points costs a few percent); linear extrapolation of the decelerating curves misses
    # by 50-160% here
    assert max(errors) < 0.05, (chosen.describe(), errors)
    assert assessment.verdicts[0].supported
    verdict = assessment.verdicts[0]
    assert verdict.chosen_by_backtest and verdict.fit == chosen
    linear = [
        float((relex_weights(g, steps, [target], RelexSpec())[0] @ m - curve(target) * v).norm() / abs(curve(target)))
        for (v, m), g in zip(tensors, grams)
    ]
    if name != "linear":
        assert max(linear) > 10 * max(errors)
    beyond = assess(grams, steps, [200], [spec]).verdicts[0]  # 9x: further than the window can test
    assert not beyond.supported and beyond.word == "untested"
    assert beyond.line().startswith("UNTESTED: step 200 is 9.5x the window span past its end")


def test_auto_says_do_not_extrapolate_when_nothing_beats_stopping():
    """A random walk: no curve predicts it, and stopping is closer than any extrapolation."""
    gen = torch.Generator().manual_seed(5)
    steps = list(range(1, 17))
    grams = []
    for _ in range(3):
        walk = torch.cumsum(torch.randn(len(steps), 3000, generator=gen, dtype=torch.float64), 0)
        grams.append(walk @ walk.T)
    assessment = assess(grams, steps, [40], [RelexSpec(fit=FitSpec("auto"))])
    verdict = assessment.verdicts[0]
    assert not verdict.supported and assessment.unsupported == [verdict]
    assert verdict.line().startswith("NOT SUPPORTED: step 40 is 1.6x the window span past its end")


def test_fixed_fit_that_fails_names_the_family_that_holds():
    steps = list(range(1, 21))
    tensors = planted(CURVES["sqrt"], steps, noise=0.001)
    grams = [m @ m.T for _, m in tensors]
    verdict = assess(grams, steps, [60], [RelexSpec()]).verdicts[0]
    assert not verdict.supported and verdict.fit.family == "linear"
    assert verdict.better_fit is not None and verdict.better_fit.family in {"power", "log", "saturating"}
    assert f"set `fit: {verdict.better_fit.family}`" in verdict.line()


def test_registry_finds_every_family_module():
    import pkgutil

    import relex_merge.core.fits as package

    modules = {m.name for m in pkgutil.iter_modules(package.__path__)} - {"_base"}
    assert set(fits.names()) == {
        "linear",
        "linear_origin",
        "average",
        "ema",
        "expo",
        "polynomial",
        "power",
        "log",
        "saturating",
        "sine",
    }
    assert len(modules) == len(fits.names())
    assert fits.names()[:2] == ["linear_origin", "linear"]  # ties go to the simpler family


# ---- the verdict on every output, end to end ---------------------------------------------


@pytest.fixture(scope="module")
def sqrt_run(tmp_path_factory):
    return make_planted_run(
        tmp_path_factory.mktemp("sqrtfit") / "run", steps=range(1, 13), rate=2e-3, noise=1e-6, curve=math.sqrt
    )


def test_auto_end_to_end_writes_the_chosen_fit_and_its_verdict(sqrt_run, tmp_path):
    steps = list(range(1, 13))
    cfg = write_config(tmp_path / "c.yml", sqrt_run, steps, 24, parameters={"fit": "auto"})
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out))
    assert result.exit_code == 0, result.output
    terminal = " ".join(result.stderr.split())  # verdicts go to stderr
    assert (
        "verdict: SUPPORTED: step 24 is 1.1x the window span past its end; power (p=0.5) (chosen by the backtest)"
        in terminal
    )
    card = (out / "README.md").read_text()
    assert "## Verdict of the backtest" in card and "**SUPPORTED: step 24" in card
    assert "| fit | power (p=0.5): c = a + b·(s − s0)^p (chosen by the backtest) |" in card
    written = (out / "relex_config.yml").read_text()
    assert written.startswith(
        "# relex-merge verdict (from the backtest inside the window; see README.md):\n# SUPPORTED"
    )
    params = yaml.safe_load(written)["parameters"]
    assert params["fit"] == "power" and params["p"] == 0.5 and "tau" not in params
    # the written config reproduces the output without the backtest
    again = run_cli(str(out / "relex_config.yml"), str(tmp_path / "again"), "-q")
    assert again.exit_code == 0, again.output
    a, b = load_state(out), load_state(tmp_path / "again")
    assert all(torch.equal(a[n], b[n]) for n in a)
    base = load_state(sqrt_run / "base")
    inputs = [load_state(sqrt_run / f"checkpoint-{s}") for s in steps]
    for name in ["model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight"]:
        expected = dense_family(base[name], [c[name] for c in inputs], steps, [24], "power", 0.5)[0]
        assert_close(a[name], expected)


def test_require_supported_refuses_with_exit_3_and_writes_nothing(sqrt_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", sqrt_run, list(range(1, 13)), 40)  # linear on a square root
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out), "--require-supported")
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --when-unsupported refuse: NOT SUPPORTED: step 40 is 2.5x")
    assert lines[0].endswith("Nothing was written.")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    supported = write_config(tmp_path / "s.yml", sqrt_run, list(range(1, 13)), 20, parameters=dict(fit="power", p=0.5))
    assert run_cli(str(supported), str(out), "--require-supported", "-q").exit_code == 0


def test_plain_merge_prints_and_writes_the_verdict(sqrt_run, tmp_path):
    """Linear on a square root: it holds a little past the window (0.7x), not at 2.5x."""
    cfg = write_config(tmp_path / "c.yml", sqrt_run, list(range(1, 13)), [20, 40])
    result = run_cli(str(cfg), str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    terminal = " ".join(result.stderr.split())  # verdicts go to stderr
    assert "verdict: SUPPORTED: step 20 is 0.7x the window span past its end; linear holds up to 1.0x" in terminal
    assert (
        "verdict: NOT SUPPORTED: step 40 is 2.5x the window span past its end; linear holds only up to 1.0x" in terminal
    )
    near = (tmp_path / "out" / "step-20" / "README.md").read_text()
    far = (tmp_path / "out" / "step-40" / "README.md").read_text()
    assert "**SUPPORTED: step 20 is" in near and "| fit | linear: c = a + b·s |" in near
    assert "**NOT SUPPORTED: step 40 is" in far and "| fit | linear: c = a + b·s |" in far
    assert "holds here: set `fit: power` and `p: 0.5` under parameters (or fit: auto)" in far


def test_quiet_still_prints_every_verdict_on_stderr(sqrt_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", sqrt_run, list(range(1, 13)), [20, 40])
    result = run_cli(str(cfg), str(tmp_path / "out"), "-q")
    assert result.exit_code == 0 and result.stdout == ""
    verdicts = [line for line in result.stderr.splitlines() if line.startswith("verdict: ")]
    assert [v.split(":")[1].strip() for v in verdicts] == ["SUPPORTED", "NOT SUPPORTED"]


def test_when_unsupported_stop_writes_the_last_window_checkpoint_in_place_of_the_rejected_prediction(
    sqrt_run, tmp_path
):
    """Linear on a square root: step 20 is supported (a prediction), step 40 is not (the last
    window checkpoint, byte for byte in fp32, with a card and config that say so)."""
    steps = list(range(1, 13))
    cfg = write_config(tmp_path / "c.yml", sqrt_run, steps, [20, 40])
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out), "--when-unsupported", "stop")
    assert result.exit_code == 0, result.output
    err = " ".join(result.stderr.split())
    assert (
        f"--when-unsupported stop: {out / 'step-40'} holds the last window checkpoint (step 12), not the "
        "prediction for step 40" in err
    )
    last, far, near = load_state(sqrt_run / "checkpoint-12"), load_state(out / "step-40"), load_state(out / "step-20")
    assert far.keys() == load_state(sqrt_run / "base").keys()
    assert all(torch.equal(far[n], last[n]) for n in far)
    base = load_state(sqrt_run / "base")
    inputs = [load_state(sqrt_run / f"checkpoint-{s}") for s in steps]
    for name in ["model.embed_tokens.weight", "model.norm.weight"]:
        assert_close(near[name], dense_family(base[name], [c[name] for c in inputs], steps, [20], "linear")[0])
    card = (out / "step-40" / "README.md").read_text()
    assert "# The last window checkpoint (step 12), kept instead of a prediction for step 40" in card
    assert "**NOT SUPPORTED: step 40" in card
    config = (out / "step-40" / "relex_config.yml").read_text()
    assert "# --when-unsupported stop: this folder holds the last window checkpoint (step 12)" in config
    assert "# RELEX extrapolation to step 20" in (out / "step-20" / "README.md").read_text()
    # every target unsupported: one pass copies, nothing is predicted
    only = write_config(tmp_path / "far.yml", sqrt_run, steps, 40)
    assert run_cli(str(only), str(tmp_path / "only"), "--when-unsupported", "stop", "-q").exit_code == 0
    copied = load_state(tmp_path / "only")
    assert all(torch.equal(copied[n], last[n]) for n in copied)


def test_require_supported_and_when_unsupported_stop_contradict(sqrt_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", sqrt_run, list(range(1, 13)), 40)
    result = run_cli(str(cfg), str(tmp_path / "out"), "--require-supported", "--when-unsupported", "stop")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --require-supported and --when-unsupported stop contradict each other; give one"
    )
    assert not (tmp_path / "out").exists()


# ---- the direct families (average, ema, expo) ---------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            {"refit_every": 2},
            "parameters.refit_every: fit: average weighs the window's checkpoints directly; it has no curve to re-fit",
        ),
        (
            {"mode": "fit_reconstruct"},
            "parameters.mode: fit: average weighs the window's checkpoints directly; "
            "it has no curve to evaluate at observed steps (use mode: reconstruct, or another fit)",
        ),
    ],
)
def test_direct_families_refuse_refitting_and_fit_reconstruct(extra, message):
    from relex_merge.common.errors import RelexError
    from relex_merge.config.schema import parse_config

    doc = {
        "merge_method": "relex",
        "base_model": "b",
        "models": [],
        "parameters": {"fit": "average", "last": 2, **extra},
    }
    with pytest.raises(RelexError) as caught:
        parse_config(doc, "c.yml")
    assert str(caught.value) == f"c.yml: {message}"


def test_expo_at_alpha_1_is_the_line_through_the_first_and_last_checkpoints():
    """At the window's last step it is the last checkpoint; at one span past it, 2 d_T - d_1."""
    from relex_merge.core.relex import relex_weights

    steps = [2, 4, 10]
    w = relex_weights(torch.eye(3, dtype=torch.float64), steps, [10, 18], RelexSpec(fit=FitSpec("expo", 1.0)))
    assert w.tolist() == [[0.0, 0.0, 1.0], [-1.0, 0.0, 2.0]]

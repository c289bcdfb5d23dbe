"""The shipped demo (a real GRPO run): eval and sweep with lm-eval, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import assert_state_matches, generate, load_state, relex_expectation, run_cli

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo" / "run"
TASK = ["--tasks", "relex_demo_addition", "--include-path", str(REPO / "demo" / "tasks")]


def test_demo_run_is_shipped_and_small():
    window = sorted(int(p.name.split("-")[1]) for p in DEMO.glob("checkpoint-*"))
    assert window[:20] == list(range(1, 21)) and {40, 60, 100, 200} <= set(window)
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 10 * 1024 * 1024
    assert (REPO / "demo" / "data" / "addition_test.jsonl").read_text().count("\n") == 300


def test_second_demo_run_is_shipped_and_small():
    run = REPO / "demo" / "run-lowlr"
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert steps == list(range(2, 31, 2)) + [60, 100, 200, 400, 600]
    assert sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) <= 10 * 1024 * 1024


def test_second_demo_config_merges_with_the_fit_the_backtest_chose(tmp_path):
    """demo-lowlr.yml uses fit: auto; the output's relex_config.yml names the family and shape the
    backtest chose, and the tensors are that fit's dense reference."""
    from relex_merge.core import fits
    from tests.helpers import dense_family

    out = tmp_path / "out"
    result = run_cli(str(REPO / "merge_configs" / "demo-lowlr.yml"), str(out), "-q", cwd=REPO)
    assert result.exit_code == 0, result.output
    params = yaml.safe_load((out / "relex_config.yml").read_text())["parameters"]
    assert params["fit"] != "auto" and params["target_step"] == 400
    family = fits.family(params["fit"])
    shape = params.get(family.shape.key) if family.shape is not None else None
    run = REPO / "demo" / "run-lowlr"
    steps = list(range(2, 31, 2))
    base = load_state(run / "base")
    inputs = [load_state(run / f"checkpoint-{s}") for s in steps]
    names = [n for n in base if base[n].is_floating_point() and (inputs[-1][n] != base[n]).any()]
    expected = {n: dense_family(base[n], [c[n] for c in inputs], steps, [400], params["fit"], shape)[0] for n in names}
    merged = load_state(out)
    assert_state_matches({n: merged[n] for n in names}, expected, base, dtype=torch.float32)


def demo_expectation(target: int, scale: float = 1.0) -> tuple[dict, dict]:
    """(base, expected): what demo.yml asks for, by the dense reference: the base, steps 1-20,
    rank 1, a linear fit, float32."""
    base = load_state(DEMO / "base")
    checkpoints = [load_state(DEMO / f"checkpoint-{s}") for s in range(1, 21)]
    return base, relex_expectation(base, checkpoints, range(1, 21), target, scale=scale)


def test_demo_config_merges(tmp_path):
    out = tmp_path / "out"
    result = run_cli(str(REPO / "merge_configs" / "demo.yml"), str(out), "-q", cwd=REPO)
    assert result.exit_code == 0, result.output
    base, expected = demo_expectation(40)
    assert_state_matches(load_state(out), expected, base, dtype=torch.float32)
    generate(out)


@pytest.mark.slow
def test_eval_scores_a_demo_checkpoint_offline(tmp_path):
    model = tmp_path / "checkpoint-20"
    shutil.copytree(DEMO / "checkpoint-20", model)  # eval writes its results into the folder
    result = run_cli("eval", str(model), *TASK, "--limit", "30", cwd=REPO)
    assert result.exit_code == 0, result.output
    assert "relex_demo_addition" in result.stdout and "exact_match" in result.stdout
    record = json.loads((model / "lm_eval_results.json").read_text())
    score = record["scores"][0]
    assert score["metric"] == "exact_match,none" and 0.0 <= score["value"] <= 1.0
    assert record["limit"] == 30


@pytest.mark.slow
def test_eval_output_keeps_the_model_folder_untouched(tmp_path):
    before = sorted(p.name for p in (DEMO / "checkpoint-20").iterdir())
    results = tmp_path / "scores.json"
    result = run_cli("eval", str(DEMO / "checkpoint-20"), *TASK, "--limit", "10", "--output", str(results), cwd=REPO)
    assert result.exit_code == 0, result.output
    assert json.loads(results.read_text())["scores"][0]["task"] == "relex_demo_addition"
    assert sorted(p.name for p in (DEMO / "checkpoint-20").iterdir()) == before


@pytest.mark.slow
def test_sweep_keeps_the_best_and_removes_the_rest(tmp_path):
    out = tmp_path / "sweep"
    result = run_cli(
        "sweep",
        str(REPO / "merge_configs" / "demo.yml"),
        str(out),
        "--targets",
        "30,60",
        "--scales",
        "1.0",
        *TASK,
        "--limit",
        "30",
        "-q",
        cwd=REPO,
    )
    assert result.exit_code == 0, result.output
    assert "last window checkpoint (step 20)" in result.stdout
    assert "step-30-scale-1" in result.stdout and "step-60-scale-1" in result.stdout and "(best)" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["baseline_lm_eval_results.json", "best", "sweep_results.json"]
    summary = json.loads((out / "sweep_results.json").read_text())
    assert len(summary["candidates"]) == 2 and summary["best"] in {"step-30-scale-1", "step-60-scale-1"}
    best = max(summary["candidates"], key=lambda c: c["score"])
    assert best["label"] == summary["best"]
    assert (out / "best" / "lm_eval_results.json").is_file()
    target = int(summary["best"].split("-")[1])  # step-T-scale-1
    base, expected = demo_expectation(target)
    assert_state_matches(load_state(out / "best"), expected, base)
    generate(out / "best")
    assert not (DEMO / "checkpoint-20" / "lm_eval_results.json").exists()  # inputs untouched


@pytest.mark.slow
def test_sweep_with_one_candidate_keeps_it_as_best(tmp_path):
    """One candidate (one target, the default scale): it is kept as OUT/best, byte for byte the
    model a plain merge to that target writes, and nothing else is left in OUT."""
    out = tmp_path / "sweep"
    result = run_cli(
        "sweep",
        str(REPO / "merge_configs" / "demo.yml"),
        str(out),
        "--targets",
        "40",
        *TASK,
        "--limit",
        "10",
        "-q",
        cwd=REPO,
    )
    assert result.exit_code == 0, result.output
    assert "step-40-scale-1 (best)" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["baseline_lm_eval_results.json", "best", "sweep_results.json"]
    summary = json.loads((out / "sweep_results.json").read_text())
    assert [c["label"] for c in summary["candidates"]] == ["step-40-scale-1"]
    assert summary["best"] == "step-40-scale-1" and summary["candidates"][0]["target_step"] == 40

    config = yaml.safe_load((REPO / "merge_configs" / "demo.yml").read_text())
    config["parameters"]["target_step"] = 40
    plain_config = tmp_path / "demo-40.yml"  # relative paths: still resolved against cwd (REPO)
    plain_config.write_text(yaml.safe_dump(config))
    plain = tmp_path / "plain"
    result = run_cli(str(plain_config), str(plain), "-q", cwd=REPO)
    assert result.exit_code == 0, result.output

    best = out / "best"
    assert sorted(p.name for p in best.iterdir()) == sorted(
        [p.name for p in plain.iterdir()] + ["lm_eval_results.json"]
    )
    weights = sorted(p.name for p in plain.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in best.glob("*.safetensors"))
    for name in weights:
        assert (best / name).read_bytes() == (plain / name).read_bytes(), name
    generate(best)  # a loadable HF model
    assert not (DEMO / "checkpoint-20" / "lm_eval_results.json").exists()  # inputs untouched


def test_sweep_with_an_unknown_task_writes_nothing(tmp_path):
    out = tmp_path / "sweep"
    result = run_cli(
        "sweep",
        str(REPO / "merge_configs" / "demo.yml"),
        str(out),
        "--targets",
        "30",
        "--tasks",
        "no_such_task",
        "--include-path",
        str(REPO / "demo" / "tasks"),
        cwd=REPO,
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --tasks: unknown task 'no_such_task'; add its folder with --include-path (lm-eval task YAML)"
    )
    assert not out.exists()

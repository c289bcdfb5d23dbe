"""sweep's checks and plumbing, with lm-eval replaced by tests/patched_cli.py's fake scoring (the
real scoring is tested in tests/evaluation/test_demo.py)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli, write_config
from tests.patched_cli import fake_scoring

TASKS = ("--tasks", "fake_task")


@pytest.fixture
def scored(monkeypatch) -> list:
    """(model folder, device) of every scoring."""
    import importlib

    sweep = importlib.import_module("relex_merge.workflows.sweep")  # the package's `sweep` is the function
    calls: list = []
    for name, value in fake_scoring(calls).items():
        monkeypatch.setattr(sweep, name, value)
    return calls


def test_repeated_targets_and_scales_give_one_candidate_each(qwen_run, tmp_path, scored):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    out = tmp_path / "sweep"
    result = run_cli(
        "sweep",
        str(cfg),
        str(out),
        "--targets",
        "9,12,9",
        "--scales",
        "1,0.5,1.0",
        *TASKS,
        "--keep-all",
        "-q",
        "--threads",
        "1",
    )
    assert result.exit_code == 0, result.output
    labels = [c["label"] for c in json.loads((out / "sweep_results.json").read_text())["candidates"]]
    assert labels == ["step-9-scale-1", "step-9-scale-0.5", "step-12-scale-1", "step-12-scale-0.5"]
    assert len(scored) == 5  # four candidates and the last window checkpoint


def test_sweep_scores_on_the_resolved_device(qwen_run, tmp_path, scored):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    result = run_cli(
        "sweep",
        str(cfg),
        str(tmp_path / "sweep"),
        "--targets",
        "9,12",
        *TASKS,
        "-q",
        "--threads",
        "1",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert [device for _, device in scored] == ["cpu"] * 3


@pytest.mark.parametrize(
    "targets,expected",
    [
        ("0", "--targets: 0 is not after the base model's step (parameters.base_step = 0)"),
        ("12,-4", "--targets: -4 is not after the base model's step (parameters.base_step = 0)"),
        ("12,x", "--targets: expected comma-separated numbers, got '12,x'"),
    ],
)
def test_invalid_targets_are_one_line_and_write_nothing(qwen_run, tmp_path, scored, targets, expected):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    result = run_cli("sweep", str(cfg), str(tmp_path / "sweep"), "--targets", targets, *TASKS, "--threads", "1")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {expected}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"] and not scored


def test_a_reconstruct_config_is_refused_in_one_line(qwen_run, tmp_path, scored):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], None, parameters={"mode": "reconstruct"})
    result = run_cli("sweep", str(cfg), str(tmp_path / "sweep"), "--targets", "16", *TASKS, "--threads", "1")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: sweep: the config's mode is reconstruct; sweep chooses how far to "
        "extrapolate, so it needs mode: extrapolate"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"] and not scored


@pytest.mark.parametrize(
    "best,best_se,base,base_se,said",
    [
        (
            0.50,
            0.02,
            0.40,
            0.02,
            "beats (by 0.1000, more than two standard errors) the last window checkpoint (0.4000 ± 0.0200)",
        ),
        (
            0.50,
            0.11,
            0.45,
            0.11,
            "scores 0.0500 above, within two standard errors (0.3111): not a clear win over the "
            "last window checkpoint (0.4500 ± 0.1100)",
        ),
        (0.40, 0.02, 0.40, 0.02, "does NOT beat the last window checkpoint (0.4000 ± 0.0200)"),
    ],
)
def test_the_outcome_line_counts_the_noise(best, best_se, base, base_se, said):
    from pathlib import Path

    from relex_merge.evaluation.lm_eval import EvalResult, TaskScore
    from relex_merge.workflows.sweep import Candidate, SweepResult

    def scored(label, mean, se):
        return Candidate(label, None, None, EvalResult(label, [TaskScore("t", "acc", mean, se)]))

    result = SweepResult(
        [scored("a", best, best_se)], scored("last", base, base_se), scored("a", best, best_se), Path("best")
    )
    assert result.outcome() == said


def test_a_tie_for_the_best_score_says_how_it_was_broken(qwen_run, tmp_path, monkeypatch):
    import importlib
    import json
    from pathlib import Path

    from relex_merge.evaluation.lm_eval import EvalResult, TaskScore

    sweep = importlib.import_module("relex_merge.workflows.sweep")
    for name, value in fake_scoring().items():
        monkeypatch.setattr(sweep, name, value)

    def evaluate(model_dir, tasks, *, device, results_file=None, **kwargs):  # every model scores 0.5
        (results_file or Path(model_dir) / "lm_eval_results.json").write_text("{}")
        return EvalResult(str(model_dir), [TaskScore(task, "acc", 0.5, 0.01) for task in tasks])

    monkeypatch.setattr(sweep, "evaluate", evaluate)
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    out = tmp_path / "sweep"
    result = run_cli("sweep", str(cfg), str(out), "--targets", "12,9", *TASKS, "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "best: step-12-scale-1, kept as" in result.stdout
    assert (
        "the best score is tied with step-9-scale-1 (same score, 0.5000): a tie goes to the candidate built first "
        "(targets in the order given, then scales, then fits)"
    ) in result.stdout
    summary = json.loads((out / "sweep_results.json").read_text())
    assert summary["best"] == "step-12-scale-1" and summary["tied_with"] == ["step-9-scale-1"]

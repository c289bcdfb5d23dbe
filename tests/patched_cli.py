"""relex-merge's command line with test-only patches, for tests that start ranks with torchrun
(a monkeypatch cannot reach into another process). RELEX_TEST_PATCHES names them, comma-separated;
the product code has no test hooks."""

from __future__ import annotations

import os
import time
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))


def slow_rename() -> None:
    """Rank 0 renames every finished output folder into place 3 s late."""
    rename = Path.rename

    def late(self, target):
        if RANK == 0 and ".relex-tmp-" in self.name:
            time.sleep(3)
        return rename(self, target)

    Path.rename = late


def fail_planning_on_rank_1() -> None:
    """Rank 1 (only) cannot plan the merge, as a node that does not see an input."""
    from relex_merge.common.errors import RelexError
    from relex_merge.workflows import plan

    real = plan.plan_merge

    def plan_merge(*args, **kwargs):
        if RANK == 1:
            raise RelexError("checkpoint-3: not found on this node")
        return real(*args, **kwargs)

    plan.plan_merge = plan_merge


def _in_the_merge(rank: int, action) -> None:
    """Run ``action`` on ``rank`` when it starts its share of the tensors (mid-merge: the output
    folder exists, the other ranks go on and then wait for it in a collective); its pid goes to
    RELEX_TEST_PID_FILE first."""
    from relex_merge.engine.executors.threads import ThreadExecutor

    real = ThreadExecutor.run

    def run(self, *args, **kwargs):
        if RANK == rank:
            Path(os.environ["RELEX_TEST_PID_FILE"]).write_text(str(os.getpid()))
            action()
        return real(self, *args, **kwargs)

    ThreadExecutor.run = run


def freeze_rank_2() -> None:
    """Rank 2 freezes mid-merge (SIGSTOP: a hung process that answers nothing)."""
    import signal

    _in_the_merge(2, lambda: os.kill(os.getpid(), signal.SIGSTOP))


def kill_rank_0() -> None:
    """Rank 0, which hosts the store when no torchrun agent does (srun), is killed mid-merge."""
    import signal

    _in_the_merge(0, lambda: os.kill(os.getpid(), signal.SIGKILL))


def fake_lm_eval() -> None:
    """sweep's lm-eval replaced by ``fake_scoring``."""
    import importlib

    sweep = importlib.import_module("relex_merge.workflows.sweep")
    for name, value in fake_scoring().items():
        setattr(sweep, name, value)


def fake_scoring(calls: list | None = None) -> dict:
    """Stand-ins for relex_merge.workflows.sweep's task_manager, check_tasks and evaluate: any task is known;
    a model's score is the mean of its first float tensor; the device each scoring got is written
    to its results file and, with ``calls``, appended there as (model folder, device)."""
    import json

    from relex_merge.evaluation.lm_eval import EvalResult, TaskScore
    from tests.helpers import load_state

    def evaluate(model_dir, tasks, *, device, results_file=None, **kwargs):  # device: no default, sweep must pass it
        state = load_state(Path(model_dir))
        value = float(next(t for t in state.values() if t.is_floating_point()).float().mean())
        if calls is not None:
            calls.append((Path(model_dir), device))
        (results_file or Path(model_dir) / "lm_eval_results.json").write_text(json.dumps({"device": device}))
        return EvalResult(str(model_dir), [TaskScore(task, "score", value, 0.0) for task in tasks])

    return {"task_manager": lambda include_path: None, "check_tasks": lambda tasks, manager: None, "evaluate": evaluate}


if __name__ == "__main__":
    for patch in filter(None, os.environ.get("RELEX_TEST_PATCHES", "").split(",")):
        globals()[patch]()
    from relex_merge.cli import main

    main()

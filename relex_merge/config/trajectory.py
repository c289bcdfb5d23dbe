"""Find and order the window's checkpoints: an explicit list, or a run directory's
``checkpoint-N`` (HF Trainer / TRL), ``global_step_N`` (verl) or ``step_N`` folders."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from relex_merge.common.errors import RelexError
from relex_merge.config.schema import ModelEntry, ModelParameters, RelexConfig, TrajectorySpec
from relex_merge.io.formats import has_weights

__all__ = ["discover_steps", "expand_trajectory", "select_steps", "weights_dir"]

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^(?:checkpoint-|global_step_|step_)(\d+)$")


def weights_dir(step_dir: Path) -> Path:
    """The folder inside a step directory that holds loadable weights.

    verl's FSDP shards in ``actor/`` come before an ``actor/huggingface/`` export: the shards
    keep the training precision, exports are often cast to bf16.
    """
    for candidate in (step_dir, step_dir / "actor", step_dir / "actor" / "huggingface"):
        if has_weights(candidate):
            return candidate
    return step_dir


def _check_trainer_state(step_dir: Path, step: int) -> None:
    state_file = step_dir / "trainer_state.json"
    if not state_file.is_file():
        return
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise RelexError(f"{state_file}: unreadable trainer state ({exc})") from None
    global_step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(state, dict) or not isinstance(global_step, (int, type(None))):
        raise RelexError(f"{state_file}: not a trainer state (expected a JSON object with an integer global_step)")
    if global_step is not None and global_step != step:
        raise RelexError(
            f"{state_file}: global_step is {global_step} but the folder name says {step}; "
            "rename the folder or list the checkpoint explicitly under models:"
        )


def discover_steps(run_dir: Path) -> dict[int, Path]:
    """Step -> folder for every ``checkpoint-N``, ``global_step_N`` or ``step_N`` folder in
    ``run_dir``; RelexError when a step appears twice."""
    if not run_dir.is_dir():
        raise RelexError(f"trajectory.run_dir: {run_dir} is not a directory")
    found: dict[int, Path] = {}
    for child in sorted(run_dir.iterdir()):
        match = _STEP_DIR.match(child.name)
        if not match or not child.is_dir():
            continue
        step = int(match.group(1))
        if step in found:
            raise RelexError(f"trajectory.run_dir: step {step} appears twice ({found[step].name}, {child.name})")
        found[step] = child
    log.debug("%s: %d step folders, steps %s", run_dir, len(found), sorted(found))
    return found


def select_steps(spec: TrajectorySpec, available: list[int]) -> list[int]:
    """The steps of ``available`` the trajectory's ``steps`` and ``every`` select."""
    if spec.steps is None:
        chosen = available
    elif isinstance(spec.steps, list):
        missing = [s for s in spec.steps if s not in available]
        if missing:
            raise RelexError(f"trajectory.steps: no checkpoint for step(s) {missing} in {spec.run_dir}")
        chosen = sorted(spec.steps)
    else:
        match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", spec.steps)
        if not match:
            raise RelexError(f"trajectory.steps: expected 'FIRST-LAST' (e.g. '1-75') or a list, got {spec.steps!r}")
        first, last = int(match.group(1)), int(match.group(2))
        if first > last:
            raise RelexError(f"trajectory.steps: range {spec.steps!r} is empty")
        chosen = [s for s in available if first <= s <= last]
    if spec.every:
        if not chosen:
            return chosen
        chosen = [s for s in chosen if (s - chosen[0]) % spec.every == 0]
    return chosen


def expand_trajectory(config: RelexConfig) -> RelexConfig:
    """Return a config whose ``models`` lists every window checkpoint explicitly."""
    if config.trajectory is not None and config.models:
        raise RelexError("config: give either 'models' or 'trajectory', not both")
    if config.trajectory is None:
        if not config.models:
            raise RelexError("config: no checkpoints; add 'models' (with a step each) or 'trajectory'")
        return config
    spec = config.trajectory
    found = discover_steps(Path(spec.run_dir))
    if not found:
        raise RelexError(f"trajectory.run_dir: no checkpoint-N, global_step_N or step_N folders in {spec.run_dir}")
    steps = select_steps(spec, sorted(found))
    log.debug("trajectory: %d of them selected (steps %s, every %s)", len(steps), spec.steps or "all", spec.every or 1)
    for step in steps:
        _check_trainer_state(found[step], step)
    models = [ModelEntry(model=str(weights_dir(found[s])), parameters=ModelParameters(step=s)) for s in steps]
    for model in models:
        log.debug("step %d: weights in %s", model.parameters.step, model.model)
    return config.model_copy(update={"models": models, "trajectory": None})

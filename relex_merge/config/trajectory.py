"""Find and order the window's checkpoints: an explicit list, or a run directory's step folders,
in the layout of the trainer that wrote them (``LAYOUTS``): HF Trainer / TRL ``checkpoint-N``
(with DeepSpeed: ``checkpoint-N/global_stepN``), verl ``global_step_N/actor``, DeepSpeed
``global_stepN`` (OpenRLHF: ``ckpt/_actor/global_stepN``), torchtitan ``checkpoint/step-N``,
accelerate ``step_N/pytorch_model_fsdp_0`` and plain ``step_N`` folders."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from relex_merge.common.errors import RelexError, resolved_against
from relex_merge.config.schema import ModelEntry, ModelParameters, RelexConfig, TrajectorySpec
from relex_merge.io.formats import has_weights

__all__ = ["discover_steps", "expand_trajectory", "select_steps", "weights_dir", "LAYOUTS"]

log = logging.getLogger(__name__)

LAYOUTS = (
    "checkpoint-N (HF Trainer, TRL; checkpoint-N/global_stepN with DeepSpeed)",
    "global_step_N/actor (verl)",
    "global_stepN (DeepSpeed; OpenRLHF: _actor/global_stepN, before global_stepN_hf)",
    "checkpoint/step-N (torchtitan)",
    "step_N, step_N/pytorch_model_fsdp_0 (accelerate, DCP)",
)
"""The layouts ``trajectory:`` looks for, as its errors list them."""

# step folder names; DeepSpeed's OpenRLHF HF exports (global_stepN_hf) only where no _actor/ is
_STEP_DIR = re.compile(r"^(?:checkpoint-|global_step_|global_step|step_|step-)(\d+)(_hf)?$")
# where under run_dir the step folders may be: OpenRLHF's _actor/ (the fp32 ZeRO saves, before
# its global_stepN_hf exports beside it), run_dir itself, torchtitan's checkpoint/
_STEP_PARENTS = ("_actor", ".", "checkpoint")
# accelerate's automatic checkpoint naming: checkpoints/checkpoint_K, K counting saves
_SAVE_COUNTER = re.compile(r"^checkpoint_(\d+)$")


def weights_dir(step_dir: Path) -> Path:
    """The folder inside a step directory that holds loadable weights.

    verl's FSDP shards in ``actor/`` come before an ``actor/huggingface/`` export: the shards
    keep the training precision, exports are often cast to bf16. accelerate's model is in
    ``pytorch_model_fsdp_0/`` (never its ``optimizer_0/`` sibling); HF Trainer + DeepSpeed
    without model weights keeps the ZeRO save in the tag folder ``latest`` names.
    """
    for candidate in (
        step_dir,
        step_dir / "actor",
        step_dir / "actor" / "huggingface",
        step_dir / "pytorch_model_fsdp_0",
    ):
        if has_weights(candidate):
            return candidate
    latest = step_dir / "latest"
    if latest.is_file():
        tag = step_dir / latest.read_text().strip()
        if tag != step_dir and has_weights(tag):
            return tag
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
    """Step -> folder for every step folder of one of the ``LAYOUTS`` in ``run_dir`` (or in its
    ``_actor/`` or ``checkpoint/``); RelexError when a step appears twice."""
    if not run_dir.is_dir():
        raise RelexError(f"trajectory.run_dir: {run_dir} is not a directory{resolved_against(run_dir)}")
    for parent in (run_dir / p for p in _STEP_PARENTS):
        found = _step_folders(parent) if parent.is_dir() else {}
        if found:
            log.debug("%s: %d step folders, steps %s", parent, len(found), sorted(found))
            return found
    _refuse_save_counters(run_dir)
    return {}


def _step_folders(folder: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    exports: dict[int, Path] = {}  # global_stepN_hf: only where no global_stepN is
    for child in sorted(folder.iterdir()):
        match = _STEP_DIR.match(child.name)
        if not match or not child.is_dir():
            continue
        step = int(match.group(1))
        into = exports if match.group(2) else found
        if step in into:
            raise RelexError(f"trajectory.run_dir: step {step} appears twice ({into[step].name}, {child.name})")
        into[step] = child
    return found or exports


def _refuse_save_counters(run_dir: Path) -> None:
    """accelerate's ``checkpoints/checkpoint_K``: K counts saves, not optimizer steps."""
    for folder in (run_dir, run_dir / "checkpoints"):
        counters = sorted(c.name for c in folder.glob("checkpoint_*") if c.is_dir() and _SAVE_COUNTER.match(c.name))
        if counters:
            raise RelexError(
                f"trajectory.run_dir: {folder} holds accelerate's {', '.join(counters[:3])}"
                f"{', ...' if len(counters) > 3 else ''} folders, numbered by save, not by optimizer step; "
                "list them under models: with the step each was saved at"
            )


def _span(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


def select_steps(spec: TrajectorySpec, available: list[int], warnings: list[str] | None = None) -> list[int]:
    """The steps ``spec`` selects from those found. A list must be found exactly; a range is every
    checkpoint found in it, and a range reaching past the first or last checkpoint found adds a
    warning naming the steps that have none (the merge goes on with those found)."""
    warnings = [] if warnings is None else warnings
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
        if chosen:
            missing = []
            if chosen[0] > first:
                missing.append(_span(first, chosen[0] - 1))
            if chosen[-1] < last:
                missing.append(_span(chosen[-1] + 1, last))
            if missing:
                warnings.append(
                    f"trajectory.steps: {spec.steps!r} asks for steps {first}-{last}, but {spec.run_dir} has no "
                    f"checkpoint for {' or '.join(missing)}; using the checkpoints found in steps "
                    f"{chosen[0]}-{chosen[-1]}"
                )
    if spec.every:
        if not chosen:
            return chosen
        chosen = [s for s in chosen if (s - chosen[0]) % spec.every == 0]
    return chosen


def expand_trajectory(config: RelexConfig, warnings: list[str] | None = None) -> RelexConfig:
    """Return a config whose ``models`` lists every window checkpoint explicitly; what the user
    should know about the selection (a range reaching past the checkpoints found) is appended to
    ``warnings``."""
    if config.trajectory is not None and config.models:
        raise RelexError("config: give either 'models' or 'trajectory', not both")
    if config.trajectory is None:
        if not config.models:
            raise RelexError("config: no checkpoints; add 'models' (with a step each) or 'trajectory'")
        return config
    spec = config.trajectory
    found = discover_steps(Path(spec.run_dir))
    if not found:
        raise RelexError(f"trajectory.run_dir: no step folders in {spec.run_dir}; looked for {'; '.join(LAYOUTS)}")
    steps = select_steps(spec, sorted(found), warnings)
    log.debug("trajectory: %d of them selected (steps %s, every %s)", len(steps), spec.steps or "all", spec.every or 1)
    for step in steps:
        _check_trainer_state(found[step], step)
    models = [ModelEntry(model=str(weights_dir(found[s])), parameters=ModelParameters(step=s)) for s in steps]
    for model in models:
        log.debug("step %d: weights in %s", model.parameters.step, model.model)
    return config.model_copy(update={"models": models, "trajectory": None})

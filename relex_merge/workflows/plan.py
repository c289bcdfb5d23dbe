"""From a parsed config to a validated merge job. Everything here reads only headers and
small JSON files: no tensor data is read before the whole input has been checked."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from relex_merge.common.errors import RelexError, WindowTooShort, resolved_against
from relex_merge.common.units import human_bytes
from relex_merge.config.schema import RelexConfig, RelexParameters
from relex_merge.config.trajectory import expand_trajectory
from relex_merge.core import fits
from relex_merge.core.backtest import Backtest
from relex_merge.core.relex import window_indices
from relex_merge.engine import MergeJob
from relex_merge.io.base import CheckpointReader
from relex_merge.io.dtypes import CONFIG_DTYPES
from relex_merge.io.fingerprints import InputRecord, input_record
from relex_merge.io.formats import open_checkpoint
from relex_merge.io.hf import (
    SAFETENSORS_INDEX,
    check_model_tensors,
    find_model_config,
    model_tensors,
    read_model_config,
)
from relex_merge.output.folders import tokenizer_folder, tokenizer_folders

__all__ = ["MergePlan", "plan_merge", "check_targets"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergePlan:
    """A relex config checked against its checkpoints (headers only), ready for the engine."""

    config: RelexConfig  # expanded: models listed explicitly
    job: MergeJob
    base_config: dict | None  # the base's config.json, or the last window checkpoint's (see _model_files)
    warnings: list[str] = field(default_factory=list)

    @property
    def model_paths(self) -> list[Path]:
        """The base and every window checkpoint (outputs must not overlap them)."""
        return [Path(self.config.base_path)] + [Path(m.model) for m in self.config.models or []]

    def fingerprints(self, full_hash: bool = False) -> list[InputRecord]:
        """Path (as configured), size and fingerprint of the base and every window checkpoint."""
        readers = [self.job.base, *self.job.checkpoints]
        paths = [self.config.base_path] + [m.model for m in self.config.models or []]
        return [input_record(path, reader.files(), full_hash) for path, reader in zip(paths, readers)]


def _check_steps(config: RelexConfig, discovered: bool = False) -> list[int]:
    """The window's steps, checked. ``discovered``: they came from ``trajectory:``, so messages
    name that key rather than a ``models:`` list the user never wrote."""
    steps = [m.parameters.step for m in config.models or []]
    if discovered and len(steps) < 2:
        found = f"step {steps[0]}" if steps else "none"
        raise WindowTooShort(
            f"trajectory: need at least 2 window checkpoints, found {len(steps)} ({found}); "
            "widen trajectory.steps or save checkpoints more often"
        )
    seen: set[int] = set()
    for i, step in enumerate(steps):
        if step in seen:
            raise RelexError(f"models[{i}].parameters.step: step {step} is listed twice")
        if i and step < steps[i - 1]:
            raise RelexError(
                f"models[{i}].parameters.step: steps must increase ({steps[i - 1]} then {step}); "
                "list the checkpoints in training order"
            )
        seen.add(step)
    if len(steps) < 2:
        raise WindowTooShort(f"models: need at least 2 window checkpoints, got {len(steps)}")
    base_step = config.parameters.base_step
    if steps[0] <= base_step:
        raise RelexError(
            f"models[0].parameters.step: {steps[0]} is not after the base model's step "
            f"(parameters.base_step = {base_step})"
        )
    return steps


def _check_parameters(
    config: RelexConfig, steps: list[int], require_targets: bool = True
) -> tuple[list[int], list[str]]:
    p = config.parameters
    n = len(steps)
    if p.window is not None and p.window > n:
        raise WindowTooShort(f"parameters.window: {p.window} is more than the {n} checkpoints given")
    used = [steps[k] for k in window_indices(n, p.window)]
    if p.rank > len(used):
        raise WindowTooShort(f"parameters.rank: {p.rank} exceeds the {len(used)} checkpoints in the window")
    spec = p.spec()
    if p.mode != "reconstruct":
        _check_points(spec, len(used))
        _check_backtest_can_choose(spec, steps)
    return check_targets(p.targets(), p, steps, require_targets)


def check_targets(
    targets: list[int],
    p: RelexParameters,
    steps: list[int],
    require_targets: bool = True,
    where: str = "parameters.target_step",
) -> tuple[list[int], list[str]]:
    """The checks every target step gets, from the config's ``target_step`` or sweep's
    ``--targets`` (``where`` names which): (the targets, warnings)."""
    warnings: list[str] = []
    used = [steps[k] for k in window_indices(len(steps), p.window)]
    if len(set(targets)) != len(targets):
        raise RelexError(f"{where}: a target step is listed twice")
    early = [t for t in targets if t <= p.base_step]
    if early and p.mode == "extrapolate":
        raise RelexError(
            f"{where}: {early[0]} is not after the base model's step (parameters.base_step = {p.base_step})"
        )
    if p.mode in ("reconstruct", "fit_reconstruct"):
        targets = targets or [used[-1]]
        unobserved = [t for t in targets if t not in used]
        if unobserved:
            raise RelexError(
                f"{where}: {p.mode} mode works on observed checkpoints; step(s) "
                f"{unobserved} are not in the window {used[0]}..{used[-1]}"
            )
    else:
        if not targets and require_targets:
            raise RelexError(f"{where}: required in extrapolate mode (e.g. target_step: 500)")
        before = [t for t in targets if t < used[0]]
        if before:  # a negative horizon: nothing in the window or its backtest speaks for it
            raise RelexError(
                f"{where}: {before[0]} is before the window ({used[0]}..{used[-1]}); extrapolate mode predicts "
                "steps after its first checkpoint: give a later step or a window that starts earlier"
            )
        inside = [t for t in targets if t <= used[-1]]
        if inside:
            warnings.append(
                f"target step(s) {inside} lie inside the window (last step {used[-1]}): "
                "this interpolates; use mode: reconstruct to denoise an observed checkpoint"
            )
    return targets, warnings


def _check_points(spec, n_used: int) -> None:
    """Enough checkpoints for the fit (and for each autoregressive re-fit)."""
    fit = spec.fit
    if fit.family == "auto":
        return  # auto scores the families the window can hold; the backtest says if none
    family = fit.curve_family
    shape = fit.resolved.shape if fit.resolved is not None else None
    need = family.min_points(shape)
    if need > n_used:
        raise WindowTooShort(family.too_few_points(shape, need, n_used))
    if spec.refit_window is not None:
        if spec.refit_window < need:
            raise RelexError(f"parameters.refit_window: {fit.family} needs at least {need} points per re-fit")
        if spec.refit_window > n_used:
            raise WindowTooShort(
                f"parameters.refit_window: {spec.refit_window} is more than the {n_used} checkpoints in the window"
            )


def _check_backtest_can_choose(spec, steps: list[int]) -> None:
    """``auto`` and a shape left open are chosen by the backtest, which needs a checkpoint
    held back beyond the fewest the candidates fit on; without one it would choose blind."""
    if spec.fit.resolved is not None:
        return
    probe = Backtest.for_fits(steps, spec, [spec.fit])
    if probe.points:
        return
    got = f"needs at least {probe.min_points + 1} checkpoints in the window to choose (got {len(probe.steps)})"
    if spec.fit.family == fits.AUTO:
        raise WindowTooShort(
            f"parameters.fit: auto: the backtest {got}; name a family (e.g. fit: linear) or observe more checkpoints"
        )
    key = spec.fit.curve_family.shape.key
    raise WindowTooShort(
        f"parameters.{key}: {spec.fit.family}'s {key} is chosen by the backtest when not given, and the "
        f"backtest {got}; give {key}: or observe more checkpoints"
    )


def _open_all(config: RelexConfig, allow_unsafe_pickle: bool) -> tuple[CheckpointReader, list[CheckpointReader]]:
    base = open_checkpoint(config.base_path, allow_unsafe_pickle)
    checkpoints = [open_checkpoint(m.model, allow_unsafe_pickle) for m in config.models or []]
    return base, checkpoints


SAFETENSORS_FILES = ("model.safetensors", SAFETENSORS_INDEX)


def _check_base(config: RelexConfig, base: CheckpointReader) -> None:
    """The merge's outputs take the base's names and shapes, so a base that is a trainer's
    checkpoint is checked against the model its config.json describes, as ``convert`` checks
    its input. A safetensors model folder (what save_pretrained writes, hence no optimizer
    state) is taken as the model itself: building the model to check it would cost every merge
    the import of transformers."""
    path = Path(config.base_path)
    if path.is_dir() and (path / "config.json").is_file() and any((path / f).is_file() for f in SAFETENSORS_FILES):
        return
    config_file = find_model_config(path, base.config_folders)
    model = model_tensors(config_file) if config_file is not None else None
    if model is None:
        return
    base.align_names(model.shapes)
    check_model_tensors(base, [n for n in base.names() if n not in model.unsaved], model)


def _check_tensors(base: CheckpointReader, checkpoints: list[CheckpointReader], tied_embeddings: bool) -> None:
    names = base.names()
    expected = set(names)
    if not names:
        raise RelexError(f"{base.path}: the base model has no tensors")
    for reader in checkpoints:
        got = set(reader.names())
        missing = sorted(expected - got)
        if missing:
            raise RelexError(f"{reader.path}: tensor {missing[0]} of the base model is missing")
        # training frameworks save the tied output matrix too; HF saves drop it
        ignorable = {"lm_head.weight"} if tied_embeddings else set()
        extra = sorted(got - expected - ignorable)
        if extra:
            raise RelexError(f"{reader.path}: tensor {extra[0]} is not in the base model {base.path}")
        for name in names:
            a, b = base.meta(name), reader.meta(name)
            if a.shape != b.shape:
                raise RelexError(f"{reader.path}: tensor {name} has shape {list(b.shape)}, base has {list(a.shape)}")
            if a.dtype.is_floating_point != b.dtype.is_floating_point:
                raise RelexError(f"{reader.path}: tensor {name} is {b.dtype}, base has {a.dtype}")


# config.json keys that fix a model's shapes and function. Only these are compared: the rest
# (versions, rope and attention defaults a newer transformers writes out, pad_token_id a trainer
# sets, auto_map, output_* flags) changes on every re-save of the same model.
_ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)


def _mixed_window(config: RelexConfig, base_config: dict | None, checkpoints: list[CheckpointReader]) -> list[str]:
    """Warnings for a window that is not one model saved again and again: a checkpoint stored in
    another precision (its rounding enters the fit as movement along the run), or a config.json
    that describes another model than the base's (the outputs take the base's)."""
    warnings = []
    stored = [_float_dtype(reader) for reader in checkpoints]
    usual = Counter(stored).most_common(1)[0][0]  # ties: the earliest checkpoint's
    odd = [(reader.path, dtype) for reader, dtype in zip(checkpoints, stored) if dtype != usual]
    if odd:
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        warnings.append(
            f"{odd[0][0]}{more}: stored in {_dtype_name(odd[0][1])}, the rest of the window in {_dtype_name(usual)}: "
            "the rounding enters the fit as movement; convert the window to one precision (relex-merge convert)"
        )
    if base_config is None:  # analyze of a base without config.json: nothing to compare with
        return warnings
    for model, reader in zip(config.models or [], checkpoints):
        other = read_model_config(model.model, reader.config_folders)
        differ = [  # a key written by one config only is a default the other leaves implicit
            k for k in _ARCHITECTURE_KEYS if other and k in other and k in base_config and other[k] != base_config[k]
        ]
        if differ:
            key = differ[0]
            warnings.append(
                f"{model.model}: its config.json differs from the base model's in {key} ({other.get(key)!r} vs "
                f"{base_config.get(key)!r}{f', and {len(differ) - 1} more key(s)' if len(differ) > 1 else ''}): "
                "the outputs take the base's; check that the window is this model's run"
            )
            break  # one line: the first checkpoint that differs
    return warnings


def _float_dtype(reader: CheckpointReader) -> torch.dtype | None:
    """The dtype most of a checkpoint's floating tensors are stored in."""
    floats = Counter(d for name in reader.names() if (d := reader.meta(name).dtype).is_floating_point)
    return floats.most_common(1)[0][0] if floats else None


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def _check_architectures(config: RelexConfig) -> dict | None:
    base_config = read_model_config(config.base_path)
    base_arch = (base_config or {}).get("architectures")
    for m in config.models or []:
        arch = (read_model_config(m.model) or {}).get("architectures")
        if base_arch and arch and arch != base_arch:
            raise RelexError(f"{m.model}: architecture {arch} differs from the base model's {base_arch}")
    return base_config


def _model_files(
    config: RelexConfig,
    base_config: dict | None,
    base_reader: CheckpointReader,
    last: CheckpointReader,
    warnings: list[str],
    writes_models: bool,
) -> tuple[RelexConfig, dict | None]:
    """config.json and tokenizer files make an output loadable. A base that lacks them (a
    trainer's weights-only save) borrows the last window checkpoint's, with a warning; without
    any config.json an output would not load, so a command that writes models is refused
    (analyze, which writes none, goes on)."""
    base = Path(config.base_path)
    if base_config is None:  # beside a DeepSpeed tag, say: in the reader's config folders
        base_config = read_model_config(base, base_reader.config_folders)
    if base_config is None:
        found = find_model_config(last.path, last.config_folders)
        if found is None and not writes_models:
            return config, None
        if found is None:
            raise RelexError(
                f"{base}: the base model has no config.json, nor has the last window checkpoint {last.path}: the "
                "output would not load; use as base_model the model folder the run started from"
            )
        base_config = read_model_config(found)
        warnings.append(f"the base model {base} has no config.json: the outputs take {found}")
    own = tokenizer_folder(base, base_reader.config_folders)
    if config.tokenizer_source is None and own is not None and own not in tokenizer_folders(base):
        config = config.model_copy(update={"tokenizer_source": str(own)})  # beside a DeepSpeed tag, say
    elif config.tokenizer_source is None and own is None and writes_models:
        folder = tokenizer_folder(Path(last.path), last.config_folders)
        if folder is None:
            warnings.append(
                f"neither the base model {base} nor the last window checkpoint has tokenizer files: the outputs "
                "have none (set tokenizer_source to load them with a tokenizer, e.g. for relex-merge eval)"
            )
        else:
            warnings.append(f"the base model {base} has no tokenizer files: the outputs take those of {folder}")
            config = config.model_copy(update={"tokenizer_source": str(folder)})
    return config, base_config


def _check_paths(config: RelexConfig) -> None:
    for key, path in [("base_model", config.base_path)] + [
        (f"models[{i}].model", m.model) for i, m in enumerate(config.models or [])
    ]:
        if not Path(path).exists():
            raise RelexError(f"{key}: {path} does not exist{resolved_against(path)}")
    if config.tokenizer_source is not None and not Path(config.tokenizer_source).is_dir():
        raise RelexError(
            f"tokenizer_source: {config.tokenizer_source} is not a directory{resolved_against(config.tokenizer_source)}"
        )


def plan_merge(
    config: RelexConfig,
    allow_unsafe_pickle: bool = False,
    require_targets: bool = True,
    source: str | None = None,
    writes_models: bool = True,
) -> MergePlan:
    """Validate everything (headers only) and return the job; ``require_targets=False`` for
    analyze, where targets only inform the verdict; ``writes_models=False`` where no model
    folder is written (analyze, watch without --out): nothing is needed to load one. ``source``
    (the config file, or ``FILE: document N``) starts the errors about the config's keys, as the
    parser's errors do; errors about a checkpoint's contents name that checkpoint."""
    discovered = config.trajectory is not None
    warnings: list[str] = []
    try:
        config = expand_trajectory(config, warnings)
        steps = _check_steps(config, discovered)
        targets, more = _check_parameters(config, steps, require_targets)
        _check_paths(config)
    except RelexError as exc:
        if source is None or "/" in str(exc).split(": ", 1)[0]:
            raise  # no config to name, or the message starts with the file it is about
        raise type(exc)(f"{source}: {exc}") from None
    warnings.extend(more)
    base_config = _check_architectures(config)
    base, checkpoints = _open_all(config, allow_unsafe_pickle)
    config, base_config = _model_files(config, base_config, base, checkpoints[-1], warnings, writes_models)
    _check_base(config, base)
    for reader in checkpoints:  # a DCP save nested under model.: the reading with the base's names
        reader.align_names(base.names())
    _check_tensors(base, checkpoints, bool((base_config or {}).get("tie_word_embeddings")))
    for reader in [base, *checkpoints]:
        warnings.extend(reader.warnings)
    warnings.extend(_mixed_window(config, base_config, checkpoints))
    resident = [reader for reader in [base, *checkpoints] if reader.resident_bytes]
    if resident:  # --max-memory bounds the spans only; these are held whole for the whole run
        warnings.append(
            f"{len(resident)} input(s), e.g. {resident[0].path}, are held whole in RAM for the whole run "
            f"({human_bytes(sum(r.resident_bytes for r in resident))}), beyond --max-memory; convert them first "
            "(relex-merge convert) to stay within it"
        )
    out_dtype = CONFIG_DTYPES[config.out_dtype] if config.out_dtype else None
    compute = torch.float64 if config.dtype == "float64" else torch.float32  # math >= fp32
    job = MergeJob(
        base=base,
        checkpoints=checkpoints,
        steps=steps,
        targets=targets,
        spec=config.parameters.spec(),
        compute_dtype=compute,
        out_dtype=out_dtype,
    )
    used = [steps[k] for k in window_indices(len(steps), job.spec.window)]
    log.debug(
        "window: %d checkpoints, steps %d..%d; the fit uses %d (steps %d..%d); targets %s; fit %s, rank %d, mode %s",
        len(steps),
        steps[0],
        steps[-1],
        len(used),
        used[0],
        used[-1],
        targets,
        job.spec.fit.describe(),
        job.spec.rank,
        job.spec.mode,
    )
    return MergePlan(config=config, job=job, base_config=base_config, warnings=warnings)

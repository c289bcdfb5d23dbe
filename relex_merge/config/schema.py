"""The YAML schema: mergekit's layout (merge_method, base_model, models, parameters, dtype)
plus relex's own fields. Parsing never mutates what it was given; expansion returns a new
config object."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from relex_merge.common.errors import RelexError
from relex_merge.core import fits
from relex_merge.core.relex import FitSpec, RelexSpec, spec_from_parameters
from relex_merge.io.dtypes import CONFIG_DTYPES

__all__ = [
    "DTYPES",
    "ModelParameters",
    "ModelEntry",
    "BaseModelEntry",
    "TrajectorySpec",
    "RelexParameters",
    "RelexConfig",
    "parse_config",
    "load_documents",
    "load_config",
]

DTYPES = tuple(CONFIG_DTYPES)  # ("float32", "float16", "bfloat16", "float64")


class _Strict(BaseModel):
    # allow_inf_nan: `.inf` and `.nan` are YAML floats; no parameter means anything with them
    # (scale: .inf wrote an all-NaN model, tau: .inf failed in the linear algebra)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelParameters(_Strict):
    """``parameters:`` of one window checkpoint under ``models:``."""

    step: StrictInt = Field(ge=0, description="optimizer step at which the checkpoint was saved")


class ModelEntry(_Strict):
    """One window checkpoint: its path (any readable format) and its step."""

    model: str
    parameters: ModelParameters


class BaseModelEntry(_Strict):
    """``base_model:`` in mergekit's mapping form (``{model: PATH}``) instead of a plain path."""

    model: str


class TrajectorySpec(_Strict):
    """A run directory whose step checkpoints are discovered instead of listed by hand."""

    run_dir: str
    steps: str | list[StrictInt] | None = Field(
        default=None, description='"A-B" (inclusive), a list of steps, or null for all found'
    )
    every: StrictInt | None = Field(default=None, ge=1, description="stride within steps")


class _Parameters(_Strict):
    """The ``parameters:`` block: targets and everything about the fit. Validators reject shape
    keys the chosen fit does not use and options that only apply to another mode. The shape keys
    (degree, p, tau, ...) are added from the fit families' declarations (``RelexParameters``)."""

    target_step: StrictInt | list[StrictInt] | None = None
    rank: StrictInt = Field(default=1, ge=1)  # directions fitted per tensor
    fit: str = Field(default="linear", description="a fit family (relex_merge.core.fits) or auto")
    window: StrictInt | None = Field(default=None, ge=2)  # fit on the last `window` checkpoints only
    scale: float = Field(default=1.0, gt=0)  # multiplies the predicted displacement
    mode: Literal["extrapolate", "reconstruct", "fit_reconstruct"] = "extrapolate"
    refit_every: StrictInt | None = Field(default=None, ge=1, description="autoregressive re-fitting")
    refit_window: StrictInt | None = Field(default=None, ge=2, description="points each re-fit uses")
    base_step: StrictInt = Field(default=0, ge=0, description="step of the base model")

    @field_validator("fit")
    @classmethod
    def _known_family(cls, value):
        if value != fits.AUTO and value not in fits.names():
            hint = difflib.get_close_matches(value, [*fits.names(), fits.AUTO], n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(f"unknown fit {value!r}{suggestion}; choose {', '.join(fits.names())} or {fits.AUTO}")
        return value

    @model_validator(mode="after")
    def _shape_keys_match_the_fit(self):
        used = None if self.fit == fits.AUTO else fits.family(self.fit).shape
        for key in fits.shape_keys():
            value = getattr(self, key)
            if value is None:
                continue
            if used is None or used.key != key:
                users = [f.name for f in fits.families() if f.shape is not None and f.shape.key == key]
                if self.fit == fits.AUTO:
                    raise ValueError(f"{key}: with fit: auto the backtest chooses every shape; remove {key}")
                raise ValueError(f"{key}: only used by fit: {', '.join(users)} (fit is {self.fit})")
            problem = used.problem(value)
            if problem:
                raise ValueError(f"{key}: {problem}")
        if self.fit != fits.AUTO and isinstance(fits.family(self.fit), fits.DirectFamily):
            if self.refit_every is not None:
                raise ValueError(
                    f"refit_every: fit: {self.fit} weighs the window's checkpoints directly; it has no curve to re-fit"
                )
            if self.mode == "fit_reconstruct":
                raise ValueError(
                    f"mode: fit: {self.fit} weighs the window's checkpoints directly; it has no curve to "
                    "evaluate at observed steps (use mode: reconstruct, or another fit)"
                )
        if self.refit_window is not None and self.refit_every is None:
            raise ValueError("refit_window: only used with refit_every")
        if self.refit_every is not None and self.mode != "extrapolate":
            raise ValueError(f"refit_every: only used in extrapolate mode (mode is {self.mode})")
        return self

    @field_validator("target_step")
    @classmethod
    def _targets_non_negative(cls, value):
        values = value if isinstance(value, list) else [value]
        if any(v is not None and v < 0 for v in values):
            raise ValueError("target steps must be >= 0")
        if isinstance(value, list) and not value:
            raise ValueError("give at least one target step")
        return value

    def targets(self) -> list[int]:
        """``target_step`` as a list (empty when absent: reconstruct modes and analyze)."""
        if self.target_step is None:
            return []
        return list(self.target_step) if isinstance(self.target_step, list) else [self.target_step]

    def spec(self) -> RelexSpec:
        """These parameters as the RelexSpec the math takes (targets excluded)."""
        return spec_from_parameters(**self.model_dump(exclude={"target_step"}))


def _shape_fields() -> dict[str, Any]:
    """One optional field per shape key the fit families declare."""
    fields: dict[str, Any] = {}
    for key in sorted(fits.shape_keys()):
        integer, description = fits.shape_parameter(key)
        fields[key] = (StrictInt | None if integer else float | None, Field(default=None, description=description))
    return fields


RelexParameters = create_model("RelexParameters", __base__=_Parameters, __module__=__name__, **_shape_fields())
RelexParameters.__doc__ = _Parameters.__doc__


class RelexConfig(_Strict):
    """One ``merge_method: relex`` document, validated (frozen; unknown keys are errors).
    ``models`` and ``trajectory`` are alternatives: planning expands a trajectory into models."""

    merge_method: Literal["relex"]
    base_model: str | BaseModelEntry
    models: list[ModelEntry] | None = None
    trajectory: TrajectorySpec | None = None
    parameters: RelexParameters = RelexParameters()
    dtype: Literal[DTYPES] = "float32"  # type: ignore[valid-type]  # compute dtype (math is at least float32)
    out_dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]  # None: each tensor's base dtype
    tokenizer_source: str | None = None  # folder to copy the tokenizer from (default: the base)
    name: str | None = None  # stage name in a multi-document config

    @property
    def base_path(self) -> str:
        """The base model's path, whichever form ``base_model`` was given in."""
        return self.base_model if isinstance(self.base_model, str) else self.base_model.model

    def to_yaml(self) -> str:
        """The config as YAML, unset keys left out (--print-config, relex_config.yml)."""
        data = self.model_dump(mode="json", exclude_none=True)
        if "parameters" in data:  # the shape keys right after the fit they shape
            params, shape_keys = data["parameters"], fits.shape_keys()
            order = [k for k in params if k not in shape_keys]
            at = order.index("fit") + 1 if "fit" in order else len(order)
            order[at:at] = [k for k in sorted(shape_keys) if k in params]
            data["parameters"] = {k: params[k] for k in order}
        return yaml.safe_dump(data, sort_keys=False)

    def for_output(self, target: int, scale: float, fit: FitSpec | None = None) -> RelexConfig:
        """The config that reproduces one output on its own (written beside it): its target,
        scale and fit, with the shape the backtest chose written out."""
        update: dict[str, Any] = {"target_step": target, "scale": scale}
        if fit is not None:
            update["fit"] = fit.family
            for key in fits.shape_keys():
                update[key] = None
            shape = fit.curve_family.shape
            if shape is not None and fit.shape is not None:
                update[shape.key] = int(fit.shape) if shape.integer else fit.shape
        parameters = self.parameters.model_copy(update=update)
        return self.model_copy(update={"parameters": parameters})


def _location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "<top>"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    for arg in list(candidates):
        candidates += list(getattr(arg, "__args__", ()))
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _user_loc(loc: tuple) -> tuple:
    """``loc`` without pydantic's union branch tags (``int``, ``list[int]``, ...): only the keys
    and list positions the user wrote."""
    model: Any = RelexConfig
    out: list = []
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        elif model is not None and part in model.model_fields:
            out.append(part)
            model = _model_of(model.model_fields[part].annotation)
        elif model is None or out and isinstance(out[-1], str) and part not in getattr(model, "model_fields", {}):
            continue  # a branch tag
    return tuple(out)


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names valid at the parent of ``loc`` (for did-you-mean hints)."""
    model: Any = RelexConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _model_of(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _expected(error: dict) -> str:
    """What the user should have written, in plain words (no pydantic type names)."""
    kind = error["type"]
    if kind == "list_type" and error["loc"] and error["loc"][-1] == "list[int]":
        return "a list of integers"
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    message = error["msg"]
    for prefix in ("Value error, ", "Input should be "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    if kind.startswith(("greater", "less")):
        return f"a value {message}"
    return message


def _first_error_line(source: str, err: ValidationError) -> str:
    # Pydantic reports every failed branch of a union; the most specific (deepest) error names
    # what the user got wrong, and the branches of one key are merged: "an integer or a list".
    errors = sorted(err.errors(), key=lambda e: -len(e["loc"]))
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        loc = extra[0]["loc"]
        hint = difflib.get_close_matches(str(loc[-1]), _allowed_keys(loc), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{source}: unknown key '{_location(loc)}'{suggestion}"
    first = errors[0]
    loc = _user_loc(first["loc"])
    if first["type"] == "value_error":  # our validators say "key: what is wrong"
        message = _expected(first)
        key, sep, rest = message.partition(": ")
        if sep and " " not in key:
            return f"{source}: {_location(loc + (key,))}: {rest}"
        return f"{source}: {_location(loc)}: {message}"
    if first["type"] == "missing":
        return f"{source}: {_location(loc)}: required"
    same = [e for e in errors if _user_loc(e["loc"]) == loc and e["type"] in _EXPECTED]
    if len(same) > 1:
        wanted = " or ".join(dict.fromkeys(_expected(e) for e in same))
    else:
        wanted = _expected(first)
    got = first.get("input")
    shown = f", got {got!r}" if isinstance(got, (str, int, float, bool)) or got is None else ""
    if first["type"] in _EXPECTED or first["type"] == "literal_error" or first["type"].startswith(("greater", "less")):
        return f"{source}: {_location(loc)}: expected {wanted}{shown}"
    return f"{source}: {_location(loc)}: {wanted}{shown}"


def parse_config(data: Any, source: str) -> RelexConfig:
    """Validate one parsed YAML document as a relex config; ``source`` (a file name, or
    ``FILE: document N``) starts the one-line RelexError naming the first problem."""
    if not isinstance(data, dict):
        raise RelexError(f"{source}: expected a YAML mapping at the top level")
    method = data.get("merge_method")
    if method != "relex":
        raise RelexError(f"{source}: merge_method: expected 'relex', got {method!r}")
    try:
        return RelexConfig.model_validate(data)
    except ValidationError as err:
        raise RelexError(_first_error_line(source, err)) from err


def load_documents(path: str | Path) -> list[Any]:
    """The YAML documents of a config file (several for multi-stage merges)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RelexError(f"{path}: config file not found") from None
    except OSError as exc:
        raise RelexError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RelexError(f"{path}:{where} YAML syntax error: {problem}") from None
    if not documents:
        raise RelexError(f"{path}: the config is empty")
    return documents


def load_config(path: str | Path) -> RelexConfig:
    """A single-document relex config."""
    documents = load_documents(path)
    if len(documents) != 1:
        relex = [n for n, d in enumerate(documents, 1) if isinstance(d, dict) and d.get("merge_method") == "relex"]
        hint = (
            f"; this command takes one relex config: put document {relex[0]} (a relex stage) in a file of its "
            "own, with its stage names replaced by paths"
            if relex
            else ""
        )
        raise RelexError(f"{path}: expected one YAML document, found {len(documents)}{hint}")
    return parse_config(documents[0], str(path))

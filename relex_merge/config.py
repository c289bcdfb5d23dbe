"""The YAML schema: mergekit's layout (merge_method, base_model, models, parameters, dtype)
plus relex's own fields. Parsing never mutates what it was given; expansion returns a new
config object."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from relex_merge.errors import RelexError
from relex_merge.fit import FitSpec, RelexSpec

DTYPES = ("float32", "float16", "bfloat16", "float64")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParameters(_Strict):
    step: StrictInt = Field(ge=0, description="optimizer step at which the checkpoint was saved")


class ModelEntry(_Strict):
    model: str
    parameters: ModelParameters


class BaseModelEntry(_Strict):
    model: str


class TrajectorySpec(_Strict):
    """A run directory whose step checkpoints are discovered instead of listed by hand."""

    run_dir: str
    steps: Union[str, list[StrictInt], None] = Field(
        default=None, description='"A-B" (inclusive), a list of steps, or null for all found'
    )
    every: StrictInt | None = Field(default=None, ge=1, description="stride within steps")


class RelexParameters(_Strict):
    target_step: Union[StrictInt, list[StrictInt], None] = None
    rank: StrictInt = Field(default=1, ge=1)
    fit: Literal["linear", "linear_origin", "polynomial"] = "linear"
    degree: StrictInt = Field(default=2, ge=1)
    window: StrictInt | None = Field(default=None, ge=2)
    scale: float = Field(default=1.0, gt=0)
    mode: Literal["extrapolate", "reconstruct"] = "extrapolate"
    base_step: StrictInt = Field(default=0, ge=0, description="step of the base model")

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
        if self.target_step is None:
            return []
        return list(self.target_step) if isinstance(self.target_step, list) else [self.target_step]

    def spec(self) -> RelexSpec:
        return RelexSpec(
            rank=self.rank,
            fit=FitSpec(kind=self.fit, degree=self.degree, origin_step=float(self.base_step)),
            window=self.window,
            scale=self.scale,
            mode=self.mode,
        )


class RelexConfig(_Strict):
    merge_method: Literal["relex"]
    base_model: Union[str, BaseModelEntry]
    models: list[ModelEntry] | None = None
    trajectory: TrajectorySpec | None = None
    parameters: RelexParameters = RelexParameters()
    dtype: Literal[DTYPES] = "float32"  # type: ignore[valid-type]
    out_dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    tokenizer_source: str | None = None
    name: str | None = None

    @property
    def base_path(self) -> str:
        return self.base_model if isinstance(self.base_model, str) else self.base_model.model

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)

    def for_output(self, target: int, scale: float) -> "RelexConfig":
        """The config that reproduces one output on its own (written beside it)."""
        if self.parameters.targets() == [target] and self.parameters.scale == scale:
            return self
        parameters = self.parameters.model_copy(update={"target_step": target, "scale": scale})
        return self.model_copy(update={"parameters": parameters})


def _location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "<top>"


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names valid at the parent of ``loc`` (for did-you-mean hints)."""
    model: Any = RelexConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for arg in list(candidates):
            candidates += list(getattr(arg, "__args__", ()))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _first_error_line(source: str, err: ValidationError) -> str:
    # Pydantic reports every failed branch of a union; the most specific (deepest) is the
    # one that names what the user got wrong.
    errors = sorted(err.errors(), key=lambda e: -len(e["loc"]))
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        loc = extra[0]["loc"]
        hint = difflib.get_close_matches(str(loc[-1]), _allowed_keys(loc), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{source}: unknown key '{_location(loc)}'{suggestion}"
    first = errors[0]
    return f"{source}: {_location(first['loc'])}: {first['msg']}"


def parse_config(data: Any, source: str) -> RelexConfig:
    if not isinstance(data, dict):
        raise RelexError(f"{source}: expected a YAML mapping at the top level")
    method = data.get("merge_method")
    if method != "relex":
        raise RelexError(
            f"{source}: merge_method: expected 'relex', got {method!r}"
        )
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
        raise RelexError(f"{path}: expected one YAML document, found {len(documents)}")
    return parse_config(documents[0], str(path))

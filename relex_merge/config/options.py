"""Every run-time option of relex-merge in one validated model. The library takes an ``Options``;
the command line's flags are generated from its fields (``flags(...)``), so a flag's name, type,
default, help text and validation live in one place.

    from relex_merge import Options, run_merge
    run_merge("merge_configs/demo.yml", "out/demo", Options(max_memory="4GB", threads=2))
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from relex_merge.common.errors import RelexError
from relex_merge.common.units import default_max_memory, parse_size
from relex_merge.core.rule import DEFAULT_RULE

if TYPE_CHECKING:
    from relex_merge.engine import EngineOptions

__all__ = ["Options", "flags", "resolve_device"]

_SIZES = ("max_memory", "shard_size")


def _flag(name: str) -> str:
    return "--" + Options.model_fields[name].json_schema_extra.get("flag", name.replace("_", "-"))  # type: ignore[union-attr]


class Options(BaseModel):
    """Options of merges, analyses, sweeps and conversions (each command uses a subset)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # --timeout nan, --tolerance inf

    # reading the inputs
    max_memory: int | None = Field(
        None,
        description="Memory budget for tensor data, e.g. 8GB (default: half the free RAM).",
        json_schema_extra={"metavar": "SIZE"},
    )
    device: str = Field(
        "auto",
        description="auto, cpu, cuda or cuda:N (auto: cuda:LOCAL_RANK when a GPU is there).",
        json_schema_extra={},
    )
    threads: int | None = Field(
        None, description="Worker threads (default: one per core, at most 8).", json_schema_extra={}
    )
    executor: str | None = Field(
        None,
        description="Who runs the span tasks: a registered executor such as threads "
        "or distributed (default: distributed under torchrun/srun, else threads).",
        json_schema_extra={"metavar": "NAME"},
    )
    allow_unsafe_pickle: bool = Field(
        False,
        description="Load .bin/.pt pickles that need more than weights-only loading (trusted files only).",
        json_schema_extra={},
    )
    allow_nonfinite: bool = Field(
        False,
        description="Merge although inputs hold NaN/Inf (those tensors are copied from the base).",
        json_schema_extra={},
    )
    # writing the output
    overwrite: bool = Field(False, description="Replace a non-empty output folder.", json_schema_extra={})
    shard_size: int = Field(
        5 * 1000**3,
        description="Largest output shard, e.g. 5GB.",
        json_schema_extra={"metavar": "SIZE", "shown_default": "5GB"},
    )
    output_format: str = Field(
        "safetensors",
        description="A registered output format (relex_merge/io/writers/).",
        json_schema_extra={"metavar": "NAME", "shown_default": "safetensors"},
    )
    full_hash: bool = Field(
        False,
        description="Fingerprint inputs with a full sha256 (default: fast sampled hash).",
        json_schema_extra={"flag": "hash"},
    )
    # merges
    intermediate_dir: Path | None = Field(
        None,
        description="Keep multi-stage intermediates here (default: a temporary folder beside OUT, removed after).",
        json_schema_extra={},
    )
    lazy: bool = Field(False, description="Reuse stages already finished in --intermediate-dir.", json_schema_extra={})
    fit_cache: Path | None = Field(
        None,
        description="Gram matrices saved by `analyze --out`: skips the Gram pass (single-stage relex configs).",
        json_schema_extra={"metavar": "FILE"},
    )
    when_unsupported: Literal["write", "stop", "refuse"] = Field(
        "write",
        description="A target the backtest's verdict does not support: write the prediction anyway (with its "
        "verdict), stop (write the last window checkpoint in its place, with a card that says why), or refuse "
        "(exit 3, nothing written).",
        json_schema_extra={"shown_default": "write"},
    )
    require_supported: bool = Field(
        False,
        description="The same as --when-unsupported refuse.",
        json_schema_extra={},
    )
    tolerance: Optional[float] = Field(
        None,
        description="Backtest relative error under which a fit counts as holding (default: the calibrated verdict "
        "rule's).",
        json_schema_extra={"shown_default": str(DEFAULT_RULE.tolerance)},
    )
    profile: bool = Field(
        False, description="Print the split of time between reading, math and writing.", json_schema_extra={}
    )
    # several processes (torchrun, srun)
    timeout: float = Field(
        1800.0,
        description="Seconds a rank waits for the others (torchrun/srun runs).",
        json_schema_extra={"shown_default": "1800"},
    )

    @field_validator(*_SIZES, mode="before")
    @classmethod
    def _size(cls, value: Any, info) -> Any:
        if value is None:
            return None
        size = parse_size(value, _flag(info.field_name))
        if size <= 0:
            raise RelexError(f"{_flag(info.field_name)} must be positive")
        return size

    @field_validator("threads")
    @classmethod
    def _threads(cls, value):
        if value is not None and value < 1:
            raise RelexError(f"--threads: expected at least 1, got {value}")
        return value

    @field_validator("executor")
    @classmethod
    def _executor(cls, value):
        if value is not None:
            from relex_merge.engine.executors import REGISTRY  # loads torch: only when asked for one

            if value not in REGISTRY:
                raise RelexError(f"--executor: unknown executor {value!r} (known: {', '.join(REGISTRY.names())})")
        return value

    @field_validator("output_format")
    @classmethod
    def _output_format(cls, value):
        from relex_merge.io.writers import REGISTRY

        if value not in REGISTRY:
            raise RelexError(f"--output-format: unknown output format {value!r} (known: {', '.join(REGISTRY.names())})")
        return value

    @field_validator("tolerance")
    @classmethod
    def _tolerance(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value < 10:
            raise RelexError("--tolerance: expected a relative error such as 0.2")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if value <= 0:
            raise RelexError("--timeout: expected seconds > 0")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise RelexError(f"--device: expected auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_policy(self):
        if self.require_supported and self.when_unsupported not in ("write", "refuse"):
            raise RelexError(
                f"--require-supported and --when-unsupported {self.when_unsupported} contradict each other; give one"
            )
        return self

    @property
    def unsupported_policy(self) -> str:
        """--when-unsupported, with --require-supported read as ``refuse``."""
        return "refuse" if self.require_supported else self.when_unsupported

    @classmethod
    def build(cls, **values: Any) -> Options:
        """Options from keyword values (flags' or a caller's), as one-line errors."""
        try:
            return cls(**values)
        except ValidationError as err:
            first = err.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else "options"
            flag = _flag(name) if name in cls.model_fields else name
            if first["type"] == "finite_number":
                raise RelexError(f"{flag}: expected a finite number, got {first['input']}") from None
            raise RelexError(f"{flag}: {first['msg']}") from None

    def engine(self, local_rank: int | None = None) -> EngineOptions:
        """What the engine runs with: the memory budget and the device resolved."""
        from relex_merge.engine import EngineOptions

        if local_rank is None:
            from relex_merge.engine import process_group

            local_rank = process_group.current().local_rank
        return EngineOptions(
            max_memory=self.max_memory or default_max_memory(),
            device=resolve_device(self.device, local_rank),
            allow_nonfinite=self.allow_nonfinite,
            threads=self.threads,
            executor=self.executor,
        )


def resolve_device(text: str, local_rank: int | None = None):
    """``auto``: the GPU of this rank (cuda:LOCAL_RANK) when CUDA is there, else the CPU."""
    import torch

    if text == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", (local_rank or 0) % torch.cuda.device_count())
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RelexError("--device: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RelexError(f"--device: no GPU {device.index} (found {torch.cuda.device_count()})")
    return device


def _click_option(name: str):
    import click

    field = Options.model_fields[name]
    extra: dict = field.json_schema_extra or {}  # type: ignore[assignment]
    kwargs: dict[str, Any] = {"help": field.description}
    annotation = field.annotation
    if annotation is bool:
        kwargs["is_flag"] = True
    elif name in _SIZES:
        kwargs.update(default=None, metavar=extra.get("metavar", "SIZE"))
    elif get_origin(annotation) is Literal:
        kwargs.update(type=click.Choice(get_args(annotation)), default=None)
    elif annotation in (Optional[str], str) and name != "device":
        kwargs.update(default=None, metavar=extra.get("metavar", "TEXT"))
    elif annotation in (Optional[int], int):
        kwargs.update(type=int, default=None)
    elif annotation in (float, Optional[float]):
        kwargs.update(type=float, default=None)
    elif annotation == Optional[Path]:
        kwargs.update(type=click.Path(path_type=Path), default=None, metavar=extra.get("metavar", "DIR"))
    else:
        kwargs.update(default=None)
    shown = extra.get("shown_default") or (field.default if field.default not in (None, False) else None)
    if shown is not None:
        kwargs["help"] += f"  [default: {shown}]"
    return click.option(_flag(name), name, **kwargs)


def flags(*names: str) -> Callable:
    """Decorate a click command with the flags of these Options fields; the command receives one
    validated ``options`` argument instead of the separate values."""

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            given = {n: kwargs.pop(n) for n in names}
            kwargs["options"] = Options.build(**{n: v for n, v in given.items() if v is not None})
            return func(*args, **kwargs)

        for name in reversed(names):
            wrapper = _click_option(name)(wrapper)
        return wrapper

    return decorate

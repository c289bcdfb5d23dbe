"""The checkpoint formats, found by looking in this folder, and the one place that picks a
reader for a path.

Every module in this folder, ``relex_merge.io.formats``, is a format module and defines ``FORMAT``, a
:class:`~relex_merge.io.base.CheckpointFormat`. ``open_checkpoint``, ``trajectory:``
discovery (``weight_patterns``) and the "no model weights found" error all ask this registry.

Adding a format is one new file, ``relex_merge/io/formats/<name>.py``:

1. Write a reader: a class with ``path``, ``names()``, ``meta(name)``, ``read(name, rows)``
   and ``files()`` (see ``CheckpointReader`` in ``base``; ``StateDictReader`` serves formats
   that load a whole state dict). Import only ``relex_merge.io.base`` (and ``dtypes``, ``hf``)
   from this package, never another format.
2. Write ``detect(path) -> bool``: cheap (file names, not contents), ``False`` for anything
   that is not this format, including a path that is a file when the format is a folder.
3. Define ``FORMAT = CheckpointFormat(name=..., label=..., description=..., priority=...,
   detect=detect, open=..., weight_patterns=(...), file_types=(...))``. ``open`` takes
   ``(path, allow_unsafe_pickle)``. ``priority`` places it in the detection order (the
   first format whose ``detect`` says yes opens the path): 10 safetensors, 20 .bin, 30 verl
   FSDP, 40 DCP, 50 ZeRO; pick a free number.
4. Raise ``RelexError`` with a one-line message for anything wrong with the user's files.

Nothing else changes; the tests check that the registry holds every module of this folder
(a helper module shared by several formats would go in ``relex_merge/io/``, or be named ``_*.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from relex_merge.common.errors import RelexError
from relex_merge.common.registry import Registry
from relex_merge.io.base import CheckpointFormat, CheckpointReader, glob_any

__all__ = ["REGISTRY", "formats", "weight_patterns", "has_weights", "detect", "open_checkpoint", "describe"]

log = logging.getLogger(__name__)


def _free_priority(found: list[CheckpointFormat], fmt: CheckpointFormat) -> None:
    clash = [f.name for f in found if f.priority == fmt.priority]
    if clash:
        raise TypeError(f"checkpoint formats {clash[0]!r} and {fmt.name!r} have the same priority {fmt.priority}")


# detection order: lowest priority first
REGISTRY: Registry[CheckpointFormat] = Registry(
    __name__, "FORMAT", CheckpointFormat, "checkpoint format", order=lambda fmt: fmt.priority, check=_free_priority
)


def formats() -> list[CheckpointFormat]:
    """Every registered format, in detection order."""
    return REGISTRY.all()


def weight_patterns() -> tuple[str, ...]:
    """Globs that mark a folder as holding model weights of some format, in detection order."""
    return tuple(p for fmt in REGISTRY.all() for p in fmt.weight_patterns)


def has_weights(folder: Path) -> bool:
    """Whether a folder directly holds weight files of any format."""
    return glob_any(folder, weight_patterns())


def _or_list(items: list[str]) -> str:
    """``a, b or c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def describe() -> str:
    """The formats as error messages list them: "safetensors, ..., torch.distributed.checkpoint
    or DeepSpeed ZeRO"."""
    return _or_list([fmt.label for fmt in REGISTRY.all()])


def detect(path: Path) -> CheckpointFormat:
    """The format of an existing weight file or checkpoint folder; one-line errors otherwise."""
    for fmt in REGISTRY.all():
        if fmt.detect(path):
            log.debug("%s: %s checkpoint", path, fmt.name)
            return fmt
    if path.is_file():
        types = [t for fmt in REGISTRY.all() for t in fmt.file_types]
        raise RelexError(f"{path}: unknown weight file type (expected {_or_list(types)})")
    raise RelexError(f"{path}: no model weights found ({describe()})")


def open_checkpoint(path: str | Path, allow_unsafe_pickle: bool = False) -> CheckpointReader:
    """The reader for a checkpoint folder or weight file, picked by what it contains."""
    path = Path(path)
    if not path.exists():
        raise RelexError(f"{path}: no such file or directory")
    return detect(path).open(path, allow_unsafe_pickle)

"""What every checkpoint format shares: the reader interface (tensor names, shape/dtype, and
reads of a whole tensor or a range of its rows, dim 0), the format description the registry
collects, and helpers more than one format uses. Readers open files lazily (mmap) and never
materialise a whole model.

Nothing here imports a format module: formats import this, the registry imports the formats.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import threading
import types
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from relex_merge.common.errors import RelexError
from relex_merge.io.pickles import dtensor_safe_globals, refused

__all__ = [
    "TensorMeta",
    "CheckpointReader",
    "CheckpointFormat",
    "StateDictReader",
    "read_span",
    "indexed_files",
    "load_torch_file",
    "KnownType",
    "UNREADABLE_PICKLE",
    "UNREADABLE_TORCH_FILE",
    "first_line",
    "glob_any",
]


@dataclass(frozen=True)
class TensorMeta:
    """A tensor's shape and dtype, known from a header before any data is read."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        """Size of the data in bytes."""
        return self.numel * self.dtype.itemsize

    @property
    def rows(self) -> int:
        """Length of the axis reads are chunked along (1 for a scalar)."""
        return self.shape[0] if self.shape else 1


class CheckpointReader(ABC):
    """One checkpoint's tensors: names, metadata, and reads of whole tensors or row ranges.

    Every reader implements ``names``, ``meta``, ``read`` and ``files``. The optional
    capabilities are declared, not guessed: a reader that can map spans sets
    ``supports_views`` and implements ``view``; one whose reads may run on several threads at
    once sets ``thread_safe_reads`` (the engine serialises the reads of the others); one that
    can only read whole tensors sets ``whole_tensor_reads`` (the engine then reads each tensor
    in one span); one that holds its tensors in RAM sets ``resident_bytes`` (planning warns);
    one with something to tell the user sets ``warnings``; one holding open files implements
    ``close``; one whose names can be read more than one way (a DCP save nested under
    ``model.``) implements ``align_names``.

    Every tensor a reader returns is the caller's, detached from autograd
    (``requires_grad=False``), whatever the file stored.
    """

    path: Path  # the folder or file the user named; error messages start with it

    supports_views: ClassVar[bool] = False
    """``view`` returns a span without copying it (a mapping of the file)."""
    thread_safe_reads: ClassVar[bool] = False
    """``read`` and ``view`` may be called from several threads at once."""
    whole_tensor_reads: ClassVar[bool] = False
    """A read of some rows costs as much as a read of the whole tensor (DCP loads stored
    tensors whole), so the engine gives each tensor one span: it is read once per pass, not
    once per span."""
    resident_bytes: int = 0
    """Bytes of tensor data the reader holds in RAM for as long as it is open (a consolidated
    state dict, not a mapping of files): outside what ``--max-memory`` bounds."""
    warnings: Sequence[str] = ()
    """Notes for the user about this checkpoint (printed, and listed in the model card)."""
    config_folders: Sequence[Path] = ()
    """Folders besides the checkpoint's own (and its ``huggingface/``) where its ``config.json``
    may be: a DeepSpeed tag folder's parent (HF Trainer's ``checkpoint-N/global_stepN``)."""

    def align_names(self, expected: Collection[str]) -> None:
        """Where the checkpoint's names can be read more than one way, take the reading that
        matches ``expected`` (the model's names: the base's, or those config.json builds). A
        hint: the caller still checks the names. The default does nothing."""

    def prefetch(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Hint that a span will be read soon, so the OS can start reading it from disk while
        the engine works on earlier spans. A hint only: the default does nothing."""

    @abstractmethod
    def names(self) -> list[str]:
        """Every tensor's name, in the checkpoint's order."""

    @abstractmethod
    def meta(self, name: str) -> TensorMeta:
        """A tensor's shape and dtype (no data is read)."""

    @abstractmethod
    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A tensor, or its rows ``[rows[0], rows[1])`` along dim 0, as a tensor the caller owns."""

    @abstractmethod
    def files(self) -> list[Path]:
        """The files the tensors come from (fingerprinted in the model card)."""

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Like ``read``, for reading only and without a copy; only where ``supports_views``."""
        raise NotImplementedError(f"{type(self).__name__} has no views (supports_views is False)")

    def close(self) -> None:
        """Release open files; the reader is not used afterwards."""


def read_span(reader: CheckpointReader, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A span of rows for reading only: a mapped view where the reader supports views, else a read."""
    return reader.view(name, rows) if reader.supports_views else reader.read(name, rows)


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint format as the registry (``relex_merge.io.formats``) sees it. Each format
    module defines one as ``FORMAT``."""

    name: str
    """Short identifier ("safetensors", "fsdp")."""
    label: str
    """How the "no model weights found (...)" error lists the format."""
    description: str
    """One line for help and error texts."""
    priority: int
    """Detection order: formats are tried from the lowest priority up; the first that detects wins."""
    detect: Callable[[Path], bool]
    """Whether a path (a weight file or a folder) holds this format."""
    open: Callable[[Path, bool], CheckpointReader]
    """The reader for a detected path: ``open(path, allow_unsafe_pickle)``."""
    weight_patterns: tuple[str, ...] = ()
    """Globs that mark a folder as holding this format's weights (``trajectory:`` discovery)."""
    file_types: tuple[str, ...] = ()
    """Single weight files it opens, as the "unknown weight file type" error names them."""


def glob_any(folder: Path, patterns: Iterable[str]) -> bool:
    """Whether ``folder`` is a folder and any of the globs matches something in it."""
    return folder.is_dir() and any(any(folder.glob(p)) for p in patterns)


def indexed_files(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` (HF sharded checkpoint) points to, all present."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RelexError(f"{index}: not a valid index ({exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise RelexError(f"{index}: not a valid index (weight_map must map tensor names to file names)")
    files = sorted({index.parent / f for f in weight_map.values()})
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise RelexError(f"{index}: lists {missing[0].name}, which does not exist")
    return files


UNREADABLE_PICKLE = (pickle.UnpicklingError, EOFError, OSError, ValueError, LookupError, ImportError)
"""What unpickling a damaged or foreign file raises: a truncated or garbled stream (EOFError,
UnpicklingError, ValueError incl. UnicodeDecodeError, a bad memo or stack index as
LookupError), an unreadable file (OSError), a class from a module not installed here
(ImportError, unsafe loads only). Anything else (TypeError, AttributeError, ...) is left to
propagate: it is as likely a bug as a bad file."""

UNREADABLE_TORCH_FILE = (RuntimeError, *UNREADABLE_PICKLE)
"""``UNREADABLE_PICKLE`` plus the RuntimeError of torch's zip and mmap readers (a truncated
archive, a file not saved in the zip format)."""


KnownType = tuple[type, str]
"""A class a format's pickles may hold beyond tensors and containers, with the name it is
pickled under (``(LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler")``): an inert
stand-in of ours, so that loading never imports (or runs) the library that wrote the file."""


def load_torch_file(
    file: Path, allow_unsafe_pickle: bool = False, known_types: Sequence[KnownType] = (), mmap: bool = True
):
    """torch.load (with mmap unless told otherwise); one-line errors for files that are not readable torch checkpoints
    (other exceptions propagate).

    This is the one place relex-merge unpickles a checkpoint. Without the user's consent
    (``--allow-unsafe-pickle``) the load is weights-only: tensors, containers and the
    ``known_types`` a format declares (allow-listed under their pickled names, built as our
    stand-ins); a file holding anything else is refused in one line naming what it holds. With
    consent it is a full unpickle, with ``known_types`` still resolved to the stand-ins."""
    try:
        if allow_unsafe_pickle:
            module = _substituting_pickle(known_types) if known_types else pickle
            return torch.load(file, map_location="cpu", mmap=mmap, weights_only=False, pickle_module=module)
        with _allowed([*dtensor_safe_globals(), *known_types]):
            return torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            holds = _unknown_globals(file, known_types)
            raise refused(file, holds or "something other than tensors") from None
        raise RelexError(f"{file}: cannot read: not a torch checkpoint ({first_line(exc)})") from None
    except UNREADABLE_TORCH_FILE as exc:
        raise RelexError(f"{file}: cannot read: truncated or not a torch checkpoint ({first_line(exc)})") from None


_ALLOWED_LOCK = threading.Lock()


def _global_name(entry) -> str:
    if isinstance(entry, tuple):  # (stand-in, "module.Name")
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


@contextlib.contextmanager
def _allowed(entries: Sequence) -> Iterator[None]:
    """torch's weights-only allow-list, plus ``entries`` while the body runs. Only the entries
    not already allowed are added, and only those are removed after (torch's own ``safe_globals``
    removes every entry it names on exit: DTensor's, registered by torch itself, were lost for the
    rest of the process). Serialized: the allow-list is process-wide."""
    with _ALLOWED_LOCK:
        present = {_global_name(g) for g in torch.serialization.get_safe_globals()}
        missing = [g for g in entries if _global_name(g) not in present]
        with torch.serialization.safe_globals(missing):
            yield


def _unknown_globals(file: Path, known_types: Sequence[KnownType]) -> str:
    """The classes and functions a pickle names beyond the allowed ones, for the refusal."""
    try:
        found = set(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except Exception:  # noqa: BLE001  (only for the message: the refusal stands without it)
        return ""
    unknown = sorted(found - {name for _, name in known_types})
    return ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")


def _substituting_pickle(known_types: Sequence[KnownType]) -> types.ModuleType:
    """A pickle module for torch.load whose Unpickler builds ``known_types`` as our stand-ins
    (the library that wrote them need not be installed) and everything else as pickle does."""
    by_name = {name: cls for cls, name in known_types}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            return by_name.get(f"{module}.{name}") or super().find_class(module, name)

    module = types.ModuleType("relex_merge_pickle")
    module.__dict__.update({k: getattr(pickle, k) for k in ("load", "loads", "dump", "dumps", "Pickler")})
    module.Unpickler = Unpickler
    return module


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class StateDictReader(CheckpointReader):
    """Tensors already in (memory-mapped) memory, e.g. a loaded pickle."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], files: list[Path]):
        self.path = path
        # detached: a trainer's state dict may hold Parameters (requires_grad=True), which
        # autograd then tracks through every read and refuses in the kernels' out= math
        self._tensors = {name: t.detach() for name, t in tensors.items()}
        self._files = files

    def names(self) -> list[str]:
        return list(self._tensors)

    def meta(self, name: str) -> TensorMeta:
        t = self._tensors[name]
        return TensorMeta(tuple(t.shape), t.dtype)

    def files(self) -> list[Path]:
        return list(self._files)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self._tensors[name]
        if rows is None or t.dim() == 0:
            return t.clone()
        return t[rows[0] : rows[1]].clone()

"""Every pickle relex-merge opens, restricted to what its format holds: a crafted checkpoint
must not run code unless the user says they trust it (``--allow-unsafe-pickle``).

    torch .bin/.pt, verl FSDP shards   torch.load(weights_only=True), DTensor types allowed
    DCP .metadata                      RestrictedUnpickler: DCP's metadata classes, torch.Size,
                                       dtypes, paths (DCP itself would pickle.load it)
    DCP tensor items                   DCP loads them weights-only; a refusal is named here
    DeepSpeed ZeRO files               checked first, weights-only with stand-ins for DeepSpeed's
                                       few classes; then DeepSpeed's own loads run weights-only
                                       (``forced_weights_only``)
    fit caches                         safetensors: no pickle

A refusal is a RelexError (exit 2) in one line naming the file and what was refused.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import pickle
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from relex_merge.common.errors import RelexError

__all__ = [
    "HINT",
    "RestrictedUnpickler",
    "check_zero_files",
    "dcp_storage_reader",
    "dtensor_safe_globals",
    "forced_weights_only",
    "load_dcp_metadata",
    "refused",
    "restricted_torch_load",
    "weights_only_refusal",
    "zero_classes",
    "zero_stand_ins",
]

HINT = "pass --allow-unsafe-pickle only if you trust where it came from"


def refused(source: object, what: str) -> RelexError:
    """The one line every refusal prints."""
    return RelexError(
        f"{source}: refusing to unpickle {what}, which this format never holds (it could run code); {HINT}"
    )


def weights_only_refusal(exc: BaseException) -> str | None:
    """What torch's weights-only unpickler refused (its long message reduced to the global it
    named), or None when ``exc`` is not such a refusal."""
    text = str(exc)
    if not isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return found.group(1)
    for line in text.splitlines():  # other refusals: an unsupported opcode, a bad rebuild call
        if line.strip().startswith("WeightsUnpickler error:"):
            return "something other than tensors (" + line.strip()[len("WeightsUnpickler error:") :].strip() + ")"
    return "something other than tensors"


def dtensor_safe_globals() -> list:
    """The types a torch.save of DTensors holds (verl FSDP1/FSDP2 shards); torch >= 2.5 also
    registers them on ``import torch.distributed.tensor``, older versions may not."""
    found: list = []
    with contextlib.suppress(ImportError):
        import torch.distributed.tensor as dt
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import _dtensor_spec, placement_types

        found += [dt.DTensor, DeviceMesh, _dtensor_spec.DTensorSpec, _dtensor_spec.TensorMeta]
        found += [getattr(_dtensor_spec, n) for n in ("ShardOrderEntry",) if hasattr(_dtensor_spec, n)]
        names = ("Shard", "Replicate", "Partial", "_StridedShard")
        found += [getattr(placement_types, n) for n in names if hasattr(placement_types, n)]
    with contextlib.suppress(ImportError, AttributeError):
        from torch.distributed import _mesh_layout

        found += [_mesh_layout._MeshLayout]
    return found


def restricted_torch_load(file: Path, extra_globals: Sequence = ()) -> Any:
    """torch.load (mmap, CPU) restricted to tensors, containers, DTensors and ``extra_globals``
    (classes, or (stand-in, "module.Name") pairs). Raises the one-line refusal; other errors
    propagate for the caller to word."""
    try:
        with torch.serialization.safe_globals([*dtensor_safe_globals(), *extra_globals]):
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        what = weights_only_refusal(exc)
        if what is None:
            raise
        raise refused(file, what) from None


# ---- DCP .metadata: a plain pickle, unpickled with an allow-list ------------------------------


def _dcp_allowed() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {}
    classes = [
        metadata.Metadata,
        metadata.MetadataIndex,
        metadata.TensorStorageMetadata,
        metadata.BytesStorageMetadata,
        metadata.ChunkStorageMetadata,
        metadata.TensorProperties,
        filesystem._StorageInfo,
    ]
    for name in ("StorageMeta", "_MEM_FORMAT_ENCODING"):
        if hasattr(metadata, name):
            classes.append(getattr(metadata, name))
    for cls in classes:
        allowed[(cls.__module__, cls.__qualname__)] = cls
    with contextlib.suppress(ImportError, AttributeError):  # where older torch kept TensorProperties
        from torch.distributed._shard.sharded_tensor import metadata as old

        allowed[("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties")] = old.TensorProperties
        allowed[("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING")] = old.MEM_FORMAT_ENCODING
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a layout by its name
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # StorageMeta.checkpoint_id may be a path: built as a pure path (no file system access)
    for module in ("pathlib", "pathlib._local"):
        for name, pure in (("PosixPath", pathlib.PurePosixPath), ("WindowsPath", pathlib.PureWindowsPath)):
            allowed[(module, name)] = pure
            allowed[(module, "Pure" + name)] = pure
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle.Unpickler that builds only allow-listed globals (and torch's dtypes, layouts and
    memory formats). Every way a pickle reaches a callable (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT)
    goes through ``find_class``; REDUCE, NEWOBJ and BUILD can only call what it returned.
    Persistent ids are refused (pickle's default)."""

    def __init__(self, file, allowed: dict[tuple[str, str], Any], source: object):
        super().__init__(file)
        self._allowed, self._source = allowed, source

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        if module == "torch":  # dtypes, layouts and memory formats are pickled as torch.<name>
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise refused(self._source, f"{module}.{name}")


def load_dcp_metadata(path: Path, allow_unsafe_pickle: bool = False):
    """DCP's Metadata from a ``.metadata`` file, unpickled with the allow-list (or, trusted, by
    pickle.load as DCP does). Unreadable files raise what pickle raises."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(path, "rb") as f:
        metadata = pickle.load(f) if allow_unsafe_pickle else RestrictedUnpickler(f, _dcp_allowed(), path).load()
    if not isinstance(metadata, Metadata):
        raise RelexError(f"{path}: not DCP metadata (it holds a {type(metadata).__name__})")
    return metadata


def dcp_storage_reader(folder: Path, allow_unsafe_pickle: bool = False):
    """DCP's FileSystemReader over ``folder`` whose metadata reads are restricted (``dcp.load``
    reads the metadata again, so the reader it is given must be this one)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            path = Path(self.path) / ".metadata"
            metadata = load_dcp_metadata(path, allow_unsafe_pickle)
            if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(str(folder))


# ---- DeepSpeed ZeRO ---------------------------------------------------------------------------

ZERO_CLASSES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)  # the classes DeepSpeed pickles into its checkpoint files besides tensors and containers


class _StandIn:
    """Takes the place of a DeepSpeed class while a file is checked: keeps what it is given."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.__dict__["state"] = state


def zero_stand_ins() -> list[tuple[type, str]]:
    """(stand-in, "module.Name") for each DeepSpeed class, for ``restricted_torch_load`` without
    DeepSpeed installed."""
    return [
        (type(name.rsplit(".", 1)[1], (_StandIn,), {"__module__": "relex_merge.io.pickles"}), name)
        for name in ZERO_CLASSES
    ]


def zero_classes() -> list:
    """DeepSpeed's own classes of ``ZERO_CLASSES`` that this installation has."""
    found = []
    for qualified in ZERO_CLASSES:
        module, name = qualified.rsplit(".", 1)
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(__import__(module, fromlist=[name]), name))
    return found


def check_zero_files(folder: Path) -> None:
    """Load every pickle DeepSpeed's consolidation may load for a ZeRO folder (its tag's, or its
    tags' model and optimizer states), weights-only with stand-ins for DeepSpeed's classes (no
    DeepSpeed needed; mmap: no tensor data read). A crafted file is refused here, named, before
    DeepSpeed sees it; DeepSpeed's own loads then run under ``forced_weights_only``."""
    patterns = ("*_model_states.pt", "*_optim_states.pt")
    files = sorted(p for pattern in patterns for where in (pattern, f"*/{pattern}") for p in folder.glob(where))
    for file in files:
        try:
            restricted_torch_load(file, zero_stand_ins())
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError):
            continue  # unreadable, not refused: DeepSpeed's own (weights-only) load says what is wrong


@contextlib.contextmanager
def forced_weights_only(extra_globals: Sequence = ()) -> Iterator[None]:
    """Every torch.load in the body is weights-only whatever its caller passes (torch reads
    TORCH_FORCE_WEIGHTS_ONLY_LOAD at each call), with DTensors and ``extra_globals`` allowed.
    Process-wide while it lasts."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        with torch.serialization.safe_globals([*dtensor_safe_globals(), *extra_globals]):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

"""Every pickle relex-merge opens, restricted to what its format holds: a crafted checkpoint
must not run code unless the user says they trust it (``--allow-unsafe-pickle``).

    torch .bin/.pt, verl FSDP shards,  io.base.load_torch_file: torch.load(weights_only=True),
    DeepSpeed ZeRO files               DTensor types and a format's own stand-ins allowed
                                       (DeepSpeed's four classes: io/formats/zero.py)
    DCP .metadata                      RestrictedUnpickler: DCP's metadata classes, torch.Size,
                                       dtypes, paths (DCP itself would pickle.load it)
    DCP tensor items                   DCP loads them weights-only; a refusal is named here
    fit caches                         safetensors: no pickle

A refusal is a RelexError (exit 2) in one line naming the file and what was refused.
"""

from __future__ import annotations

import collections
import contextlib
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from relex_merge.common.errors import RelexError

__all__ = [
    "HINT",
    "RestrictedUnpickler",
    "dcp_storage_reader",
    "dtensor_safe_globals",
    "load_dcp_metadata",
    "refused",
    "weights_only_refusal",
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

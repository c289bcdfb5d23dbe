"""torch.distributed.checkpoint (DCP) folders: ``.metadata`` plus ``*.distcp`` files.

Each tensor is loaded on its own (no process group needed). DCP's reader loads a stored tensor
(or each rank's stored piece) whole, even to fill a narrower destination, so the reader
declares ``whole_tensor_reads``: the engine reads a DCP tensor in one span, once per pass. A
save of ``{"model": ..., "optimizer": ...}`` is flattened by DCP to ``model.<name>``; in that
case only the model's tensors are exposed, without the prefix.

``.metadata`` is a plain pickle (DCP's own reader would ``pickle.load`` it): it is unpickled with
an allow-list of DCP's metadata classes (relex_merge.io.pickles) unless the user trusts the
folder (``--allow-unsafe-pickle``); DCP loads the tensor items weights-only.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from relex_merge.common.errors import RelexError
from relex_merge.io.base import UNREADABLE_PICKLE, CheckpointFormat, CheckpointReader, TensorMeta, first_line
from relex_merge.io.pickles import dcp_storage_reader, load_dcp_metadata, refused, weights_only_refusal

__all__ = ["FORMAT", "DcpReader"]

log = logging.getLogger(__name__)


def detect(folder: Path) -> bool:
    """A folder with ``.metadata`` and ``*.distcp`` files."""
    return (folder / ".metadata").is_file() and any(folder.glob("*.distcp"))


class DcpReader(CheckpointReader):
    """A DCP folder; each read loads one whole tensor through DCP (no process group). Reads are
    not thread-safe."""

    whole_tensor_reads = True  # FileSystemReader.read_data torch.loads each stored item whole

    def __init__(self, path: Path, allow_unsafe_pickle: bool = False):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        self._allow_unsafe = allow_unsafe_pickle
        try:
            metadata = load_dcp_metadata(path / ".metadata", allow_unsafe_pickle)  # a pickle
        except UNREADABLE_PICKLE as exc:
            raise RelexError(f"{path}/.metadata: cannot read DCP metadata ({exc})") from None
        stored = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        nested = any(not k.startswith("model.") for k in stored) and any(k.startswith("model.") for k in stored)
        top = {k.split(".", 1)[0] for k in stored}
        self._prefix = "model." if nested and top - {"model"} <= {"optim", "optimizer", "extra", "lr_scheduler"} else ""
        if self._prefix:
            log.debug("%s: a nested save; exposing the %r tensors without the prefix", path, self._prefix)
        self._stored: dict[str, str] = {}
        self._meta: dict[str, TensorMeta] = {}
        for key, info in stored.items():
            if not key.startswith(self._prefix):
                continue
            name = key[len(self._prefix) :]
            self._stored[name] = key
            self._meta[name] = TensorMeta(tuple(info.size), info.properties.dtype)

    def names(self) -> list[str]:
        return list(self._meta)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def files(self) -> list[Path]:
        return sorted(self.path.glob("*.distcp")) + [self.path / ".metadata"]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        meta = self._meta[name]
        tensor = torch.empty(meta.shape, dtype=meta.dtype)
        try:
            with warnings.catch_warnings():  # "assuming single process": that is the intent
                warnings.simplefilter("ignore", UserWarning)
                reader = dcp_storage_reader(self.path, self._allow_unsafe)
                dcp.load({self._stored[name]: tensor}, storage_reader=reader, no_dist=True)
        except (CheckpointException, OSError) as exc:  # CheckpointException: a BaseException, DCP's read errors
            cause = _cause(exc)
            if isinstance(cause, RelexError):  # the metadata, refused
                raise cause from None
            what = weights_only_refusal(cause)
            if what is not None:  # DCP loads tensor items weights-only
                raise refused(f"{self.path}: tensor {name}", what) from None
            raise RelexError(f"{self.path}: cannot read tensor {name} ({first_line(cause)})") from None
        if rows is None or tensor.dim() == 0:
            return tensor
        return tensor[rows[0] : rows[1]].clone()


def _cause(exc: BaseException) -> BaseException:
    """An OSError itself; for a CheckpointException, the first rank's own error (each is
    stored as (error, stack))."""
    if isinstance(exc, OSError):
        return exc
    for failure in exc.failures.values():
        return failure[0] if isinstance(failure, tuple) else failure
    return exc


def _open(path: Path, allow_unsafe_pickle: bool = False) -> DcpReader:
    return DcpReader(path, allow_unsafe_pickle)


FORMAT = CheckpointFormat(
    name="dcp",
    label="torch.distributed.checkpoint",
    description="torch.distributed.checkpoint: .metadata and *.distcp files",
    priority=40,
    detect=detect,
    open=_open,
    weight_patterns=("*.distcp",),
)

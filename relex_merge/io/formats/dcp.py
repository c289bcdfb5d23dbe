"""torch.distributed.checkpoint (DCP) folders: ``.metadata`` plus ``*.distcp`` files.

Each tensor is loaded on its own (no process group needed). DCP's reader loads a stored tensor
(or each rank's stored piece) whole, even to fill a narrower destination, so the reader
declares ``whole_tensor_reads``: the engine reads a DCP tensor in one span, once per pass.

Trainers save more than the model into one DCP folder, and DCP flattens what they save into
dotted keys. Only the model's tensors are exposed:

- keys under a root that is never the model's are dropped: ``optimizer``/``optim``,
  ``lr_scheduler(s)``/``scheduler``, ``dataloader``, ``train_state``, ``extra`` (torchtitan
  saves the model's tensors at the top level beside ``optimizer.state.*`` and ``train_state``);
- a save of ``{"model": state_dict}`` (accelerate's ``pytorch_model_fsdp_0``, a plain
  ``dcp.save({"model": ...})``) has every remaining key under ``model.``: the prefix is taken
  off. How many ``model.`` levels are a wrapper cannot be told from the keys alone when the
  model's own names start with ``model.`` too, so each reading is kept and ``align_names``
  picks the one whose names are the model's (the base's, or config.json's); without it, one
  level is taken off.

``.metadata`` is a plain pickle (DCP's own reader would ``pickle.load`` it): it is unpickled with
an allow-list of DCP's metadata classes (relex_merge.io.pickles) unless the user trusts the
folder (``--allow-unsafe-pickle``); DCP loads the tensor items weights-only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection
from pathlib import Path

import torch

from relex_merge.common.errors import RelexError
from relex_merge.io.base import UNREADABLE_PICKLE, CheckpointFormat, CheckpointReader, TensorMeta, first_line
from relex_merge.io.pickles import dcp_storage_reader, load_dcp_metadata, refused, weights_only_refusal

__all__ = ["FORMAT", "DcpReader", "NON_MODEL_ROOTS"]

log = logging.getLogger(__name__)

NON_MODEL_ROOTS = frozenset(
    {
        "optimizer",
        "optim",
        "optimizers",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "dataloader",
        "train_state",
        "extra",
    }
)
"""Top-level keys of a trainer's DCP save that hold no model tensors (torchtitan's
CheckpointManager, torch.distributed.checkpoint recipes, accelerate)."""


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
        dropped = sorted({k.split(".", 1)[0] for k in stored if k.split(".", 1)[0] in NON_MODEL_ROOTS})
        if dropped:
            log.debug("%s: leaving out the tensors under %s (not the model's)", path, ", ".join(dropped))
        self._keys = {k: TensorMeta(tuple(v.size), v.properties.dtype) for k, v in stored.items()}
        self._keys = {k: m for k, m in self._keys.items() if k.split(".", 1)[0] not in NON_MODEL_ROOTS}
        # every number of leading "model." levels that all keys share is a possible reading
        self.prefixes = [""]
        while self._keys and all(k.startswith(self.prefixes[-1] + "model.") for k in self._keys):
            self.prefixes.append(self.prefixes[-1] + "model.")
        self._use(self.prefixes[min(1, len(self.prefixes) - 1)])

    def _use(self, prefix: str) -> None:
        if prefix:
            log.debug("%s: a save of {'model': ...}: reading its keys without %r", self.path, prefix)
        self.prefix = prefix
        self._stored = {k[len(prefix) :]: k for k in self._keys}
        self._meta = {k[len(prefix) :]: m for k, m in self._keys.items()}

    def align_names(self, expected: Collection[str]) -> None:
        """Of the readings with 0, 1, ... ``model.`` levels taken off, the one whose names are
        ``expected`` (or share the most with them; the current one on a tie)."""
        expected = set(expected)

        def score(prefix: str) -> tuple[bool, int, bool]:
            names = {k[len(prefix) :] for k in self._keys}
            return names == expected, len(names & expected), prefix == self.prefix

        self._use(max(self.prefixes, key=score))

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

"""Checkpoint readers behind one small interface: tensor names, shape/dtype, and reads of a
whole tensor or a range of its rows (dim 0). Readers open files lazily (mmap) and never
materialise a whole model."""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from relex_merge.errors import RelexError
from relex_merge.io.dtypes import SAFETENSORS_DTYPES


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def rows(self) -> int:
        """Length of the axis reads are chunked along (1 for a scalar)."""
        return self.shape[0] if self.shape else 1


class CheckpointReader(Protocol):
    path: Path

    def names(self) -> list[str]: ...

    def meta(self, name: str) -> TensorMeta: ...

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor: ...

    def files(self) -> list[Path]: ...


def indexed_files(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` (HF sharded checkpoint) points to, all present."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RelexError(f"{index}: not a valid index ({exc})") from None
    files = sorted({index.parent / f for f in weight_map.values()})
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise RelexError(f"{index}: lists {missing[0].name}, which does not exist")
    return files


_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the JSON header


def read_safetensors_header(file: Path) -> tuple[int, dict[str, tuple[TensorMeta, int]]]:
    """(data start, {name: (meta, byte offset in file)}), checked against the file size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RelexError(f"{file}: not a safetensors file (shorter than 8 bytes); re-copy or re-save it")
        (length,) = struct.unpack("<Q", head)
        if length > _HEADER_LIMIT or 8 + length > size:
            raise RelexError(f"{file}: truncated safetensors header ({size} bytes, header says {length}); re-copy or re-save it")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise RelexError(f"{file}: corrupt safetensors header ({exc})") from None
    start = 8 + length
    tensors: dict[str, tuple[TensorMeta, int]] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            lo, hi = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise RelexError(f"{file}: tensor {name} has an unreadable or unsupported header entry {info}") from None
        meta = TensorMeta(shape, dtype)
        if hi - lo != meta.nbytes:
            raise RelexError(f"{file}: tensor {name} spans {hi - lo} bytes but its shape needs {meta.nbytes}")
        tensors[name] = (meta, start + lo)
        end = max(end, hi)
    if start + end > size:
        raise RelexError(
            f"{file}: data is shorter than the header says ({size - start} of {end} bytes); "
            "the file is truncated: re-copy or re-save it"
        )
    return start, tensors


class SafetensorsReader:
    """A single .safetensors file, a sharded model (index json) or a folder of shards.

    ``read`` copies a span into a fresh tensor (positioned reads); ``view`` maps it instead,
    so the engine's math reads the page cache directly. A mapping lives as long as the view,
    which keeps resident memory to the spans being worked on.
    """

    def __init__(self, path: Path):
        self.path = path
        self._files = self._shard_files(path)
        self._where: dict[str, tuple[Path, int]] = {}
        self._meta: dict[str, TensorMeta] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        for file in self._files:
            _, tensors = read_safetensors_header(file)
            for name, (meta, offset) in tensors.items():
                if name in self._where:
                    raise RelexError(f"{file}: tensor {name} is also in {self._where[name][0]}")
                self._where[name] = (file, offset)
                self._meta[name] = meta
        self._check_index()

    @staticmethod
    def _shard_files(path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        index = path / "model.safetensors.index.json"
        if index.is_file():
            return indexed_files(index)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise RelexError(f"{path}: no .safetensors files")
        return files

    def _check_index(self) -> None:
        index = self.path / "model.safetensors.index.json"
        if not self.path.is_dir() or not index.is_file():
            return
        weight_map = json.loads(index.read_text())["weight_map"]
        for name, file in weight_map.items():
            if name not in self._where or self._where[name][0] != self.path / file:
                raise RelexError(f"{index}: tensor {name} is not in {file}")

    def names(self) -> list[str]:
        return list(self._where)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def files(self) -> list[Path]:
        return list(self._files)

    def _fd(self, file: Path) -> int:
        with self._lock:  # the engine's workers share the reader
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            return fd

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        file, offset, skip, length, shape = self._locate(name, rows)
        target = torch.empty(length, dtype=torch.uint8)
        view = memoryview(target.numpy())
        done, fd = 0, self._fd(file)
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + skip + done)
            if n <= 0:
                raise RelexError(f"{file}: ended early while reading tensor {name}; the file is truncated")
            done += n
        return target.view(self._meta[name].dtype).reshape(shape)

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The span as a tensor over a private mapping of the file (no copy; nothing writes to it)."""
        file, offset, skip, length, shape = self._locate(name, rows)
        dtype = self._meta[name].dtype
        start = offset + skip
        if length == 0 or start % dtype.itemsize:  # nothing to map, or a misaligned tensor
            return self.read(name, rows)
        fd = self._fd(file)
        if os.fstat(fd).st_size < start + length:  # mapping past the end would be SIGBUS, not an error
            raise RelexError(f"{file}: ended early while reading tensor {name}; the file is truncated")
        page = start - start % mmap.ALLOCATIONGRANULARITY
        # ACCESS_COPY: a writable (copy-on-write) buffer, so torch has nothing to warn about
        mapping = mmap.mmap(fd, start + length - page, access=mmap.ACCESS_COPY, offset=page)
        data = torch.frombuffer(mapping, dtype=torch.uint8, offset=start - page, count=length)
        return data.view(dtype).reshape(shape)  # the tensor keeps the mapping alive

    @staticmethod
    def _span(meta: TensorMeta, rows: tuple[int, int] | None) -> tuple[int, int]:
        """(byte offset within the tensor, byte length) of a row range."""
        if rows is None or not meta.shape:
            return 0, meta.nbytes
        row_bytes = meta.nbytes // max(meta.shape[0], 1)
        return rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes

    def _locate(self, name: str, rows: tuple[int, int] | None):
        """(file, tensor offset, byte offset of the rows in the tensor, byte length, shape)."""
        meta = self._meta[name]
        file, offset = self._where[name]
        skip, length = self._span(meta, rows)
        shape = meta.shape if rows is None or not meta.shape else (rows[1] - rows[0],) + meta.shape[1:]
        return file, offset, skip, length, shape

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        self.close()


def read_span(reader: CheckpointReader, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A span of rows for reading only: a mapped view where the reader has one, else a read."""
    view = getattr(reader, "view", None)
    return view(name, rows) if view is not None else reader.read(name, rows)


def load_torch_file(file: Path, allow_unsafe_pickle: bool = False):
    """torch.load with mmap, weights-only unless the user trusts the file; one-line errors."""
    import pickle

    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=not allow_unsafe_pickle)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise RelexError(
                f"{file}: this pickle holds more than tensors and could run code when loaded; "
                "pass --allow-unsafe-pickle only if you trust where it came from"
            ) from None
        raise RelexError(f"{file}: cannot read: not a torch checkpoint ({_first_line(exc)})") from None
    except Exception as exc:
        raise RelexError(f"{file}: cannot read: truncated or not a torch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class StateDictReader:
    """Tensors already in (memory-mapped) memory, e.g. a loaded pickle."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], files: list[Path]):
        self.path = path
        self._tensors = tensors
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


def torch_bin_reader(path: Path, allow_unsafe_pickle: bool = False) -> StateDictReader:
    """``pytorch_model*.bin`` (single or with an index), loaded weights-only with mmap."""
    index = path / "pytorch_model.bin.index.json"
    if path.is_file():
        files = [path]
    elif index.is_file():
        files = indexed_files(index)
    else:
        files = sorted(path.glob("pytorch_model*.bin")) or sorted(path.glob("model*.bin"))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        state = load_torch_file(file, allow_unsafe_pickle)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise RelexError(f"{file}: expected a state dict, found {type(state).__name__}")
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                tensors[name] = tensor
    return StateDictReader(path, tensors, files)


def open_checkpoint(path: str | Path, allow_unsafe_pickle: bool = False) -> CheckpointReader:
    """Pick the reader for a checkpoint folder or weight file by what it contains."""
    from relex_merge.io.dcp import DcpReader, is_dcp_checkpoint
    from relex_merge.io.fsdp import FsdpShardReader, is_fsdp_checkpoint
    from relex_merge.io.zero import is_zero_checkpoint, zero_reader

    path = Path(path)
    if not path.exists():
        raise RelexError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsReader(path)
        if path.suffix in (".bin", ".pt", ".pth"):
            return torch_bin_reader(path, allow_unsafe_pickle)
        raise RelexError(f"{path}: unknown weight file type (expected .safetensors, .bin or .pt)")
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return SafetensorsReader(path)
    if any(path.glob("pytorch_model*.bin")) or any(path.glob("model*.bin")):
        return torch_bin_reader(path, allow_unsafe_pickle)
    if is_fsdp_checkpoint(path):
        return FsdpShardReader(path, allow_unsafe_pickle)
    if is_dcp_checkpoint(path):
        return DcpReader(path)
    if is_zero_checkpoint(path):
        return zero_reader(path)
    raise RelexError(
        f"{path}: no model weights found (safetensors, pytorch_model*.bin, verl FSDP shards, "
        "torch.distributed.checkpoint or DeepSpeed ZeRO)"
    )


HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_hf_model(folder: Path) -> bool:
    """A folder transformers' from_pretrained loads: config.json and its weight file or index."""
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in HF_WEIGHT_FILES)


def read_model_config(path: str | Path) -> dict | None:
    """config.json of a checkpoint (looked up beside the weights and, for verl, in huggingface/)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "config.json", folder / "huggingface" / "config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except ValueError as exc:
                raise RelexError(f"{candidate}: invalid JSON ({exc})") from None
    return None

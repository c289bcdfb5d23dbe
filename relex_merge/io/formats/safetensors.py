"""HF safetensors: a single ``.safetensors`` file, a sharded model (``model.safetensors.index.json``)
or a folder of shards. Headers are parsed and checked against the file sizes up front; tensor
data is read with positioned reads or mapped (``view``), never loaded whole."""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from pathlib import Path

import torch

from relex_merge.common.errors import RelexError
from relex_merge.io.base import CheckpointFormat, CheckpointReader, TensorMeta, indexed_files
from relex_merge.io.dtypes import SAFETENSORS_DTYPES
from relex_merge.io.hf import SAFETENSORS_INDEX

__all__ = ["FORMAT", "SafetensorsReader", "read_safetensors_header"]

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
            raise RelexError(
                f"{file}: truncated safetensors header ({size} bytes, header says {length}); re-copy or re-save it"
            )
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


class SafetensorsReader(CheckpointReader):
    """A single .safetensors file, a sharded model (index json) or a folder of shards.

    ``read`` copies a span into a fresh tensor (positioned reads); ``view`` maps it instead,
    so the engine's math reads the page cache directly. A mapping lives as long as the view,
    which keeps resident memory to the spans being worked on. Both are thread-safe.
    """

    supports_views = True
    thread_safe_reads = True

    def __init__(self, path: Path):
        self.path = path
        self._fds: dict[Path, int] = {}  # first: __del__ closes them even when opening fails
        self._lock = threading.Lock()
        self._files = self._shard_files(path)
        self._where: dict[str, tuple[Path, int]] = {}
        self._meta: dict[str, TensorMeta] = {}
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
        index = path / SAFETENSORS_INDEX
        if index.is_file():
            return indexed_files(index)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise RelexError(f"{path}: no .safetensors files")
        return files

    def _check_index(self) -> None:
        index = self.path / SAFETENSORS_INDEX
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
            try:
                n = os.preadv(fd, [view[done:]], offset + skip + done)
            except OSError as exc:  # EIO from a failing disk or network file system: name the file
                raise RelexError(f"{file}: cannot read tensor {name} ({exc.strerror or exc})") from None
            if n <= 0:
                raise RelexError(f"{file}: ended early while reading tensor {name}; the file is truncated")
            done += n
        return target.view(self._meta[name].dtype).reshape(shape)

    def prefetch(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Start the kernel's readahead of the span (posix_fadvise WILLNEED; asynchronous)."""
        if not hasattr(os, "posix_fadvise"):
            return
        file, offset, skip, length, _ = self._locate(name, rows)
        if length:
            os.posix_fadvise(self._fd(file), offset + skip, length, os.POSIX_FADV_WILLNEED)

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

    def close(self, _close=os.close) -> None:
        # os.close bound at definition: a reader collected at interpreter exit, after the os
        # module's globals are gone, must still close its files quietly
        for fd in self._fds.values():
            _close(fd)
        self._fds.clear()

    def __del__(self):
        self.close()


def detect(path: Path) -> bool:
    """A ``.safetensors`` file, or a folder with ``*.safetensors`` files or their index."""
    if path.is_file():
        return path.suffix == ".safetensors"
    return any(path.glob("*.safetensors")) or (path / SAFETENSORS_INDEX).is_file()


def _open(path: Path, allow_unsafe_pickle: bool = False) -> SafetensorsReader:
    return SafetensorsReader(path)  # nothing here is pickled


FORMAT = CheckpointFormat(
    name="safetensors",
    label="safetensors",
    description="HF safetensors: a file, a sharded model, a folder of shards",
    priority=10,
    detect=detect,
    open=_open,
    weight_patterns=("*.safetensors",),
    file_types=(".safetensors",),
)

"""The safetensors output format (what Hugging Face models use), written by streaming.

Every tensor's name, shape and dtype is known before the merge starts, so each shard's header
and every tensor's place in it are fixed up front, and
tensor data is written span by span, from any thread and in any order, straight to its place.
No output tensor is ever held whole."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import torch

from relex_merge.io.base import TensorMeta
from relex_merge.io.dtypes import SAFETENSORS_NAMES
from relex_merge.io.hf import SAFETENSORS_INDEX
from relex_merge.io.writers import OutputFormat, OutputTensor

__all__ = ["WRITER", "ShardedModelWriter", "plan_shards", "shard_file_names"]


def plan_shards(tensors: list[OutputTensor], shard_size: int) -> list[list[OutputTensor]]:
    """Greedy split in the given order; a tensor larger than shard_size gets its own shard."""
    shards: list[list[OutputTensor]] = [[]]
    used = 0
    for tensor in tensors:
        if shards[-1] and used + tensor.meta.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.meta.nbytes
    return shards


def shard_file_names(n_shards: int) -> list[str]:
    """HF's shard names: ``model.safetensors``, or ``model-00001-of-0000N.safetensors``..."""
    if n_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


def _header(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": SAFETENSORS_NAMES[t.meta.dtype],
            "shape": list(t.meta.shape),
            "data_offsets": [offset, offset + t.meta.nbytes],
        }
        offset += t.meta.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _pwrite_all(fd: int, data: memoryview, position: int) -> None:
    while data:
        n = os.pwrite(fd, data, position)
        data, position = data[n:], position + n


class ShardedModelWriter:
    """An OutputSink (relex_merge.io.writers). Receives tensor data as spans (``write_at``,
    thread-safe, any order) or front to back (``write``, one tensor after the other); ``close``
    checks that every byte arrived.

    The layout is fixed at construction (no file is touched); ``prepare`` creates the shard
    files and writes their headers. In a distributed merge rank 0 prepares, every rank
    ``attach``es the same files after a barrier and writes its share of the tensors; each rank
    checks its share with ``close_share`` and rank 0 checks the whole with ``finalize``."""

    def __init__(
        self,
        out_dir: Path,
        tensors: list[OutputTensor],
        shard_size: int,
        metadata: dict[str, str] | None = None,
        file_name: str | None = None,  # for a single-file output other than model.safetensors
    ):
        self.out_dir = out_dir
        self.shards = plan_shards(tensors, shard_size)
        self.file_names = shard_file_names(len(self.shards))
        if file_name is not None:
            if len(self.shards) != 1:
                raise ValueError("file_name needs a single shard")
            self.file_names = [file_name]
        self.metadata = metadata or {"format": "pt"}
        self._headers = [_header(shard, self.metadata) for shard in self.shards]
        self._place: dict[str, tuple[int, int, TensorMeta]] = {}  # name: (shard, file offset, meta)
        for s, shard in enumerate(self.shards):
            offset = len(self._headers[s])
            for t in shard:
                self._place[t.name] = (s, offset, t.meta)
                offset += t.meta.nbytes
        self._written = dict.fromkeys(self._place, 0)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._ready = False  # prepared or attached: the files exist with their headers

    @property
    def paths(self) -> list[Path]:
        """The shard files, in order (they exist once ``prepare`` has run)."""
        return [self.out_dir / name for name in self.file_names]

    def prepare(self) -> None:
        """Create every shard file with its header (a shard of empty tensors too)."""
        for path, header in zip(self.paths, self._headers):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                _pwrite_all(fd, memoryview(header), 0)
            finally:
                os.close(fd)
        self._ready = True

    def attach(self) -> None:
        """Write into shard files another process prepared."""
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise RuntimeError(f"writer: {missing[0]} was not prepared")
        self._ready = True

    def write_at(self, name: str, start: int, chunk: torch.Tensor) -> None:
        """Write ``chunk`` (any shape, the tensor's dtype) from element ``start`` of ``name``."""
        shard, offset, meta = self._place[name]
        if chunk.dtype != meta.dtype:
            raise RuntimeError(f"writer expected {name} as {meta.dtype}, got {chunk.dtype}")
        data = chunk.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        skip = start * meta.dtype.itemsize
        if skip + data.nbytes > meta.nbytes:
            raise RuntimeError(f"writer got bytes past the end of {name}")
        _pwrite_all(self._fd(shard), memoryview(data), offset + skip)
        with self._lock:
            self._written[name] += data.nbytes

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """The next span of ``name`` (single-threaded callers that go front to back)."""
        meta = self._place[name][2]
        self.write_at(name, self._written[name] // max(meta.dtype.itemsize, 1), chunk)

    def _fd(self, shard: int) -> int:
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                if not self._ready:
                    raise RuntimeError("writer: call prepare() (or attach()) before writing")
                fd = self._fds[shard] = os.open(self.out_dir / self.file_names[shard], os.O_WRONLY)
            return fd

    def _close_files(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def close(self) -> None:
        """Check every tensor is complete, finish the shards and write the index (when sharded)."""
        self.finalize([self.close_share(self._place)])

    def close_share(self, names) -> dict[str, int]:
        """Check that these tensors (this process's share) are complete and close the files;
        returns the bytes written per tensor, for ``finalize``."""
        names = list(names)
        for name in names:
            if self._written[name] != self._place[name][2].nbytes:
                raise RuntimeError(f"writer closed before tensor {name} was complete")
        self._close_files()
        return {name: self._written[name] for name in names}

    def finalize(self, shares: list[dict[str, int]]) -> None:
        """Check that the shares of every process together complete every tensor, and write the
        index (when sharded)."""
        if not self._ready:
            raise RuntimeError("writer: nothing was prepared")
        done: dict[str, int] = {}
        for share in shares:
            for name, written in share.items():
                done[name] = done.get(name, 0) + written
        for name, (_, _, meta) in self._place.items():
            if done.get(name, 0) != meta.nbytes:
                raise RuntimeError(f"writer: tensor {name} is incomplete ({done.get(name, 0)} of {meta.nbytes} bytes)")
        if len(self.shards) > 1:
            weight_map = {t.name: self.file_names[s] for s, shard in enumerate(self.shards) for t in shard}
            total = sum(t.meta.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close the shard files without the checks (the caller removes the partial output)."""
        self._close_files()


WRITER = OutputFormat(
    name="safetensors",
    description="Hugging Face safetensors shards (model.safetensors or model-0000i-of-0000N.safetensors + index)",
    create=ShardedModelWriter,
)

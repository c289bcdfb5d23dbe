"""Streaming safetensors writer: every tensor's name, shape and dtype is known before the
merge starts, so each shard's header is written first and tensor data is appended chunk by
chunk as it is computed. No output tensor is ever held whole."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from relex_merge.io.readers import SAFETENSORS_DTYPES, TensorMeta

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutputTensor:
    name: str
    meta: TensorMeta


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
    if n_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


def _header(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _DTYPE_NAMES[t.meta.dtype],
            "shape": list(t.meta.shape),
            "data_offsets": [offset, offset + t.meta.nbytes],
        }
        offset += t.meta.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class ShardedModelWriter:
    """Receives chunks in plan order: each tensor's rows front to back, tensors in order."""

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
        self._queue = [(s, t) for s, shard in enumerate(self.shards) for t in shard]
        self._position = 0  # index into _queue of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._file: BinaryIO | None = None
        self._open_shard = -1

    def write(self, name: str, chunk: torch.Tensor) -> None:
        shard, expected = self._queue[self._position]
        if name != expected.name or chunk.dtype != expected.meta.dtype:
            raise RuntimeError(
                f"writer expected {expected.name} ({expected.meta.dtype}), got {name} ({chunk.dtype})"
            )
        if shard != self._open_shard:
            self._start_shard(shard)
        data = chunk.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        assert self._file is not None
        self._file.write(memoryview(data))
        self._written += data.nbytes
        if self._written > expected.meta.nbytes:
            raise RuntimeError(f"writer got too many bytes for {name}")
        if self._written == expected.meta.nbytes:
            self._position += 1
            self._written = 0

    def _start_shard(self, shard: int) -> None:
        self._close_file()
        self._file = open(self.out_dir / self.file_names[shard], "wb")
        self._file.write(_header(self.shards[shard], self.metadata))
        self._open_shard = shard

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Finish the last shard and write the index (only when sharded)."""
        if self._position != len(self._queue):
            missing = self._queue[self._position][1].name
            raise RuntimeError(f"writer closed before tensor {missing} was complete")
        self._close_file()
        if len(self.shards) > 1:
            weight_map = {
                t.name: self.file_names[s] for s, shard in enumerate(self.shards) for t in shard
            }
            total = sum(t.meta.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        self._close_file()

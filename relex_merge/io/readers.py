"""Checkpoint readers behind one small interface: tensor names, shape/dtype, and reads of a
whole tensor or a range of its rows (dim 0). Readers open files lazily (mmap) and never
materialise a whole model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from relex_merge.errors import RelexError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


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


class SafetensorsReader:
    """A single .safetensors file, a sharded model (index json) or a folder of shards."""

    def __init__(self, path: Path):
        self.path = path
        self._files = self._shard_files(path)
        self._handles = {}
        self._where: dict[str, Path] = {}
        self._meta: dict[str, TensorMeta] = {}
        for file in self._files:
            try:
                handle = safe_open(str(file), framework="pt")
                keys = list(handle.keys())
                for name in keys:
                    sl = handle.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise RelexError(f"{file}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                    if name in self._where:
                        raise RelexError(f"{file}: tensor {name} is also in {self._where[name]}")
                    self._where[name] = file
                    self._meta[name] = TensorMeta(tuple(sl.get_shape()), dtype)
            except RelexError:
                raise
            except Exception as exc:  # safetensors raises its own error types
                raise RelexError(f"{file}: not a readable safetensors file ({exc})") from None
            self._handles[file] = handle
        self._check_index()

    @staticmethod
    def _shard_files(path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise RelexError(f"{index}: not a valid safetensors index ({exc})") from None
            files = sorted({path / f for f in weight_map.values()})
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise RelexError(f"{index}: lists {missing[0].name}, which does not exist")
            return files
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
            if self._where.get(name) != self.path / file:
                raise RelexError(f"{index}: tensor {name} is not in {file}")

    def names(self) -> list[str]:
        return list(self._where)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def files(self) -> list[Path]:
        return list(self._files)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        handle = self._handles[self._where[name]]
        try:
            if rows is None or not self._meta[name].shape:
                return handle.get_tensor(name)
            return handle.get_slice(name)[rows[0] : rows[1]]
        except Exception as exc:
            raise RelexError(f"{self._where[name]}: cannot read tensor {name} ({exc})") from None


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
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RelexError(f"{index}: not a valid index ({exc})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise RelexError(f"{index}: lists {missing[0].name}, which does not exist")
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

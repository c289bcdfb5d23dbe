"""PyTorch state dicts: ``pytorch_model*.bin`` (single, or sharded with an index) and single
``.bin``/``.pt``/``.pth`` files, loaded weights-only (unless the user trusts them) with mmap."""

from __future__ import annotations

from pathlib import Path

import torch

from relex_merge.common.errors import RelexError
from relex_merge.io.base import CheckpointFormat, StateDictReader, glob_any, indexed_files, load_torch_file
from relex_merge.io.hf import BIN_INDEX

__all__ = ["FORMAT", "torch_bin_reader"]

_PATTERNS = ("pytorch_model*.bin", "model*.bin")
_SUFFIXES = (".bin", ".pt", ".pth")


def torch_bin_reader(path: Path, allow_unsafe_pickle: bool = False) -> StateDictReader:
    """``pytorch_model*.bin`` (single or with an index), loaded weights-only with mmap."""
    index = path / BIN_INDEX
    if path.is_file():
        files = [path]
    elif index.is_file():
        files = indexed_files(index)
    else:
        files = sorted(path.glob(_PATTERNS[0])) or sorted(path.glob(_PATTERNS[1]))
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


def detect(path: Path) -> bool:
    """A ``.bin``/``.pt``/``.pth`` file, or a folder with ``pytorch_model*.bin`` or ``model*.bin``."""
    if path.is_file():
        return path.suffix in _SUFFIXES
    return glob_any(path, _PATTERNS)


FORMAT = CheckpointFormat(
    name="torch_bin",
    label="pytorch_model*.bin",
    description="PyTorch state dicts: pytorch_model*.bin (+ index), .bin/.pt",
    priority=20,
    detect=detect,
    open=torch_bin_reader,
    weight_patterns=_PATTERNS,
    file_types=(".bin", ".pt"),  # .pth is read too; the error message has never named it
)

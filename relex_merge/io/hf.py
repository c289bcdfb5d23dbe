"""Hugging Face model folders: their file names, which folders ``from_pretrained`` loads, and a
checkpoint's ``config.json`` (beside the weights or, for verl, in ``huggingface/``)."""

from __future__ import annotations

import json
from pathlib import Path

from relex_merge.common.errors import RelexError

__all__ = ["SAFETENSORS_INDEX", "BIN_INDEX", "HF_WEIGHT_FILES", "is_hf_model", "read_model_config"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
HF_WEIGHT_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", BIN_INDEX)


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

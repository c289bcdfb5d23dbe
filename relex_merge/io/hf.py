"""Hugging Face model folders: their file names, which folders ``from_pretrained`` loads, a
checkpoint's ``config.json`` (beside the weights, for verl in ``huggingface/``, for a DeepSpeed
tag in the folder above), and the tensors that config makes: the names and shapes a model
written from it must have."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from relex_merge.common.errors import RelexError
from relex_merge.io.base import CheckpointReader

__all__ = [
    "SAFETENSORS_INDEX",
    "BIN_INDEX",
    "HF_WEIGHT_FILES",
    "is_hf_model",
    "find_model_config",
    "read_model_config",
    "ModelTensors",
    "model_tensors",
    "check_model_tensors",
]

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
HF_WEIGHT_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", BIN_INDEX)


def is_hf_model(folder: Path) -> bool:
    """A folder transformers' from_pretrained loads: config.json and its weight file or index."""
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in HF_WEIGHT_FILES)


def find_model_config(path: str | Path, also: Iterable[Path] = ()) -> Path | None:
    """The config.json of a checkpoint: beside the weights, in huggingface/ (verl), or in one of
    ``also`` (a reader's ``config_folders``: a DeepSpeed tag's parent)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for candidate in (
        folder / "config.json",
        folder / "huggingface" / "config.json",
        *(f / "config.json" for f in also),
    ):
        if candidate.is_file():
            return candidate
    return None


def read_model_config(path: str | Path, also: Iterable[Path] = ()) -> dict | None:
    """config.json of a checkpoint (see ``find_model_config``), parsed."""
    candidate = find_model_config(path, also)
    if candidate is None:
        return None
    try:
        return json.loads(candidate.read_text())
    except ValueError as exc:
        raise RelexError(f"{candidate}: invalid JSON ({exc})") from None


@dataclass(frozen=True)
class ModelTensors:
    """The tensors of the model a config.json describes, as ``save_pretrained`` writes them."""

    config_file: Path
    architecture: str
    shapes: dict[str, tuple[int, ...]]  # every tensor of the state dict, in its order
    tied: frozenset[str]  # may be absent: tied to another tensor, stored once
    unsaved: frozenset[str]  # buffers the model does not save (e.g. rotary inv_freq): dropped if present

    def describe(self) -> str:
        return f"the {self.architecture} that {self.config_file} describes"


def model_tensors(config_file: Path) -> ModelTensors | None:
    """The names and shapes of the model ``config_file`` describes, from transformers' own
    class built on the meta device (no memory, no weights); None when transformers cannot
    build it (an architecture it does not know: remote code)."""
    import torch

    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise RelexError(f"{config_file}: invalid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        log.debug("%s: no model_type; the tensors' names are not checked against it", config_file)
        return None
    architectures = config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        hf_config = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = cls(hf_config) if cls is not None else AutoModelForCausalLM.from_config(hf_config)
    except Exception as exc:  # noqa: BLE001  (any failure means: this transformers cannot build it)
        log.debug("%s: transformers cannot build the model (%s); names not checked", config_file, exc)
        return None
    finally:
        transformers.logging.set_verbosity(verbosity)
    state = model.state_dict()
    tied_map = getattr(model, "all_tied_weights_keys", None)  # transformers 5: {tied: source} when tied
    if tied_map is not None:
        tied = set(tied_map)
    else:  # transformers 4: names that tie when the config ties them
        keys = getattr(model, "_tied_weights_keys", None) or []
        tied = set(keys) if getattr(hf_config, "tie_word_embeddings", False) else set()
    unsaved = {name for name, _ in model.named_buffers()} - set(state)
    return ModelTensors(
        config_file=config_file,
        architecture=type(model).__name__,
        shapes={name: tuple(t.shape) for name, t in state.items()},
        tied=frozenset(tied & set(state)),
        unsaved=frozenset(unsaved),
    )


def check_model_tensors(reader: CheckpointReader, names: list[str], model: ModelTensors) -> None:
    """Refuse (one line naming the checkpoint) ``names`` of ``reader`` that are not exactly the
    tensors of ``model``: a tensor it does not have (optimizer state, a wrapper's prefix), one
    of its tensors missing (a tied copy excepted), or a shape it does not give."""
    extra = [n for n in names if n not in model.shapes]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise RelexError(f"{reader.path}: tensor {extra[0]}{more} is not in {model.describe()}")
    present = set(names)
    missing = [n for n in model.shapes if n not in present and n not in model.tied]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise RelexError(f"{reader.path}: tensor {missing[0]}{more} of {model.describe()} is missing")
    for name in names:
        shape = reader.meta(name).shape
        if shape != model.shapes[name]:
            raise RelexError(
                f"{reader.path}: tensor {name} has shape {list(shape)}, {model.config_file} makes it "
                f"{list(model.shapes[name])}"
            )

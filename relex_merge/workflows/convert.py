"""Any readable checkpoint -> a Hugging Face safetensors model folder, streamed tensor by
tensor (row chunks within the memory budget), dtype kept unless asked otherwise."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from relex_merge.common.errors import RelexError
from relex_merge.common.progress import NullProgress, Progress
from relex_merge.common.units import default_max_memory
from relex_merge.config.options import Options
from relex_merge.config.trajectory import weights_dir
from relex_merge.engine import chunk_rows, process_group, row_ranges
from relex_merge.engine.sharding import assign
from relex_merge.io.base import CheckpointReader, TensorMeta
from relex_merge.io.dtypes import CONFIG_DTYPES, CONFIG_NAMES
from relex_merge.io.formats import open_checkpoint
from relex_merge.io.hf import check_model_tensors, find_model_config, model_tensors, read_model_config
from relex_merge.io.writers import OutputTensor
from relex_merge.output.folders import check_output_path, copy_side_files, shared_output_dir, write_model_config
from relex_merge.output.sinks import open_sinks, written_bytes

__all__ = ["convert", "plan_convert", "write_converted", "ConvertPlan", "ConvertResult"]


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert`` wrote."""

    tensors: int
    bytes_written: int  # the safetensors shards' sizes (0 on ranks other than 0)
    dtype: str  # the dtype written to config.json ("n/a" when there are no float tensors)


def _config_file(src: Path, reader: CheckpointReader, config_from: Path | None) -> Path:
    if config_from is not None:
        found = find_model_config(config_from)
        if found is None:
            raise RelexError(f"--config-from: no config.json in {config_from} or {config_from}/huggingface")
        return found
    found = find_model_config(src, reader.config_folders)
    if found is None:
        folders = ["huggingface/", *map(str, reader.config_folders)]
        where = "here" + "".join(f", in {f}" for f in folders[:-1]) + f" or in {folders[-1]}"
        raise RelexError(f"{src}: no config.json {where}; pass --config-from with the model's HF folder")
    return found


@dataclass(frozen=True)
class ConvertPlan:
    """A checked conversion (``plan_convert``): the open input, the output layout and the HF
    config to write; nothing is written yet."""

    reader: CheckpointReader
    out: Path
    tensors: list[OutputTensor]  # output names, shapes and dtypes (tied lm_head dropped)
    config: dict  # config.json to write
    config_folder: Path  # where config.json and the tokenizer are copied from
    config_dtype: str | None  # the most common float dtype, for config.json
    warnings: list[str] = field(default_factory=list)  # the reader's, and what was not checked
    overwrite: bool = False  # replace a non-empty OUT (checked again when the output is moved into place)


def plan_convert(
    src: Path,
    out: Path,
    *,
    dtype: str = "keep",
    config_from: Path | None = None,
    overwrite: bool = False,
    allow_unsafe_pickle: bool = False,
) -> ConvertPlan:
    """Open and check everything (headers only); nothing is written."""
    if src.is_dir():  # a trainer's step folder: its weights where trajectory: finds them (verl's actor/, ...)
        src = weights_dir(src)
    reader = open_checkpoint(src, allow_unsafe_pickle)
    config_file = _config_file(src, reader, config_from)
    config_folder = config_file.parent
    config = read_model_config(config_folder) or {}
    check_output_path(out, [src], overwrite)
    model = model_tensors(config_file)
    warnings = list(reader.warnings)
    if model is None:
        warnings.append(
            f"transformers cannot build the model {config_file} describes here (an architecture it does not "
            "know); the tensors' names and shapes are not checked against it"
        )
        names = reader.names()
    else:
        reader.align_names(model.shapes)
        names = [n for n in reader.names() if n not in model.unsaved]  # buffers the model does not save
        check_model_tensors(reader, names, model)
        if not config.get("architectures"):  # verl's huggingface/config.json has none; vLLM needs it
            config = {**config, "architectures": [model.architecture]}
    if config.get("tie_word_embeddings") and "model.embed_tokens.weight" in names:
        names = [n for n in names if n != "lm_head.weight"]  # HF stores tied weights once
    target = None if dtype == "keep" else CONFIG_DTYPES[dtype]

    def out_meta(name: str) -> TensorMeta:
        meta = reader.meta(name)
        return TensorMeta(meta.shape, target) if target and meta.dtype.is_floating_point else meta

    tensors = [OutputTensor(n, out_meta(n)) for n in names]
    float_dtypes = Counter(t.meta.dtype for t in tensors if t.meta.dtype.is_floating_point)
    config_dtype = CONFIG_NAMES.get(float_dtypes.most_common(1)[0][0]) if float_dtypes else None
    return ConvertPlan(reader, out, tensors, config, config_folder, config_dtype, warnings, overwrite)


def convert(
    src: str | Path,
    out: str | Path,
    options: Options = Options(),
    *,
    dtype: str = "keep",
    config_from: str | Path | None = None,
    progress: Progress = NullProgress(),
) -> ConvertResult:
    """Write checkpoint ``src`` (any readable format) as a Hugging Face safetensors folder ``out``."""
    with process_group.current().step("checking the input and the output folder"):
        plan = plan_convert(
            Path(src),
            Path(out),
            dtype=dtype,
            config_from=Path(config_from) if config_from else None,
            overwrite=options.overwrite,
            allow_unsafe_pickle=options.allow_unsafe_pickle,
        )
    for warning in plan.warnings:
        progress.note(f"warning: {warning}")
    return write_converted(
        plan,
        shard_size=options.shard_size,
        output_format=options.output_format,
        max_memory=options.max_memory or default_max_memory(),
        progress=progress,
    )


def write_converted(
    plan: ConvertPlan,
    *,
    shard_size: int = 5 * 1000**3,
    output_format: str = "safetensors",
    max_memory: int = 1 << 30,
    progress: Progress = NullProgress(),
) -> ConvertResult:
    """Stream the planned tensors into an atomic output folder in row chunks of at most
    ``max_memory`` bytes; under torchrun each rank converts its share and rank 0 finishes."""
    reader = plan.reader
    group = process_group.current()
    names = [t.name for t in plan.tensors]
    mine = assign(names, [reader.meta(n).nbytes for n in names], group.world_size)[group.rank]
    targets = {t.name: t for t in plan.tensors}
    progress.start("convert", sum(reader.meta(n).nbytes for n in mine), len(mine))
    with shared_output_dir(plan.out, group, plan.overwrite) as tmp:
        with open_sinks(
            [tmp], plan.tensors, mine, shard_size=shard_size, output_format_name=output_format, group=group
        ) as (sink,):
            with group.step("converting the tensors"), torch.no_grad():
                for name in mine:
                    meta = reader.meta(name)
                    rows = chunk_rows(meta, 2 * max(meta.dtype.itemsize, 4), max_memory)
                    for span in row_ranges(meta.rows, rows):
                        chunk = reader.read(name, span if meta.shape else None)
                        progress.advance(chunk.nbytes)
                        sink.write(name, chunk.to(targets[name].meta.dtype))
                    progress.advance(items=1)
        with group.step("writing the model config"):
            if group.main:
                write_model_config(plan.config, tmp, plan.config_dtype)
                copy_side_files(plan.config_folder, None, tmp)
        written = written_bytes([sink]) if group.main else 0
    progress.finish()
    return ConvertResult(len(plan.tensors), written, plan.config_dtype or "n/a")

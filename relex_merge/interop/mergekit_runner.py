"""Hand non-relex merge methods to mergekit's own runner, with relex registered so mergekit
configs can use it too. Output is written atomically like relex merges, and the model card
is our own: mergekit's asks the hub about local paths, which fails offline."""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from relex_merge.common.errors import RelexError
from relex_merge.io.formats import open_checkpoint
from relex_merge.output.folders import atomic_output_dir, check_output_path
from relex_merge.output.provenance import Provenance

__all__ = ["known_methods", "parse_mergekit_config", "check_mergekit_inputs", "run_mergekit", "readable"]


def known_methods() -> list[str]:
    """Every merge method mergekit knows, relex included (registers it; imports mergekit: slow)."""
    from mergekit.merge_methods import registry

    from relex_merge.interop.mergekit_method import register

    register()
    return [m.spec.name for m in registry.registered_methods()]


def parse_mergekit_config(document: dict, where: str):
    """A mergekit document (our ``name:`` key dropped) as mergekit's MergeConfiguration; its
    validation errors, and keys or parameters mergekit would silently ignore, as one-line
    RelexErrors that start with ``where``."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    body = {k: v for k, v in document.items() if k != "name"}
    try:
        config = MergeConfiguration.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<top>"
        raise RelexError(f"{where}: {loc}: {first['msg']}") from None
    except (RuntimeError, ValueError) as exc:
        raise RelexError(f"{where}: {exc}") from None
    _check_keys(body, where)
    return config


# mergekit's pydantic models ignore keys they do not know, and its methods ignore parameters
# they do not take: `densty: 0.5` would merge at the default density without a word.
def _check_keys(document: dict, where: str) -> None:
    from mergekit.common import ModelReference
    from mergekit.config import (
        InputModelDefinition,
        InputSliceDefinition,
        MergeConfiguration,
        OutputModuleDefinition,
        OutputSliceDefinition,
    )
    from mergekit.merge_methods import registry
    from mergekit.tokenizer.config import TokenizerConfig

    spec = registry.get(document["merge_method"]).spec
    every = [p.name for p in spec.parameters]
    per_input = [p.name for p in spec.input_parameters]

    def keys(value: Any, model: type, loc: str) -> None:
        if not isinstance(value, dict):
            return
        allowed = list(model.model_fields) + (["name"] if model is MergeConfiguration else [])
        for key in value:
            if key not in allowed:
                _unknown(f"{where}: unknown key '{loc}{key}'", key, allowed)

    def parameters(value: Any, loc: str, allowed: list[str]) -> None:
        if not isinstance(value, dict):
            return
        for key in value:
            if key in allowed:
                continue
            if key in every:  # a shared parameter given per model: mergekit never reads it there
                raise RelexError(
                    f"{where}: {loc}parameters.{key}: {spec.name} reads '{key}' once for every input; "
                    "put it in the top-level parameters"
                )
            _unknown(f"{where}: {loc}parameters.{key}: not a parameter of {spec.name}", key, allowed)

    def model_entry(entry: Any, model: type, loc: str) -> None:
        keys(entry, model, loc)
        if isinstance(entry, dict):
            keys(entry.get("model"), ModelReference, f"{loc}model.")
            parameters(entry.get("parameters"), loc, per_input)

    def output_slice(entry: Any, loc: str) -> None:
        keys(entry, OutputSliceDefinition, loc)
        if isinstance(entry, dict):
            keys(entry.get("base_model"), ModelReference, f"{loc}base_model.")
            parameters(entry.get("parameters"), loc, every)
            for i, source in enumerate(entry.get("sources") or []):
                model_entry(source, InputSliceDefinition, f"{loc}sources.{i}.")

    keys(document, MergeConfiguration, "")
    keys(document.get("base_model"), ModelReference, "base_model.")
    keys(document.get("tokenizer"), TokenizerConfig, "tokenizer.")
    parameters(document.get("parameters"), "", every)
    for i, entry in enumerate(document.get("models") or []):
        model_entry(entry, InputModelDefinition, f"models.{i}.")
    for i, entry in enumerate(document.get("slices") or []):
        output_slice(entry, f"slices.{i}.")
    for name, module in (document.get("modules") or {}).items():
        loc = f"modules.{name}."
        keys(module, OutputModuleDefinition, loc)
        if isinstance(module, dict):
            parameters(module.get("parameters"), loc, every)
            for i, entry in enumerate(module.get("models") or []):
                model_entry(entry, InputModelDefinition, f"{loc}models.{i}.")
            for i, entry in enumerate(module.get("slices") or []):
                output_slice(entry, f"{loc}slices.{i}.")


def _unknown(message: str, key: str, allowed: list[str]) -> None:
    hint = difflib.get_close_matches(key, allowed, n=1)
    suggestion = f"did you mean '{hint[0]}'?" if hint else f"known: {', '.join(allowed) or 'none'}"
    raise RelexError(f"{message} ({suggestion})")


def check_mergekit_inputs(document: dict, where: str, stages: Iterable[str] = ()) -> None:
    """What mergekit finds only while merging, found before any stage runs, in one line that
    names the model: a model folder without config.json (mergekit reads every model's), and a
    tensor whose shape differs from the base's (mergekit's message names neither model).
    Shapes are not compared when a ``tokenizer``/``tokenizer_source`` setting lets mergekit align
    vocabularies of different sizes. ``stages``: names of earlier stages (made later, skipped)."""
    config = parse_mergekit_config(document, where)
    skip = set(stages)
    models = [ref.model.path for ref in config.referenced_models() if ref.model.path not in skip]
    models = [Path(p) for p in dict.fromkeys(models) if Path(p).is_dir()]  # missing paths: said elsewhere
    for path in models:
        if not (path / "config.json").is_file():
            raise RelexError(
                f"{where}: {path} has no config.json, which mergekit reads for every model; copy it from the "
                "model the run started from"
            )
    if config.tokenizer is not None or config.tokenizer_source is not None or len(models) < 2:
        return
    base = Path(config.base_model.model.path) if config.base_model else models[0]
    if base not in models:
        return
    try:
        readers = {path: open_checkpoint(path) for path in models}
    except RelexError:
        return  # a format we cannot read headers of: mergekit will say what it thinks
    reference = readers[base]
    known = set(reference.names())
    try:
        for path, reader in readers.items():
            for name in reader.names():
                if name in known and reader.meta(name).shape != reference.meta(name).shape:
                    raise RelexError(
                        f"{where}: {path}: tensor {name} has shape {list(reader.meta(name).shape)}, {base} has "
                        f"{list(reference.meta(name).shape)}: mergekit merges tensors of one shape (for "
                        "vocabularies of different sizes, set tokenizer: {source: union})"
                    )
    finally:
        for reader in readers.values():
            reader.close()


def _local_models(config) -> list[Path]:
    paths = []
    for ref in config.referenced_models():
        path = Path(ref.model.path)
        if not path.exists():
            raise RelexError(f"model {ref.model.path}: path does not exist")
        paths.append(path)
    return paths


def _card(config_yaml: str, base: str | None, method: str) -> str:
    front = [
        "---",
        f"base_model: {base}" if base else None,
        "library_name: transformers",
        "tags:",
        "- merge",
        "- mergekit",
        "---",
    ]
    body = [
        "",
        f"# {method} merge",
        "",
        f"Made with relex-merge, which handed this `{method}` stage to mergekit.",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(line for line in front + body if line is not None)


def run_mergekit(
    document: dict,
    where: str,
    out: Path,
    *,
    device: str,
    shard_size: int,
    quiet: bool,
    overwrite: bool,
    provenance: Provenance | None = None,
) -> Path:
    """Run one mergekit document into ``out`` (atomically, with our own offline model card);
    ``provenance``: this is the final stage of a multi-stage merge."""
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    known_methods()  # registers relex
    config = parse_mergekit_config(document, where)
    inputs = _local_models(config)
    check_output_path(out, inputs, overwrite)
    options = MergeOptions(
        device=device,
        out_shard_size=shard_size,
        write_model_card=False,
        quiet=quiet,
        copy_tokenizer=True,
    )
    config_yaml = yaml.safe_dump({k: v for k, v in document.items() if k != "name"}, sort_keys=False)
    with atomic_output_dir(out, overwrite) as tmp:
        # mergekit logs and prints through tqdm; keep our terminal output ours when quiet
        from transformers.utils import logging as hf_logging

        sink = io.StringIO()
        redirect = contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext()
        level, verbosity = logging.getLogger().level, hf_logging.get_verbosity()
        if quiet:  # transformers' handler holds the real stderr: the redirect does not reach it
            hf_logging.set_verbosity_error()
        try:
            with redirect:
                run_merge(config, str(tmp), options=options)
        finally:
            logging.getLogger().setLevel(level)
            hf_logging.set_verbosity(verbosity)
        base = config.base_model.model.path if config.base_model else None
        card = _card(config_yaml, base, config.merge_method)
        if provenance is not None:
            config_yaml = provenance.config_header + provenance.restore_names(config_yaml)
            named_base = provenance.restore_names(base) if base else None
            card = (
                _card(provenance.restore_names(config_yaml), named_base, config.merge_method) + provenance.card_section
            )
            (tmp / provenance.file_name).write_text(provenance.documents_yaml)
        (tmp / "mergekit_config.yml").write_text(config_yaml)
        (tmp / "README.md").write_text(card)
        readable(tmp)
    return out


def readable(folder: Path) -> None:
    """Give every file the mode a new file gets here (mergekit writes its shards 0600, which other
    users of a shared cluster cannot read)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)

"""Hand non-relex merge methods to mergekit's own runner, with relex registered so mergekit
configs can use it too. Output is written atomically like relex merges, and the model card
is our own: mergekit's asks the hub about local paths, which fails offline."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import yaml

from relex_merge.common.errors import RelexError
from relex_merge.output.folders import atomic_output_dir, check_output_path
from relex_merge.output.provenance import Provenance

__all__ = ["known_methods", "parse_mergekit_config", "run_mergekit", "readable"]


def known_methods() -> list[str]:
    """Every merge method mergekit knows, relex included (registers it; imports mergekit: slow)."""
    from mergekit.merge_methods import registry

    from relex_merge.interop.mergekit_method import register

    register()
    return [m.spec.name for m in registry.registered_methods()]


def parse_mergekit_config(document: dict, where: str):
    """A mergekit document (our ``name:`` key dropped) as mergekit's MergeConfiguration; its
    validation errors as one-line RelexErrors that start with ``where``."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    body = {k: v for k, v in document.items() if k != "name"}
    try:
        return MergeConfiguration.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<top>"
        raise RelexError(f"{where}: {loc}: {first['msg']}") from None
    except (RuntimeError, ValueError) as exc:
        raise RelexError(f"{where}: {exc}") from None


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
        sink = io.StringIO()
        redirect = contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext()
        level = logging.getLogger().level
        try:
            with redirect:
                run_merge(config, str(tmp), options=options)
        finally:
            logging.getLogger().setLevel(level)
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

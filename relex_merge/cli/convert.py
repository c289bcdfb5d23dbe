"""``relex-merge convert SRC OUT``: any readable checkpoint to a Hugging Face safetensors folder."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from relex_merge.cli._app import RelexCommand, progress, quiet_and_verbose, rank0
from relex_merge.common.units import human_bytes
from relex_merge.config.options import flags

__all__ = ["COMMAND"]


class _ConvertCommand(RelexCommand):
    """``convert --help`` ends with the formats it reads, from the format registry (imported only
    when that help is shown: it loads torch)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from relex_merge.io.formats import formats

        with formatter.section("Checkpoint formats (tried in this order)"):
            formatter.write_dl([(fmt.name, fmt.description) for fmt in formats()])
        super().format_epilog(ctx, formatter)


@click.command("convert", cls=_ConvertCommand)
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(["keep", "float32", "bfloat16", "float16"]),
    default="keep",
    show_default=True,
    help="Dtype of the written float tensors (keep: as stored).",
)
@click.option(
    "--config-from",
    type=click.Path(path_type=Path, file_okay=False),
    help="HF folder with config.json and tokenizer (default: SRC or SRC/huggingface).",
)
@quiet_and_verbose
@flags("overwrite", "shard_size", "output_format", "max_memory", "allow_unsafe_pickle", "timeout")
def convert_command(src, out, dtype, config_from, options, quiet, verbose):
    """Convert a checkpoint (HF, .bin, verl FSDP shards, DCP, ZeRO) to an HF safetensors folder."""
    from relex_merge.workflows.convert import convert

    quiet = quiet or not rank0()
    result = convert(src, out, options, dtype=dtype, config_from=config_from, progress=progress(quiet))
    if not quiet:
        Console().print(
            escape(f"wrote {out}: {result.tensors} tensors, {human_bytes(result.bytes_written)}, {result.dtype}")
        )


COMMAND = convert_command

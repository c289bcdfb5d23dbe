"""``relex-merge jump CONFIG OUT [--resume-layout verl]``: one merge to one target step, written
where the trainer resumes from (a HF folder, or verl's own FSDP checkpoint layout)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from relex_merge.cli._app import ENGINE_FLAGS, RelexCommand, progress, quiet_and_verbose, rank0
from relex_merge.config.options import flags

__all__ = ["COMMAND"]


@click.command("jump", cls=RelexCommand)
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--resume-layout",
    type=click.Choice(["hf", "verl"]),
    default="hf",
    show_default=True,
    help="hf: a Hugging Face folder; verl: OUT/global_step_N/actor sharded like the last window "
    "checkpoint, with its optimizer and extra state, and latest_checkpointed_iteration.txt "
    "(trainer.resume_mode=auto, default_local_dir=OUT).",
)
@click.option(
    "--resume-step",
    type=click.Choice(["target", "last"]),
    default="target",
    show_default=True,
    help="verl: name the checkpoint after the target step (verl counts the jumped steps as done) "
    "or after the last window step (the jump costs no steps of the schedule).",
)
@click.option("--keep-hf", is_flag=True, help="verl: keep the jump as a HF folder too (OUT/hf).")
@quiet_and_verbose
@flags("overwrite", *ENGINE_FLAGS, "shard_size", "full_hash", "when_unsupported", "require_supported", "tolerance")
def jump_command(config_path, out, resume_layout, resume_step, keep_hf, options, quiet, verbose):
    """Jump: merge to one target step, in the layout the trainer resumes from."""
    from relex_merge.workflows.jump import jump

    main = rank0()
    quiet = quiet or not main
    result = jump(
        config_path,
        out,
        options,
        resume_layout=resume_layout,
        resume_step=resume_step,
        keep_hf=keep_hf,
        progress=progress(quiet),
    )
    if not main:
        return
    # the verdict reaches stderr whatever -q says, as merge's does
    verdict = result.merge.assessment.verdicts[0]
    if verdict is not None:
        colour = "green" if verdict.supported else "yellow"
        Console(stderr=True, soft_wrap=True).print(f"[bold {colour}]verdict:[/] {escape(verdict.line())}")
    if quiet:
        return
    console = Console()
    if result.layout == "verl":
        console.print(
            escape(
                f"wrote {out}/global_step_{result.resume_step}/actor ({len(result.rank_files)} rank files, "
                f"the jump to step {result.target}); carried over: {', '.join(result.copied) or 'nothing'}; "
                f"resume with trainer.resume_mode=auto trainer.default_local_dir={out}"
            ),
            soft_wrap=True,
        )
    else:
        console.print(escape(f"wrote {out} (the jump to step {result.target})"), soft_wrap=True)


COMMAND = jump_command

"""One way to write models through output sinks (relex_merge.io.writers), on one process or on
every rank of a distributed run: merges, conversions and the fit cache all use ``open_sinks``.

    with open_sinks(folders, tensors, mine, shard_size=..., output_format="safetensors") as sinks:
        ...  # write this process's tensors (``mine``) into every sink

Rank 0 creates the folders and files, the other ranks open them, each rank checks that its
share arrived, and rank 0 checks that the shares together complete every tensor (and writes the
index). Any failure aborts every sink; the caller's atomic folder removes the partial output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from relex_merge.engine import process_group
from relex_merge.io.writers import OutputSink, OutputTensor, output_format

__all__ = ["open_sinks", "written_bytes"]


@contextlib.contextmanager
def open_sinks(
    folders: Sequence[Path],
    tensors: list[OutputTensor],
    mine: Sequence[str],
    *,
    shard_size: int,
    output_format_name: str = "safetensors",
    metadata: dict[str, str] | None = None,
    file_name: str | None = None,
    group: process_group.Group | None = None,
) -> Iterator[list[OutputSink]]:
    """One sink per folder, each receiving ``tensors``; this process writes the tensors ``mine``."""
    group = group or process_group.current()
    fmt = output_format(output_format_name)
    sinks = [fmt.create(folder, tensors, shard_size, metadata=metadata, file_name=file_name) for folder in folders]
    try:
        with group.step("creating the output files"):
            if group.main:
                for folder, sink in zip(folders, sinks):
                    folder.mkdir(exist_ok=True)
                    sink.prepare()
        with group.step("opening the output files"):
            if not group.main:
                for sink in sinks:
                    sink.attach()
        yield sinks
        with group.step("checking every byte arrived"):
            shares = [sink.close_share(mine) for sink in sinks]
        everyone = group.all_gather(shares)
        with group.step("finishing the output files"):
            if group.main:
                for j, sink in enumerate(sinks):
                    sink.finalize([rank_shares[j] for rank_shares in everyone])
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise


def written_bytes(sinks: Sequence[OutputSink]) -> int:
    """Bytes in the sinks' files (rank 0 after ``open_sinks`` has finished)."""
    return sum(path.stat().st_size for sink in sinks for path in sink.paths if path.is_file())

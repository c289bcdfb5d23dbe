"""Which process runs which tensors: tensors are independent, so a distributed run splits them
over the ranks, balanced by bytes, the same way on every rank (no communication needed)."""

from __future__ import annotations

from collections.abc import Sequence

from relex_merge.engine import process_group
from relex_merge.engine.job import MergeJob

__all__ = ["assign", "share", "share_of"]


def assign(names: Sequence[str], sizes: Sequence[int], world_size: int) -> list[list[str]]:
    """Tensors to ranks, balanced by bytes and the same on every rank: largest first, each to
    the least-loaded rank (ties: the lower rank); each share keeps the given order."""
    loads = [0] * world_size
    owner: dict[str, int] = {}
    for i in sorted(range(len(names)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[names[i]] = rank
        loads[rank] += sizes[i]
    return [[n for n in names if owner[n] == r] for r in range(world_size)]


def share(job: MergeJob, group: process_group.Group) -> list[str]:
    """This rank's tensors: ``assign`` by the bytes every input holds of each."""
    names = job.names()
    sizes = [sum(reader.meta(name).nbytes for reader in job.readers) for name in names]
    return assign(names, sizes, group.world_size)[group.rank]


def share_of(job: MergeJob) -> list[str]:
    """The tensors this process runs: all of them, or its rank's share."""
    group = process_group.current()
    return share(job, group) if group.distributed else job.names()

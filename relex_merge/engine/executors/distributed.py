"""Run a job across the ranks of a torch.distributed group: every rank takes its share of the
tensors (balanced by bytes, the same assignment on every rank), runs it on its own threads, and
the reports (a few KB per tensor: Gram matrix, diagnostics) are exchanged so that every rank
has the whole job's. The arithmetic of a tensor does not depend on which rank runs it, so the
output is byte for byte the single-process one."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from relex_merge.common.units import human_bytes
from relex_merge.engine import process_group
from relex_merge.engine.executors.threads import ThreadExecutor
from relex_merge.engine.job import ChunkSink, EngineOptions, EngineStats, MergeJob, ProgressFn
from relex_merge.engine.sharding import share

__all__ = ["EXECUTOR", "DistributedExecutor"]

log = logging.getLogger(__name__)


class DistributedExecutor:
    """The executor under torchrun/srun with several ranks (chosen by ``default_executor``)."""

    name = "distributed"

    def run(
        self, job: MergeJob, sinks: Sequence[ChunkSink], options: EngineOptions, progress: ProgressFn
    ) -> EngineStats:
        """Run this rank's share on its own threads, then gather every rank's reports; any rank's
        failure fails every rank. Every rank returns the same whole-job statistics."""
        group = process_group.current()
        mine = share(job, group)
        if log.isEnabledFor(logging.DEBUG):
            nbytes = sum(reader.meta(name).nbytes for name in mine for reader in job.readers)
            log.debug(
                "rank %d of %d: %d of %d tensors, %s of input",
                group.rank,
                group.world_size,
                len(mine),
                len(job.names()),
                human_bytes(nbytes),
            )
        with group.step("running the tensors"):
            stats = ThreadExecutor().run(job.share(mine), sinks, options, progress)
        everyone: list[EngineStats] = group.all_gather(stats)
        reports = {r.name: r for s in everyone for r in s.tensors}
        return EngineStats(
            bytes_read=sum(s.bytes_read for s in everyone),
            tensors=[reports[name] for name in job.names() if name in reports],
            workers=sum(s.workers for s in everyone),
            read_seconds=sum(s.read_seconds for s in everyone),
            math_seconds=sum(s.math_seconds for s in everyone),
            write_seconds=sum(s.write_seconds for s in everyone),
            fit_seconds=sum(s.fit_seconds for s in everyone),
        )


EXECUTOR = DistributedExecutor()

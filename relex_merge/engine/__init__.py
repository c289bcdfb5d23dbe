"""The streaming engine: every tensor of the base model, in spans of rows, from every input.

    job.py        what to do (MergeJob), with what (EngineOptions), what comes back (EngineStats)
    tasks.py      the span tasks: per tensor a Gram pass over its spans, the fit, an output pass
    sharding.py   which rank runs which tensors (balanced by bytes, the same on every rank)
    process_group.py  who this process is in a torchrun/srun run, and the few collectives a merge needs
    watchdog.py   every rank's heartbeat: a rank killed or frozen is named within a bounded time
    executors/    who runs them: threads in this process (threads.py), the ranks of a
                  torch.distributed group (distributed.py); a new executor is one new file

``run_job`` runs a job with the executor that fits the process: ``distributed`` under torchrun
or srun with several ranks, ``threads`` otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from relex_merge.engine.executors import Executor, default_executor, executor
from relex_merge.engine.executors import executor as _executor
from relex_merge.engine.job import (
    ChunkSink,
    EngineOptions,
    EngineStats,
    MergeJob,
    ProgressFn,
    TensorReport,
    default_threads,
)
from relex_merge.engine.sharding import share_of
from relex_merge.engine.tasks import chunk_rows, planned_read_bytes, row_ranges

__all__ = [
    "MergeJob",
    "EngineOptions",
    "EngineStats",
    "TensorReport",
    "ChunkSink",
    "ProgressFn",
    "Executor",
    "run_job",
    "executor",
    "default_executor",
    "planned_read_bytes",
    "chunk_rows",
    "row_ranges",
    "default_threads",
    "share_of",
]

log = logging.getLogger(__name__)


def run_job(
    job: MergeJob,
    sinks: Sequence[ChunkSink],
    options: EngineOptions,
    progress: ProgressFn = lambda nbytes, done: None,
    executor: Executor | None = None,
) -> EngineStats:
    """Merge every tensor of the job into one sink per output (none: Gram matrices and
    diagnostics only). Every rank of a distributed run gets the whole job's reports."""
    chosen = executor or (_executor(options.executor) if options.executor else default_executor())
    log.debug(
        "executor %s: %d tensors, %d output(s), %d worker thread(s)%s",
        chosen.name,
        len(job.names()),
        len(sinks),
        options.workers,
        " per rank" if chosen.name == "distributed" else "",
    )
    return chosen.run(job, sinks, options, progress)

"""Run every span of a job on a pool of threads in this process (the default executor)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch

from relex_merge.engine.job import ChunkSink, EngineOptions, EngineStats, MergeJob, ProgressFn
from relex_merge.engine.tasks import TensorTasks

__all__ = ["EXECUTOR", "ThreadExecutor"]


class ThreadExecutor:
    """Spans on ``options.workers`` threads; the calling thread hands them out and fits."""

    name = "threads"

    def run(
        self, job: MergeJob, sinks: Sequence[ChunkSink], options: EngineOptions, progress: ProgressFn
    ) -> EngineStats:
        """Run every span of the job; torch runs on one intra-op thread meanwhile (restored
        after). An error (a span's, or a check's in ``finished``) propagates once the pool has
        shut down."""
        workers = options.workers
        stats = EngineStats(workers=workers)
        tasks = TensorTasks(job, sinks, options, stats, progress)
        # The workers are the parallelism: torch's intra-op threads would only contend with them.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="relex-worker")
        in_flight: set[Future] = set()
        try:
            while True:
                # two spans per worker: one running, one queued, so no worker waits on the main thread
                while len(in_flight) < 2 * workers and (span := tasks.next_span()) is not None:
                    in_flight.add(pool.submit(tasks.runner.run, span))
                if not in_flight:
                    break
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    tasks.finished(future.result())
        finally:
            for future in in_flight:
                future.cancel()
            pool.shutdown(wait=True)  # running spans are short; their errors no longer matter
            torch.set_num_threads(threads)
        stats.tensors = tasks.reports()
        return stats


EXECUTOR = ThreadExecutor()

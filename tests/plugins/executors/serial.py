"""A toy executor: the threads executor with one worker, which also leaves a marker file
(RELEX_TOY_EXECUTOR_MARK) so the test can see it ran."""

import os
from dataclasses import replace
from pathlib import Path

from relex_merge.engine.executors.threads import ThreadExecutor


class SerialExecutor:
    name = "serial"

    def run(self, job, sinks, options, progress):
        Path(os.environ["RELEX_TOY_EXECUTOR_MARK"]).write_text(f"{len(job.names())} tensors")
        return ThreadExecutor().run(job, sinks, replace(options, threads=1), progress)


EXECUTOR = SerialExecutor()

"""relex-merge: predict later RL checkpoints from a short window of earlier ones (RELEX).

The library API (the command line is a thin layer over it):

    from relex_merge import Options, run_merge, analyze, sweep, evaluate, convert

    result = run_merge("merge_configs/demo.yml", "out/demo", Options(threads=2))
    for verdict in result.final.merge.assessment.verdicts:
        print(verdict.line())

Names are imported on first use, so ``import relex_merge`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from relex_merge.common.version import __version__

_EXPORTS = {
    "Options": "relex_merge.config.options",
    "run_merge": "relex_merge.workflows.merge",
    "execute_merge": "relex_merge.workflows.merge",
    "RunResult": "relex_merge.workflows.merge",
    "analyze": "relex_merge.workflows.analyze",
    "sweep": "relex_merge.workflows.sweep",
    "evaluate": "relex_merge.evaluation.lm_eval",
    "convert": "relex_merge.workflows.convert",
    "plan_merge": "relex_merge.workflows.plan",
    "load_config": "relex_merge.config.schema",
    "RelexError": "relex_merge.common.errors",
    "UnsupportedTarget": "relex_merge.common.errors",
    "Progress": "relex_merge.common.progress",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'relex_merge' has no attribute {name!r}")

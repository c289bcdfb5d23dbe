"""``watch``: follow a run directory as checkpoints land, keep the window's Gram matrices up to
date one new row per checkpoint, refresh the analysis, and write the configured targets when the
backtest supports them (or on demand).

Each ``Watcher.poll()`` looks for settled step folders (every file older than ``settle`` seconds)
that the config's ``trajectory:`` selects, and updates the Gram matrices:

- exact (default): the engine reads the base, the window's earlier checkpoints and the new ones,
  and computes only the new checkpoints' inner products with every delta (the earlier block is
  kept). A new checkpoint costs one read of the base and of every window checkpoint ((T + 1)
  model sizes, T the window's length) and O(T * P) multiply-adds (P parameters): the reads
  dominate, and they grow with T. Checkpoints a trainer deletes (save_total_limit) leave the
  window, their rows and columns with them; a step that lands before the last known one
  starts the Gram matrices afresh.
- sketched (``sketch=m``): one CountSketch of width m per tensor and checkpoint (core.sketch). A
  new checkpoint costs one read of itself and O(P) hashing, whatever T; memory is T * m floats
  per tensor. Each Gram entry's error has a standard deviation of at most sqrt(2/m) relative to
  sqrt(G_jj G_kk) (2.2% at m = 4096); measure its effect on the verdicts before trusting
  written targets (demo/watch_sketch.py).

After an update: the analysis (core.analysis, as ``analyze`` reports it) is written to
OUT/analysis.json with the plots and (exact Gram matrices) OUT/fit_cache.safetensors, as
``analyze --out`` writes them; every update is appended to OUT/watch.json, and each target still
ahead of the window whose verdict is SUPPORTED (``write="supported"``; "always"; "never") is
written to OUT/step-N (a HF folder, replaced as the window grows), from the Gram matrices already
known: one read of the window.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from relex_merge.common.errors import RelexError, WindowTooShort
from relex_merge.config.options import Options
from relex_merge.config.schema import RelexConfig, load_config
from relex_merge.config.trajectory import discover_steps, select_steps, weights_dir
from relex_merge.core.analysis import Analysis, analyze_grams, representative_curves
from relex_merge.core.sketch import CountSketch
from relex_merge.engine import TensorReport, chunk_rows, row_ranges, run_job
from relex_merge.io.base import read_span
from relex_merge.io.formats import has_weights
from relex_merge.output import plots
from relex_merge.workflows.fit_cache import CACHE_NAME, write_fit_cache
from relex_merge.workflows.merge import execute_merge
from relex_merge.workflows.plan import MergePlan, plan_merge

__all__ = ["Watcher", "WatchUpdate"]

log = logging.getLogger(__name__)

Write = Literal["supported", "always", "never"]


def _kind(warning: str) -> str:
    """A warning without what changes as the window grows (paths, steps, counts, sizes,
    parenthesised details): each kind of warning is shown once."""
    return re.sub(r"\S*\d\S*", "#", re.sub(r"\s*\([^)]*\)", "", warning))


@dataclass
class WatchUpdate:
    """What one poll did."""

    steps: list[int]  # the window now
    added: list[int]  # checkpoints new in this update
    dropped: list[int] = field(default_factory=list)  # checkpoints gone from the run directory
    analysis: Analysis | None = None  # None: no change, or too few checkpoints yet
    written: list[tuple[int, Path]] = field(default_factory=list)  # targets written
    seconds: float = 0.0  # reading and updating the Gram matrices
    bytes_read: int = 0
    fresh: bool = False  # the Gram matrices were computed afresh (not updated)
    waiting: str = ""  # why there is no analysis yet
    warnings: list[str] = field(default_factory=list)  # the plan's warnings not shown before


class Watcher:
    """Follows one config's run directory (see the module docstring)."""

    def __init__(
        self,
        config: str | Path,
        out: str | Path | None = None,
        options: Options = Options(),
        *,
        sketch: int | None = None,
        sketch_seed: int = 0,
        write: Write = "supported",
        settle: float = 10.0,
        note: Callable[[str], None] = lambda line: None,
    ):
        self.config_path = Path(config)
        self.config: RelexConfig = load_config(config)
        if self.config.trajectory is None:
            raise RelexError(f"{config}: watch follows a run directory: give trajectory: {{run_dir: ...}}")
        self.out = Path(out) if out is not None else None
        self.options = options
        self.engine = options.engine()
        self.sketch = CountSketch(sketch, sketch_seed) if sketch else None
        self.write = write
        self.settle = settle
        self.note = note
        self.steps: list[int] = []
        self.grams: dict[str, torch.Tensor] = {}
        self.numels: dict[str, int] = {}
        self.sketches: dict[int, dict[str, torch.Tensor]] = {}  # step (or -1: the base) -> name -> sketch
        self.history: list[dict] = []
        self.written_from: dict[int, list[int]] = {}  # target -> the window it was written from
        self.plan: MergePlan | None = None
        self._warned: set[str] = set()  # each plan warning is shown once, not at every update
        self.analysis: Analysis | None = None
        if self.out is not None:
            if self.out.exists() and not self.out.is_dir():
                raise RelexError(f"--out: {self.out} is a file")
            self.out.mkdir(parents=True, exist_ok=True)

    # ---- which checkpoints are there

    def _settled(self, folder: Path, now: float) -> bool:
        weights = weights_dir(folder)
        if not has_weights(weights):
            return False
        newest = max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=now)
        return now - newest >= self.settle

    def available(self) -> list[int]:
        """The settled steps the trajectory selects, in order."""
        spec = self.config.trajectory
        found = discover_steps(Path(spec.run_dir))
        now = time.time()
        ready = [s for s in sorted(found) if self._settled(found[s], now)]
        if isinstance(spec.steps, list):  # the listed steps that have landed
            spec = spec.model_copy(update={"steps": [s for s in spec.steps if s in ready]})
        return select_steps(spec, ready) if ready else []

    # ---- one poll

    def poll(self, force_write: bool = False) -> WatchUpdate:
        """Look for new checkpoints; when the window changed, update and refresh (and write targets)."""
        steps = self.available()
        added = [s for s in steps if s not in self.steps]
        dropped = [s for s in self.steps if s not in steps]
        update = WatchUpdate(steps, added, dropped)
        if not added and not dropped and not force_write:
            return update
        if not added and not dropped and self.plan is not None and force_write:
            update.analysis = self.analysis
            update.written = self._write_targets(force=True)
            return update
        config = self.config.model_copy(
            update={"trajectory": self.config.trajectory.model_copy(update={"steps": list(steps), "every": None})}
        )
        if len(steps) < 2:
            update.waiting = f"{len(steps)} checkpoint(s) so far; the window needs at least 2"
            return update
        try:
            plan = plan_merge(
                config, self.options.allow_unsafe_pickle, require_targets=False, writes_models=self.out is not None
            )
        except WindowTooShort as exc:  # a longer window will do
            update.waiting = str(exc)
            return update
        update.warnings = [w for w in plan.warnings if _kind(w) not in self._warned]
        self._warned.update(_kind(w) for w in update.warnings)
        start = time.perf_counter()
        if self.sketch is None:
            update.bytes_read, update.fresh = self._update_exact(plan, steps)
        else:
            update.bytes_read, update.fresh = self._update_sketch(plan, steps)
        update.seconds = time.perf_counter() - start
        if self.plan is not None:
            self._close_readers(self.plan)
        self.steps, self.plan = steps, plan
        try:
            self.analysis = self._analyze(plan)
        except (RelexError, ValueError) as exc:  # too short a window to backtest yet, say
            update.waiting = str(exc)
            return update
        update.analysis = self.analysis
        update.written = self._write_targets(force=force_write)
        self._record(update)
        return update

    def _update_exact(self, plan: MergePlan, steps: list[int]) -> tuple[int, bool]:
        kept = [s for s in self.steps if s in steps]
        prefix = bool(kept) and steps[: len(kept)] == kept and bool(self.grams)
        job = plan.job.gram_only()
        if prefix:
            idx = [self.steps.index(s) for s in kept]
            known = {name: g[idx][:, idx] for name, g in self.grams.items()}
            if len(kept) == len(steps):  # checkpoints only left: nothing to read
                self.grams = known
                return 0, False
            job = replace(job, gram_cache=known, gram_from=len(kept))
        stats = run_job(job, [], self.engine)
        self.grams = {r.name: r.gram for r in stats.tensors if r.gram is not None}
        self.numels = {r.name: r.numel for r in stats.tensors if r.gram is not None}
        return stats.bytes_read, not prefix

    def _sketch_of(self, reader, names: list[str]) -> dict[str, torch.Tensor]:
        budget = max(1 << 20, self.engine.max_memory // 4)
        out = {}
        for name in names:
            meta = reader.meta(name)
            total = torch.zeros(self.sketch.size(meta.numel), dtype=torch.float64)
            row_elements = meta.numel // max(meta.rows, 1)
            if not meta.shape or meta.numel == 0:
                spans = [(None, 0)]
            else:
                spans = [((lo, hi), lo * row_elements) for lo, hi in row_ranges(meta.rows, chunk_rows(meta, 8, budget))]
            for rows, first in spans:
                chunk = read_span(reader, name, rows)
                total += self.sketch.sketch(name, chunk, first, meta.numel)
            out[name] = total
        return out

    def _update_sketch(self, plan: MergePlan, steps: list[int]) -> tuple[int, bool]:
        job = plan.job
        names = [n for n in job.base.names() if job.base.meta(n).dtype.is_floating_point]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # index_add_ in one order: the same sketch every time
        bytes_read = 0
        try:
            if -1 not in self.sketches:
                self.sketches[-1] = self._sketch_of(job.base, names)
                bytes_read += sum(job.base.meta(n).nbytes for n in names)
            for step, reader in zip(job.steps, job.checkpoints):
                if step not in self.sketches:
                    self.sketches[step] = self._sketch_of(reader, names)
                    bytes_read += sum(reader.meta(n).nbytes for n in names)
        finally:
            torch.set_num_threads(threads)
        for step in [s for s in self.sketches if s != -1 and s not in steps]:
            del self.sketches[step]
        base = self.sketches[-1]
        self.grams, self.numels = {}, {}
        for name in names:
            deltas = torch.stack([self.sketches[s][name] - base[name] for s in steps])
            self.grams[name] = deltas @ deltas.T
            self.numels[name] = job.base.meta(name).numel
        return bytes_read, False

    def _analyze(self, plan: MergePlan) -> Analysis:
        names = list(self.grams)
        job = plan.job
        analysis = analyze_grams(
            names,
            [self.numels[n] for n in names],
            [self.grams[n] for n in names],
            list(job.steps),
            list(job.targets),
            job.spec,
            self.options.tolerance,
        )
        analysis.coefficients = representative_curves(self.grams, analysis, job.steps, job.spec)
        if self.out is not None:
            _write_atomic(self.out / "analysis.json", analysis.to_json())
            if plots.available():
                plots.write_plots(analysis, self.out)
            if self.sketch is None:  # the exact Gram matrices: a merge given --fit-cache skips its Gram pass
                reports = [TensorReport(n, self.numels[n], None, passes=0, gram=g) for n, g in self.grams.items()]
                tmp = self.out / f".fit-cache-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                write_fit_cache(tmp / CACHE_NAME, plan, reports)
                (tmp / CACHE_NAME).replace(self.out / CACHE_NAME)
                shutil.rmtree(tmp, ignore_errors=True)
        return analysis

    def _write_targets(self, force: bool = False) -> list[tuple[int, Path]]:
        plan, analysis = self.plan, self.analysis
        if plan is None or analysis is None or self.out is None or (self.write == "never" and not force):
            return []
        verdicts = {v["target_step"]: v for v in analysis.target_verdicts}
        written = []
        for target in plan.job.targets:
            if target <= self.steps[-1]:
                continue  # the run is there already
            go = force or self.write == "always" or verdicts.get(target, {}).get("supported", False)
            if not go or (self.written_from.get(target) == self.steps and not force):
                continue
            job = replace(plan.job, targets=[target], gram_cache=dict(self.grams), fits=None, scales=None)
            folder = self.out / f"step-{target}"
            execute_merge(
                replace(plan, job=job),
                folder,
                self.engine,
                overwrite=True,
                shard_size=self.options.shard_size,
                tolerance=self.options.tolerance,
            )
            self.written_from[target] = list(self.steps)
            written.append((target, folder))
        return written

    def _record(self, update: WatchUpdate) -> None:
        a = update.analysis
        entry = {
            "time": round(time.time(), 3),
            "steps": update.steps,
            "added": update.added,
            "dropped": update.dropped,
            "gram": "sketch" if self.sketch else ("fresh" if update.fresh else "updated"),
            "sketch_width": self.sketch.width if self.sketch else None,
            "seconds": round(update.seconds, 4),
            "bytes_read": update.bytes_read,
            "verdicts": a.target_verdicts if a else [],
            "written": [{"target": t, "folder": str(f)} for t, f in update.written],
        }
        self.history.append(entry)
        if self.out is not None:
            _write_atomic(self.out / "watch.json", json.dumps(self.history, indent=1) + "\n")

    @staticmethod
    def _close_readers(plan: MergePlan) -> None:
        for reader in [plan.job.base, *plan.job.checkpoints]:
            reader.close()

    def close(self) -> None:
        """Close the open checkpoints."""
        if self.plan is not None:
            self._close_readers(self.plan)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)

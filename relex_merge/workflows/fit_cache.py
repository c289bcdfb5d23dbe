"""The fit cache: every tensor's Gram matrix (T x T, float64) with the window's steps and the
inputs' fingerprints, written by ``analyze --out``; a later merge given ``--fit-cache`` skips the
Gram pass, and a cache made from other checkpoints or steps is refused."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from relex_merge.common.errors import RelexError
from relex_merge.engine import TensorReport, process_group
from relex_merge.io.base import TensorMeta
from relex_merge.io.formats.safetensors import read_safetensors_header
from relex_merge.io.writers import OutputTensor
from relex_merge.output.sinks import open_sinks
from relex_merge.workflows.plan import MergePlan

__all__ = ["CACHE_NAME", "write_fit_cache", "load_fit_cache"]

CACHE_NAME = "fit_cache.safetensors"


def write_fit_cache(path: Path, plan: MergePlan, reports: Sequence[TensorReport]) -> None:
    """Every tensor's Gram matrix (T x T float64) with the steps and input fingerprints."""
    tensors = [r for r in reports if r.gram is not None]
    metadata = {
        "format": "pt",
        "relex_fit_cache": "1",
        "steps": json.dumps(list(plan.job.steps)),
        "inputs": json.dumps([record.fingerprint for record in plan.fingerprints()]),
    }
    n = len(plan.job.steps)
    layout = [OutputTensor(t.name, TensorMeta((n, n), torch.float64)) for t in tensors]
    with open_sinks(
        [path.parent],
        layout,
        [t.name for t in layout],
        shard_size=1 << 62,
        metadata=metadata,
        file_name=path.name,
        group=process_group.Group(),
    ) as (sink,):  # this process alone
        for t in tensors:
            sink.write(t.name, t.gram.to(torch.float64).contiguous())


def load_fit_cache(path: Path, plan: MergePlan) -> dict[str, torch.Tensor]:
    """The cached Gram matrices, refused if they came from other checkpoints or steps."""
    from safetensors import safe_open

    if not path.is_file():
        raise RelexError(f"--fit-cache: {path} does not exist (relex-merge analyze CONFIG --out DIR writes one)")
    read_safetensors_header(path)  # one-line errors for damaged files
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("relex_fit_cache") != "1":
            raise RelexError(f"--fit-cache: {path} is not a relex fit cache")
        if json.loads(meta["steps"]) != list(plan.job.steps):
            raise RelexError(f"--fit-cache: {path} was made for steps {meta['steps']}, not {list(plan.job.steps)}")
        now = [record.fingerprint for record in plan.fingerprints()]
        if json.loads(meta["inputs"]) != now:
            raise RelexError(f"--fit-cache: {path} was made from other checkpoint files; rerun relex-merge analyze")
        return {name: f.get_tensor(name) for name in f.keys()}

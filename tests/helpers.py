"""Shared test helpers: an in-memory checkpoint reader, the dense reference implementation of
RELEX (written independently of relex_merge.fit), and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

from relex_merge.io.base import CheckpointReader, TensorMeta


class DictReader(CheckpointReader):
    """A CheckpointReader over an in-memory state dict."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: str = "<memory>"):
        self.tensors = tensors
        self.path = Path(path)

    def names(self):
        return list(self.tensors)

    def meta(self, name):
        t = self.tensors[name]
        return TensorMeta(tuple(t.shape), t.dtype)

    def files(self):
        return []

    def read(self, name, rows=None):
        t = self.tensors[name]
        return t.clone() if rows is None or t.dim() == 0 else t[rows[0] : rows[1]].clone()


def dense_relex(
    base: torch.Tensor,
    checkpoints: list[torch.Tensor],
    steps: list[float],
    target: float,
    *,
    rank: int = 1,
    fit: str = "linear",
    degree: int = 2,
    window: int | None = None,
    scale: float = 1.0,
    mode: str = "extrapolate",
    base_step: float = 0.0,
) -> torch.Tensor:
    """Textbook RELEX: SVD of the stacked deltas, least squares of coefficients on steps."""
    m = torch.stack([(c.double() - base.double()).reshape(-1) for c in checkpoints])
    s = torch.tensor(steps, dtype=torch.float64)
    if window is not None:
        m, s = m[-window:], s[-window:]
    u, sigma, vh = torch.linalg.svd(m, full_matrices=False)
    coefficients = (u * sigma)[:, :rank]
    directions = vh[:rank]
    if mode == "reconstruct":
        k = s.tolist().index(float(target))
        delta = coefficients[k] @ directions
    else:
        def design(x):
            if fit == "linear_origin":
                return (x - base_step).unsqueeze(1)
            deg = 1 if fit == "linear" else degree
            return torch.stack([x**p for p in range(deg + 1)], dim=1)

        coef = torch.linalg.lstsq(design(s), coefficients).solution
        predicted = design(torch.tensor([float(target)], dtype=torch.float64)) @ coef
        delta = predicted[0] @ directions
    return (base.double().reshape(-1) + scale * delta).reshape(base.shape)


def run_cli(*args: str, cwd: Path | None = None):
    """Invoke the relex-merge CLI in-process; returns click's Result (stdout, stderr, exit_code)."""
    import os

    from relex_merge.cli import main

    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)

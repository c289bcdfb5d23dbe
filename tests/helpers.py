"""Shared test helpers: an in-memory checkpoint reader, the dense reference implementation of
RELEX (written independently of relex_merge.core.relex), and a CLI runner."""

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


def one_thread(function):
    """Run ``function`` with one torch thread: the reference's small SVDs and solves are 10-30x
    slower on two threads when the cores are busy (the whole suite calls it thousands of times)."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@one_thread
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


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, read with safetensors itself (not relex_merge's readers)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def relex_expectation(
    base: dict[str, torch.Tensor], checkpoints: list[dict[str, torch.Tensor]], steps, target, **params
) -> dict[str, torch.Tensor]:
    """dense_relex of every tensor (float64): what a relex merge of this window must write."""
    return {
        name: dense_relex(tensor, [c[name] for c in checkpoints], list(steps), target, **params)
        for name, tensor in base.items()
    }


def dense_task_arithmetic(base: torch.Tensor, models: list[torch.Tensor], weights: list[float],
                          normalize: bool = False) -> torch.Tensor:
    """Task arithmetic, densely: base + sum_i w_i (m_i - base) (divided by sum_i w_i when normalized)."""
    b = base.double()
    mixed = sum(w * (m.double() - b) for m, w in zip(models, weights))
    if normalize and abs(sum(weights)) >= 1e-8:
        mixed = mixed / sum(weights)
    return b + mixed


def dense_ties(base: torch.Tensor, models: list[torch.Tensor], weights: list[float], densities: list[float],
               normalize: bool = True) -> torch.Tensor:
    """TIES as mergekit 0.1.5 defines it, densely and in float64: each task vector keeps its
    int(density * numel) (at least 1) largest magnitudes; the weighted, trimmed vectors elect a
    sign per entry (the sign of their sum, + on a tie at 0); only entries whose sign agrees are
    summed (a trimmed zero agrees with nothing), and, normalized, divided by the summed weights
    of the agreeing entries (1 where none agree)."""
    b = base.double()
    weighted = []
    for m, w, density in zip(models, weights, densities):
        delta = (m.double() - b).reshape(-1)
        if density < 1:
            keep = torch.zeros_like(delta)
            keep[delta.abs().topk(max(1, int(density * delta.numel()))).indices] = 1.0
            delta = delta * keep
        weighted.append(w * delta)
    elected = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
    agree = [torch.sign(x) == elected for x in weighted]
    mixed = sum(x * a for x, a in zip(weighted, agree))
    if normalize:
        divisor = sum(w * a.double() for w, a in zip(weights, agree))
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    return (b.reshape(-1) + mixed).reshape(base.shape)


def float32_ulps(x: torch.Tensor) -> torch.Tensor:
    """The float32 ulp of each element of ``x`` (float64)."""
    a = x.float().abs()
    return (torch.nextafter(a, torch.tensor(float("inf"))) - a).double()


def assert_state_matches(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    *,
    rel: float = 1e-5,
    ulps: float = 4.0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """``actual`` holds exactly ``expected``'s tensors, in ``dtype``, and each equals its
    expectation. The error is measured against the displacement ||expected - base|| (the part a
    merge computes; the base alone would hide a wrong displacement): within ``rel`` of it, plus
    ``ulps`` float32 ulps of the values (root mean square), because the engine adds its weighted
    deltas onto the weights in float32, each addition rounding at the weights' ulp; where the
    displacement is a small fraction of the weights (a real RL run, a target inside the window)
    those roundings, not the math, set the error. A bfloat16 output must be within the rounding
    of the exact value to bfloat16 (half an ulp, 2^-8 relative, plus slack for the float32
    arithmetic before the cast)."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == dtype, (name, got.dtype)
        assert got.shape == want.shape, name
        want = want.double()
        displacement = (want - base[name].double()).norm()
        assert displacement > 0, f"{name}: the expectation does not move; nothing is tested"
        if dtype == torch.bfloat16:
            bound = 2.0**-8 * want.abs() * (1 + 1e-3) + 1e-6 * displacement / want.numel() ** 0.5
            excess = ((got.double() - want).abs() - bound).max()
            assert excess <= 0, f"{name}: off by more than a bfloat16 rounding ({excess:.2e} beyond)"
        else:
            err = (got.double() - want).norm()
            allowed = rel * displacement + ulps * float32_ulps(want).norm()
            assert err <= allowed, (
                f"{name}: error {float(err / displacement):.2e} of the displacement "
                f"(allowed {float(allowed / displacement):.2e})"
            )


def assert_relex_output(folder: Path, run: Path, steps, target, *, rel: float = 1e-5,
                        dtype: torch.dtype = torch.float32, **params) -> None:
    """The model in ``folder`` is dense_relex over ``run``'s base and checkpoint-<step> folders."""
    base = load_state(run / "base")
    checkpoints = [load_state(run / f"checkpoint-{s}") for s in steps]
    expected = relex_expectation(base, checkpoints, steps, target, **params)
    assert_state_matches(load_state(folder), expected, base, rel=rel, dtype=dtype)

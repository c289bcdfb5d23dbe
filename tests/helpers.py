"""Shared test helpers: an in-memory checkpoint reader, the dense reference implementation of
RELEX (written independently of relex_merge.core.relex), and a CLI runner."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from relex_merge.engine import EngineOptions, MergeJob, run_job
from relex_merge.io.base import CheckpointReader, TensorMeta

REPO = Path(__file__).resolve().parents[1]  # the repository root


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


def dense_task_arithmetic(
    base: torch.Tensor, models: list[torch.Tensor], weights: list[float], normalize: bool = False
) -> torch.Tensor:
    """Task arithmetic, densely: base + sum_i w_i (m_i - base) (divided by sum_i w_i when normalized)."""
    b = base.double()
    mixed = sum(w * (m.double() - b) for m, w in zip(models, weights))
    if normalize and abs(sum(weights)) >= 1e-8:
        mixed = mixed / sum(weights)
    return b + mixed


def dense_ties(
    base: torch.Tensor, models: list[torch.Tensor], weights: list[float], densities: list[float], normalize: bool = True
) -> torch.Tensor:
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


def assert_relex_output(
    folder: Path, run: Path, steps, target, *, rel: float = 1e-5, dtype: torch.dtype = torch.float32, **params
) -> None:
    """The model in ``folder`` is dense_relex over ``run``'s base and checkpoint-<step> folders."""
    base = load_state(run / "base")
    checkpoints = [load_state(run / f"checkpoint-{s}") for s in steps]
    expected = relex_expectation(base, checkpoints, steps, target, **params)
    assert_state_matches(load_state(folder), expected, base, rel=rel, dtype=dtype)


def write_config(path: Path, run: Path, steps, targets, **extra) -> Path:
    config = {
        "merge_method": "relex",
        "base_model": str(run / "base"),
        "models": [{"model": str(run / f"checkpoint-{s}"), "parameters": {"step": s}} for s in steps],
        "parameters": {"target_step": targets, **extra.pop("parameters", {})},
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def generate(folder: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer("12+34=", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    return tokenizer.decode(out[0])


def design(family: str, s: torch.Tensor, shape, s0: float) -> torch.Tensor:
    one = torch.ones_like(s)
    if family == "linear":
        return torch.stack([one, s], 1)
    if family == "linear_origin":
        return (s - s0).unsqueeze(1)
    if family == "polynomial":
        return torch.stack([s**k for k in range(int(shape) + 1)], 1)
    if family == "power":
        return torch.stack([one, (s - s0) ** shape], 1)
    if family == "log":
        return torch.stack([one, torch.log(s - s0 + shape)], 1)
    if family == "saturating":
        return torch.stack([one, 1 - torch.exp(-(s - s0) / shape)], 1)
    raise KeyError(family)


def fit_curve(family, steps, values, shape, s0):
    """Per-column curves fitted on (steps, values): callables x -> (len(x), r)."""
    s = torch.tensor(steps, dtype=torch.float64)
    if family == "sine":
        cols = [sine_fit(s.numpy(), values[:, i].numpy()) for i in range(values.shape[1])]
        return lambda x: torch.tensor(np.stack([c(x) for c in cols], 1))
    if family == "polynomial":  # numpy's polyfit: a route of its own
        cols = [np.polyfit(s.numpy(), values[:, i].numpy(), int(shape)) for i in range(values.shape[1])]
        return lambda x: torch.tensor(np.stack([np.polyval(c, np.asarray(x, float)) for c in cols], 1))
    coef = torch.linalg.lstsq(design(family, s, shape, s0), values, driver="gelsd").solution
    return lambda x: design(family, torch.as_tensor(x, dtype=torch.float64), shape, s0) @ coef


def dense_direct(base, checkpoints, steps, target, family, shape):
    """The direct families written out on whole tensors: two-point extrapolation through the
    first and last checkpoints, the mean of the last ``shape`` ones, or their exponential average."""
    thetas = [c.double() for c in checkpoints]
    if family == "expo":
        h = (target - steps[-1]) / (steps[-1] - steps[0])
        return thetas[-1] + shape * h * (thetas[-1] - thetas[0])
    if family == "average":
        last = thetas[-min(int(shape), len(thetas)) :]
        return sum(last) / len(last)
    if family == "ema":
        weights = [0.5 ** ((steps[-1] - s) / shape) for s in steps]
        return sum(w * t for w, t in zip(weights, thetas)) / sum(weights)
    raise KeyError(family)


def dense_family(base, checkpoints, steps, targets, family, shape=None, rank=1, s0=0.0):
    if family in ("expo", "average", "ema"):
        return [dense_direct(base, checkpoints, steps, t, family, shape) for t in targets]
    coefficients, directions = dense_svd(base, checkpoints, rank)
    predicted = fit_curve(family, steps, coefficients, shape, s0)(targets)
    return [(base.double().reshape(-1) + predicted[j] @ directions).reshape(base.shape) for j in range(len(targets))]


def dense_refit(steps, coefficients, target, family, shape, every, keep, s0=0.0):
    """The loop itself on coefficients (T x r): the predicted coefficients at ``target``."""
    gap = steps[1] - steps[0]
    xs, buf = deque(steps, maxlen=keep), deque(list(coefficients), maxlen=keep)
    s = steps[-1]
    while True:
        curve = fit_curve(family, list(xs), torch.stack(list(buf)), shape, s0)
        if target <= s + every * gap:
            return curve([target])[0]
        for k in range(1, every + 1):
            xs.append(s + k * gap)
            buf.append(curve([s + k * gap])[0])
        s += every * gap


class CollectSink:
    """Collects the spans the engine writes (from several threads, in any order)."""

    def __init__(self):
        self.chunks: dict[str, list[tuple[int, torch.Tensor]]] = {}

    def write_at(self, name, start, chunk):
        self.chunks.setdefault(name, []).append((start, chunk.clone().reshape(-1)))

    def tensor(self, name):
        spans = sorted(self.chunks[name], key=lambda span: span[0])
        position = 0
        for start, chunk in spans:  # the spans tile the tensor exactly
            assert start == position
            position += chunk.numel()
        return torch.cat([chunk for _, chunk in spans])


def engine_outputs(base, checkpoints, steps, targets, spec, max_memory=1 << 30, threads=2):
    job = MergeJob(
        base=DictReader(base),
        checkpoints=[DictReader(c) for c in checkpoints],
        steps=steps,
        targets=targets,
        spec=spec,
    )
    sinks = [CollectSink() for _ in targets]
    stats = run_job(job, sinks, EngineOptions(max_memory=max_memory, threads=threads))
    return sinks, stats


def random_window(n_ckpt=6, shapes=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (24, 16), "b": (24,), "e": (40, 8)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    checkpoints = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(n_ckpt)]
    return base, checkpoints


def assert_close(actual, expected, rel=1e-5):
    err = (actual.double() - expected.double()).norm() / expected.double().norm()
    assert err < rel, f"relative error {err:.2e}"


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def sine_fit(t: np.ndarray, y: np.ndarray):
    """The reference scripts' fit_sin_fft: curve_fit from an FFT initial guess."""
    from scipy.optimize import curve_fit

    def f(x, a, freq, phi, c):
        return a * np.sin(2 * np.pi * freq * x + phi) + c

    guess_c = y.mean()
    spectrum = np.fft.rfft(y - guess_c)
    freqs = np.fft.rfftfreq(len(t), d=t[1] - t[0])
    guess_f = freqs[np.argmax(np.abs(spectrum[1:])) + 1]
    popt, _ = curve_fit(f, t, y, p0=[3 * y.std() / 2**0.5, guess_f, 0.0, guess_c], maxfev=10000)
    return lambda x: f(np.asarray(x, dtype=np.float64), *popt)


def dense_svd(base, checkpoints, rank):
    m = torch.stack([(c.double() - base.double()).reshape(-1) for c in checkpoints])
    u, sigma, vh = torch.linalg.svd(m, full_matrices=False)
    return (u * sigma)[:, :rank], vh[:rank]

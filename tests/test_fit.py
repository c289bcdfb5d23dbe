"""The RELEX math: planted trajectories and equality with a dense SVD reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from relex_merge.engine import EngineOptions, MergeJob, run_job
from relex_merge.core.relex import FitSpec, RelexSpec, predict_coefficients, top_components
from relex_merge.core.kernels import Scratch, span_gram
from tests.helpers import DictReader, dense_relex


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
    checkpoints = [
        {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(n_ckpt)
    ]
    return base, checkpoints


def assert_close(actual, expected, rel=1e-5):
    err = (actual.double() - expected.double()).norm() / expected.double().norm()
    assert err < rel, f"relative error {err:.2e}"


@pytest.mark.parametrize(
    "steps",
    [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 4, 7, 11, 16], [10, 20, 25, 60]],
    ids=["even", "uneven", "gappy"],
)
def test_planted_linear_trajectory_is_predicted_far_ahead(steps):
    gen = torch.Generator().manual_seed(1)
    d = 4000
    base = torch.randn(d, generator=gen)
    v = torch.randn(d, generator=gen)
    v /= v.norm()
    a, b, noise = 0.5, 0.3, 1e-3

    def truth(s):
        return base + (a * s + b) * v

    checkpoints = [{"x": truth(s) + noise * torch.randn(d, generator=gen)} for s in steps]
    target = 10 * steps[-1]
    sinks, _ = engine_outputs({"x": base}, checkpoints, steps, [target], RelexSpec())
    predicted = sinks[0].tensor("x")
    displacement = truth(target) - base
    err = (predicted - truth(target)).norm() / displacement.norm()
    # The direction estimate is off by about |noise| / ||M||_F radians; extrapolating the
    # fitted coefficient keeps that relative error. Allow 2x.
    signal = sum((a * s + b) ** 2 for s in steps) ** 0.5
    assert err < 2 * noise * d**0.5 / signal
    assert err < 0.02


CASES = [
    dict(rank=1, fit="linear"),
    dict(rank=3, fit="linear"),
    dict(rank=1, fit="linear_origin"),
    dict(rank=3, fit="linear_origin", base_step=0.0),
    dict(rank=1, fit="polynomial", degree=2),
    dict(rank=3, fit="polynomial", degree=3),
    dict(rank=1, fit="linear", window=4),
    dict(rank=3, fit="linear", window=4, scale=0.5),
    dict(rank=1, fit="linear", scale=1.7),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_engine_equals_dense_reference(case):
    base, checkpoints = random_window(n_ckpt=6)
    steps = [3, 5, 6, 9, 12, 14]
    targets = [30, 50, 100]
    spec = RelexSpec(
        rank=case["rank"],
        fit=FitSpec(case["fit"], case.get("degree", 2) if case["fit"] == "polynomial" else None, case.get("base_step", 0.0)),
        window=case.get("window"),
        scale=case.get("scale", 1.0),
    )
    sinks, _ = engine_outputs(base, checkpoints, steps, targets, spec)
    for j, target in enumerate(targets):
        for name in base:
            expected = dense_relex(
                base[name], [c[name] for c in checkpoints], steps, target, **case
            )
            assert_close(sinks[j].tensor(name), expected.reshape(-1))


@pytest.mark.parametrize("rank", [1, 3])
def test_reconstruct_mode_equals_dense_reference(rank):
    base, checkpoints = random_window(n_ckpt=5, seed=3)
    steps = [2, 4, 6, 8, 10]
    targets = [4, 10]
    spec = RelexSpec(rank=rank, mode="reconstruct")
    sinks, _ = engine_outputs(base, checkpoints, steps, targets, spec)
    for j, target in enumerate(targets):
        for name in base:
            expected = dense_relex(
                base[name], [c[name] for c in checkpoints], steps, target, rank=rank, mode="reconstruct"
            )
            assert_close(sinks[j].tensor(name), expected.reshape(-1))


def test_reconstruct_with_full_rank_returns_the_observed_checkpoint():
    base, checkpoints = random_window(n_ckpt=4, seed=5)
    spec = RelexSpec(rank=4, mode="reconstruct")
    sinks, _ = engine_outputs(base, checkpoints, [1, 2, 3, 4], [3], spec)
    assert_close(sinks[0].tensor("w"), checkpoints[2]["w"].reshape(-1))


@pytest.mark.parametrize("rank,spec_kw", list(itertools.product([1, 3], [{}, {"window": 3}])))
def test_chunked_equals_unchunked(rank, spec_kw):
    base, checkpoints = random_window(n_ckpt=5, shapes={"big": (64, 32), "vec": (300,)}, seed=7)
    spec = RelexSpec(rank=rank, **spec_kw)
    steps, targets = [1, 2, 3, 5, 8], [20, 40]
    whole, whole_stats = engine_outputs(base, checkpoints, steps, targets, spec)
    # 2 KB cannot hold 5+1 copies of even one row of "big": one row per span, on two workers
    chunked, chunked_stats = engine_outputs(base, checkpoints, steps, targets, spec, max_memory=2048)
    assert all(len(c) == 1 for c in whole[0].chunks.values())
    assert len(chunked[0].chunks["big"]) == 64
    assert all(r.passes == 2 for r in whole_stats.tensors + chunked_stats.tensors)
    for j in range(len(targets)):
        for name in base:
            assert_close(chunked[j].tensor(name), whole[j].tensor(name))


def test_zero_deltas_copy_the_base_and_integers_are_copied():
    base = {"w": torch.randn(5, 3), "ids": torch.arange(7)}
    checkpoints = [{"w": base["w"].clone(), "ids": base["ids"] + 1} for _ in range(3)]
    sinks, stats = engine_outputs(base, checkpoints, [1, 2, 3], [10], RelexSpec())
    assert torch.equal(sinks[0].tensor("w"), base["w"].reshape(-1))
    assert torch.equal(sinks[0].tensor("ids"), base["ids"])
    reports = {r.name: r for r in stats.tensors}
    assert reports["w"].zero_delta and reports["ids"].diagnostics is None


def test_gram_accumulates_in_float64_across_blocks():
    """An RL-like window: weights near 1, deltas a thousand times smaller along one direction
    plus a little noise, over 8192 blocks of 8 columns. Each block's product is taken in float32;
    summed across blocks in float32 the Gram matrix misses the dense float64 one by ~1e-6 and its
    small eigenvalues (what rank > 1 and the diagnostics see) by ~1e-3; summed in float64 it
    keeps ~1e-9 and ~1e-6."""
    gen = torch.Generator().manual_seed(0)
    n, columns, steps = 1 << 16, 8, [1, 2, 3, 4]
    base = 1.0 + torch.randn(n, generator=gen)
    v = torch.randn(n, generator=gen)
    v *= n**0.5 / v.norm()
    inputs = [base] + [base + 1e-3 * s * v + 1e-4 * torch.randn(n, generator=gen) for s in steps]
    m = torch.stack([x.double() - base.double() for x in inputs[1:]])
    dense = m @ m.T
    gram = span_gram(inputs, Scratch.allocate(4, 1, columns, torch.float32, torch.device("cpu")), columns)
    assert float((gram.double() - dense).norm() / dense.norm()) < 2e-8
    eig, dense_eig = torch.linalg.eigvalsh(gram.double()), torch.linalg.eigvalsh(dense)
    assert dense_eig[0] < 1e-3 * dense_eig[-1]  # three small eigenvalues: noise next to the trajectory
    assert float(((eig - dense_eig) / dense_eig).abs().max()) < 5e-5
    assert gram.dtype == torch.float64


def test_small_components_are_dropped():
    v = torch.randn(100, dtype=torch.float64)
    m = torch.stack([v * k for k in (1.0, 2.0, 3.0)])
    sigma, u = top_components(m @ m.T, rank=3)
    assert sigma.numel() == 1


def test_fit_uses_step_values_not_positions():
    steps = [1.0, 2.0, 4.0, 8.0]
    x = torch.tensor(steps, dtype=torch.float64)
    values = (3.0 * x + 1.0).unsqueeze(1)
    pred = predict_coefficients(steps, values, [16.0], RelexSpec(fit=FitSpec("linear")))
    assert pred.item() == pytest.approx(49.0)
    pred0 = predict_coefficients(steps, 2.0 * x.unsqueeze(1), [10.0], RelexSpec(fit=FitSpec("linear_origin")))
    assert pred0.item() == pytest.approx(20.0)


def test_mixed_input_dtypes_with_odd_sizes(tmp_path):
    """A bf16 base with fp32 checkpoints (odd element counts): reads land on aligned buffers."""
    from safetensors.torch import save_file

    from relex_merge.io.formats.safetensors import SafetensorsReader

    gen = torch.Generator().manual_seed(0)
    base = {"odd": torch.randn(7, 3, generator=gen).to(torch.bfloat16), "v": torch.randn(5, generator=gen).bfloat16()}
    save_file(base, tmp_path / "base.safetensors")
    checkpoints = []
    for k in range(3):
        state = {n: t.float() + 0.01 * (k + 1) * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        save_file(state, tmp_path / f"c{k}.safetensors")
        checkpoints.append(SafetensorsReader(tmp_path / f"c{k}.safetensors"))
    job = MergeJob(SafetensorsReader(tmp_path / "base.safetensors"), checkpoints, [1, 2, 3], [6], RelexSpec())
    sinks = [CollectSink()]
    run_job(job, sinks, EngineOptions(max_memory=1 << 20))
    for name, t in base.items():
        expected = dense_relex(t.float(), [c.read(name) for c in checkpoints], [1, 2, 3], 6)
        assert_close(sinks[0].tensor(name).float(), expected.reshape(-1), rel=1e-2)  # output in base's bf16

#!/usr/bin/env python
"""What same-bytes-by-construction costs (issue 23): the engine's deterministic kernels against
the free-order kernels they replaced (one BLAS call per block on every thread, fp32 Gram per
block, outputs by one GEMM), on the same in-memory window, with the engine's worker threads.

    python bench/determinism_cost.py                        # 130M-like tensors, T = 8 and 30
    python bench/determinism_cost.py --windows 8 --reps 5 --out bench/results/determinism-cost.md

In memory, so this is the compute-bound case (a warm page cache): the cost measured here is an
upper bound on the cost in a merge, whose wall time also holds reading and writing. Each variant
runs ``--reps`` times; the table gives the median. The free-order kernels are copied here from
the code before the change (git e2e9f36^); they are not in the package.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relex_merge.core import kernels  # noqa: E402

# a 130M-parameter decoder's matrices per layer (hidden 768, MLP 3072), 12 layers, plus embeddings
LAYER = [(768, 768)] * 4 + [(3072, 768), (3072, 768), (768, 3072)]


def _shapes(n_checkpoints: int, memory: int) -> list[tuple[int, int]]:
    """The embeddings and as many of the 12 layers as fit ``memory`` bytes for T + 1 copies
    (at least one layer)."""
    shapes = [(50304, 768)]
    for layer in range(12):
        more = shapes + LAYER
        if layer and sum(a * b for a, b in more) * 4 * (n_checkpoints + 1) > memory:
            break
        shapes = more
    return shapes


def _window(shapes, n_checkpoints: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per tensor: [base, checkpoint 1..T], flat fp32, base + a random walk (RL-like small deltas)."""
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in shapes:
        base = torch.randn(shape, generator=g).flatten()
        step = 1e-3 * torch.randn(base.numel(), generator=g)
        tensors.append(
            [base]
            + [base + (k + 1) * step + 1e-4 * torch.randn(base.numel(), generator=g) for k in range(n_checkpoints)]
        )
    return tensors


def _free_gram(inputs, scratch) -> torch.Tensor:
    n, width = inputs[0].numel(), scratch.columns
    gram = torch.zeros(scratch.deltas.shape[0], scratch.deltas.shape[0], dtype=torch.float64)
    for lo in range(0, n, width):
        _, deltas = kernels.block_deltas(inputs, lo, min(n, lo + width), scratch)
        gram += (deltas @ deltas.T).to(torch.float64)
    return gram


def _free_outputs(inputs, weights, scratch, out) -> None:
    n, width = inputs[0].numel(), scratch.columns
    w = weights.to(scratch.deltas.dtype)
    for lo in range(0, n, width):
        hi = min(n, lo + width)
        base, deltas = kernels.block_deltas(inputs, lo, hi, scratch)
        block = scratch.products[: w.shape[0], : hi - lo]
        torch.addmm(base.unsqueeze(0).expand_as(block), w, deltas, out=block)
        out[:, lo:hi].copy_(block)


def _det_gram(inputs, scratch) -> torch.Tensor:
    shape = (inputs[0].numel(),)
    return kernels.fold_grams(kernels.span_gram(inputs, scratch, kernels.gram_chunk(shape)))


def _det_outputs(inputs, weights, scratch, out) -> None:
    kernels.span_outputs(inputs, weights, scratch, out)


def _run(tensors, gram_fn, out_fn, workers: int) -> tuple[float, float]:
    """(seconds for every tensor's Gram, seconds for every tensor's output), ``workers`` threads."""
    t = len(tensors[0]) - 1
    columns = kernels.block_columns(t, torch.float32)
    scratches = [kernels.Scratch.allocate(t, columns, torch.float32, torch.device("cpu")) for _ in range(workers)]
    weights = torch.linspace(-0.5, 1.5, t, dtype=torch.float64).unsqueeze(0)
    outs = [torch.empty(1, x[0].numel()) for x in tensors]

    def split(fn):
        def work(i):
            for j in range(i, len(tensors), workers):
                fn(j, scratches[i])

        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(workers)))
        return time.perf_counter() - start

    gram = split(lambda j, s: gram_fn(tensors[j], s))
    emit = split(lambda j, s: out_fn(tensors[j], weights, s, outs[j]))
    return gram, emit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 30], help="window lengths T")
    parser.add_argument("--memory", type=float, default=6.0, help="GB the window may take (fewer layers if needed)")
    parser.add_argument("--workers", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    lines = [
        f"Determinism cost, in memory (a 130M-like decoder's embeddings and hidden-768 layers, fp32, "
        f"{args.workers} worker threads, torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; median of {args.reps}):",
        "",
        "| T | parameters | Gram, free / fixed (s) | outputs, free / fixed (s) | total, free / fixed (s) | cost |",
        "|---|---|---|---|---|---|",
    ]
    shapes = _shapes(max(args.windows), int(args.memory * 1e9))  # one model for every T: rows compare
    for t in args.windows:
        tensors = _window(shapes, t)
        params = sum(a * b for a, b in shapes) / 1e6
        free, det = [], []
        for _ in range(args.reps):  # interleaved, so drift in the machine's load hits both alike
            free.append(_run(tensors, _free_gram, _free_outputs, args.workers))
            det.append(_run(tensors, _det_gram, _det_outputs, args.workers))
        fg, fo = (statistics.median(x[i] for x in free) for i in (0, 1))
        dg, do = (statistics.median(x[i] for x in det) for i in (0, 1))
        cost = (dg + do) / (fg + fo) - 1
        lines.append(
            f"| {t} | {params:.0f}M | {fg:.2f} / {dg:.2f} | {fo:.2f} / {do:.2f} "
            f"| {fg + fo:.2f} / {dg + do:.2f} | {cost:+.1%} |"
        )
        del tensors
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(f"`python bench/determinism_cost.py {' '.join(argv or sys.argv[1:])}`\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

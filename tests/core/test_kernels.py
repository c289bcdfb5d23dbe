"""relex_merge.core.kernels against dense float64 math written here: the block size contract, a
float64 compute dtype kept float64 throughout, and more outputs than checkpoints. Found by
mutation testing (scripts/mutation.py)."""

from __future__ import annotations

import torch

from relex_merge.core.kernels import BLOCK_BYTES, MAX_BLOCK, MIN_BLOCK, Scratch, block_columns, span_gram, span_outputs

CPU = torch.device("cpu")


def test_cpu_blocks_are_cache_sized_and_an_accelerator_takes_whole_spans():
    for t in (1, 4, 20, 100):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            columns = block_columns(t, dtype, CPU)
            assert MIN_BLOCK <= columns <= MAX_BLOCK
            # a block's deltas (t x columns) fit in BLOCK_BYTES unless that is under MIN_BLOCK columns
            assert columns * t * dtype.itemsize <= BLOCK_BYTES or columns == MIN_BLOCK
            assert columns == MAX_BLOCK or (columns + 1) * t * dtype.itemsize > BLOCK_BYTES
    assert block_columns(4, torch.float32, torch.device("cuda")) >= 1 << 40  # no device is touched


def test_float64_compute_is_float64_throughout():
    """dtype: float64 (the cure for deltas that overflow float32): the Gram matrix and the outputs
    equal the dense float64 math to rounding, far below float32's 1e-7."""
    gen = torch.Generator().manual_seed(0)
    n = 3000
    base = 1.0 + torch.randn(n, generator=gen, dtype=torch.float64)
    inputs = [base] + [base + 1e-3 * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(3)]
    deltas = torch.stack([x - base for x in inputs[1:]])
    scratch = Scratch.allocate(3, 2, 1024, torch.float64, CPU)
    gram = span_gram(inputs, scratch, 1024)
    assert float((gram - deltas @ deltas.T).abs().max() / (deltas @ deltas.T).abs().max()) < 1e-13
    weights = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -3.0]], dtype=torch.float64)
    out = torch.empty(2, n, dtype=torch.float64)
    span_outputs(inputs, weights, scratch, 1024, out)
    assert float((out - (base + weights @ deltas)).abs().max()) < 1e-14


def test_more_outputs_than_checkpoints():
    """A sweep writes many targets from a short window: 5 outputs of 2 checkpoints."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(700, generator=gen)
    inputs = [base] + [base + 0.1 * torch.randn(700, generator=gen) for _ in range(2)]
    deltas = torch.stack([x.double() - base.double() for x in inputs[1:]])
    weights = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    scratch = Scratch.allocate(2, 5, 256, torch.float32, CPU)
    out = torch.empty(5, 700, dtype=torch.float32)
    span_outputs(inputs, weights, scratch, 256, out)
    assert torch.allclose(out.double(), base.double() + weights @ deltas, atol=1e-5)


def test_buffers_and_products_stay_on_the_compute_device():
    """On an accelerator the scratch buffers, the Gram matrix and the weights live on the device;
    the meta device stands in for one (shapes and devices, no data)."""
    meta = torch.device("meta")
    scratch = Scratch.allocate(3, 2, 64, torch.float32, meta)
    assert [t.device.type for t in (scratch.base, scratch.deltas, scratch.outputs)] == ["meta"] * 3
    inputs = [torch.empty(100, dtype=torch.bfloat16, device=meta) for _ in range(4)]
    gram = span_gram(inputs, scratch, 64)
    assert gram.device.type == "meta" and gram.dtype == torch.float64 and gram.shape == (3, 3)
    out = torch.empty(2, 100, dtype=torch.bfloat16, device=meta)
    span_outputs(inputs, torch.ones(2, 3, dtype=torch.float64), scratch, 64, out)  # weights from the CPU

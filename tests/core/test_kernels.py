"""relex_merge.core.kernels against dense float64 math written here: the block and chunk contracts,
a float64 compute dtype kept float64 throughout, more outputs than checkpoints, and results fixed
by the data's shape alone (issue 23): the same bits whatever the thread count, the calling thread,
the inputs' alignment and how a tensor is cut into spans."""

from __future__ import annotations

import threading

import pytest
import torch

from relex_merge.core.kernels import (
    BLOCK_BYTES,
    CHUNK_ELEMENTS,
    MAX_BLOCK,
    MIN_BLOCK,
    Scratch,
    block_columns,
    fold_grams,
    gram_chunk,
    gram_chunk_rows,
    one_thread,
    span_gram,
    span_outputs,
    tree_sum_rows,
)

CPU = torch.device("cpu")


def test_blocks_are_cache_sized_64_byte_multiples_fixed_by_t_and_dtype():
    for t in (1, 4, 20, 100):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            columns = block_columns(t, dtype)
            assert MIN_BLOCK <= columns <= MAX_BLOCK and columns % 16 == 0
            # a block's deltas (t x columns) fit in BLOCK_BYTES unless that is under MIN_BLOCK columns
            assert columns * t * dtype.itemsize <= BLOCK_BYTES or columns == MIN_BLOCK
            assert columns == MAX_BLOCK or (columns + 16) * t * dtype.itemsize > BLOCK_BYTES
    assert block_columns(30, torch.float32) == 34944  # 4 MiB / 120 bytes, down to a multiple of 16


def test_gram_chunks_are_whole_rows_of_about_chunk_elements():
    assert gram_chunk_rows((1536, 768)) == CHUNK_ELEMENTS // 768 == 341
    assert gram_chunk((1536, 768)) == 341 * 768
    assert gram_chunk_rows((3, 300_000)) == 1 and gram_chunk((3, 300_000)) == 300_000  # a long row is a chunk
    assert gram_chunk((300_001,)) == CHUNK_ELEMENTS  # 1-D: rows of one element
    assert gram_chunk((10,)) == 10 and gram_chunk((4, 2, 8)) == 64  # small tensors: one chunk
    assert gram_chunk(()) == 1  # a scalar


def test_float64_compute_is_float64_throughout():
    """dtype: float64 (the cure for deltas that overflow float32): the Gram matrix and the outputs
    equal the dense float64 math to rounding, far below float32's 1e-7."""
    gen = torch.Generator().manual_seed(0)
    n = 3000
    base = 1.0 + torch.randn(n, generator=gen, dtype=torch.float64)
    inputs = [base] + [base + 1e-3 * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(3)]
    deltas = torch.stack([x - base for x in inputs[1:]])
    scratch = Scratch.allocate(3, 1024, torch.float64, CPU)
    gram = fold_grams(span_gram(inputs, scratch, 1500))
    assert float((gram - deltas @ deltas.T).abs().max() / (deltas @ deltas.T).abs().max()) < 1e-13
    weights = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -3.0]], dtype=torch.float64)
    out = torch.empty(2, n, dtype=torch.float64)
    span_outputs(inputs, weights, scratch, out)
    assert float((out - (base + weights @ deltas)).abs().max()) < 1e-14


def test_more_outputs_than_checkpoints():
    """A sweep writes many targets from a short window: 5 outputs of 2 checkpoints."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(700, generator=gen)
    inputs = [base] + [base + 0.1 * torch.randn(700, generator=gen) for _ in range(2)]
    deltas = torch.stack([x.double() - base.double() for x in inputs[1:]])
    weights = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    scratch = Scratch.allocate(2, 256, torch.float32, CPU)
    out = torch.empty(5, 700, dtype=torch.float32)
    span_outputs(inputs, weights, scratch, out)
    assert torch.allclose(out.double(), base.double() + weights @ deltas, atol=1e-5)


def test_buffers_and_products_stay_on_the_compute_device():
    """On an accelerator the scratch buffers, the Gram matrices and the weights live on the
    device; the meta device stands in for one (shapes and devices, no data)."""
    meta = torch.device("meta")
    scratch = Scratch.allocate(3, 64, torch.float32, meta)
    assert [t.device.type for t in (scratch.base, scratch.deltas, scratch.products, scratch.gram)] == ["meta"] * 4
    inputs = [torch.empty(100, dtype=torch.bfloat16, device=meta) for _ in range(4)]
    grams = span_gram(inputs, scratch, 64)
    assert grams.device.type == "meta" and grams.dtype == torch.float64 and grams.shape == (2, 3, 3)
    out = torch.empty(2, 100, dtype=torch.bfloat16, device=meta)
    span_outputs(inputs, torch.ones(2, 3, dtype=torch.float64), scratch, out)  # weights from the CPU


def test_tree_sum_is_the_pairwise_tree_fixed_by_the_row_count():
    """m=5, h=2: rows 0,1 += rows 3,4 (1e8 + 1 rounds to 1e8 in float32; -1e8 + 0.5 to -1e8);
    m=3, h=1: row 0 += row 2 (1e8 + 1 = 1e8); m=2: row 0 += row 1 = 0. Left to right: 2.5."""
    x = torch.tensor([[1e8], [-1e8], [1.0], [1.0], [0.5]], dtype=torch.float32)
    left_to_right = torch.zeros(1)
    for row in x:
        left_to_right += row
    assert float(left_to_right) == 2.5
    total = tree_sum_rows(x)
    assert float(total) == 0.0 and total.data_ptr() == x.data_ptr()  # in place, row 0


def _window(t, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen)
    v = torch.randn(n, generator=gen) * 1e-3
    return [base.to(dtype)] + [(base + (k + 1) * v + 1e-4 * torch.randn(n, generator=gen)).to(dtype) for k in range(t)]


def _placed(x, offset):
    """A copy of x ``offset`` elements past an aligned allocation (a mapped file's tensors start anywhere)."""
    buffer = torch.empty(x.numel() + offset, dtype=x.dtype)
    view = buffer[offset:]
    view.copy_(x)
    return view


def _gram_by_spans(inputs, chunk, chunks_per_span, order, offset=0):
    n = inputs[0].numel()
    bounds = [*range(0, n, chunk * chunks_per_span), n]
    spans = list(zip(bounds[:-1], bounds[1:]))
    scratch = Scratch.allocate(len(inputs) - 1, block_columns(len(inputs) - 1, torch.float32), torch.float32, CPU)
    results = {}
    for i in order(range(len(spans))):
        lo, hi = spans[i]
        results[i] = span_gram([_placed(x[lo:hi], offset) for x in inputs], scratch, chunk)
    total = torch.zeros(len(inputs) - 1, len(inputs) - 1, dtype=torch.float64)
    for i in range(len(spans)):
        fold_grams(results[i], total)
    return total


def _in_thread(function):
    box = []
    worker = threading.Thread(target=lambda: box.append(function()))
    worker.start()
    worker.join()
    return box[0]


@pytest.mark.parametrize("t,dtype", [(8, torch.float32), (30, torch.bfloat16)])
def test_gram_bits_do_not_depend_on_spans_order_alignment_or_threads(t, dtype):
    shape = (600, 768)  # 460,800 elements: chunks of 85 rows, blocks of MKL-splittable size
    inputs = [x.reshape(-1) for x in _window(t, 600 * 768, dtype)]
    chunk = gram_chunk(shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        reference = _gram_by_spans(inputs, chunk, 10**6, list)
        variants = {
            "one thread": lambda: (torch.set_num_threads(1), _gram_by_spans(inputs, chunk, 10**6, list))[1],
            "a fresh thread": lambda: _in_thread(lambda: _gram_by_spans(inputs, chunk, 10**6, list)),
            "spans of 1 chunk, reversed": lambda: _gram_by_spans(inputs, chunk, 1, lambda r: list(r)[::-1]),
            "spans of 3 chunks": lambda: _gram_by_spans(inputs, chunk, 3, list),
            "inputs 1 element off": lambda: _gram_by_spans(inputs, chunk, 2, list, offset=1),
            "inputs 3 elements off": lambda: _gram_by_spans(inputs, chunk, 2, list, offset=3),
        }
        differ = [name for name, run in variants.items() if not torch.equal(run(), reference)]
    finally:
        torch.set_num_threads(threads)
    assert differ == []
    deltas = torch.stack([x.double() - inputs[0].double() for x in inputs[1:]])
    assert torch.allclose(reference, deltas @ deltas.T, rtol=1e-4)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_outputs_are_the_elementwise_tree_whatever_blocks_spans_alignment_or_threads(out_dtype):
    """base + ((w0 d0 + w2 d2) + w1 d1) for T = 3, each step one float32 rounding, one rounding to
    the output dtype: computed here on the whole tensor, it must match bit for bit."""
    n = 200_003
    inputs = _window(3, n, torch.float32, seed=2)
    weights = torch.tensor([[0.3, -1.7, 2.1], [1.0, 0.0, -0.5]], dtype=torch.float64)
    w = weights.float()
    d = [x - inputs[0] for x in inputs[1:]]
    expected = torch.stack(
        [(inputs[0] + ((w[j, 0] * d[0] + w[j, 2] * d[2]) + w[j, 1] * d[1])).to(out_dtype) for j in range(2)]
    )

    def run(columns, span, offset=0):
        out = torch.empty(2, n, dtype=out_dtype)
        scratch = Scratch.allocate(3, columns, torch.float32, CPU)
        for lo in range(0, n, span):
            hi = min(n, lo + span)
            span_outputs([_placed(x[lo:hi], offset) for x in inputs], weights, scratch, out[:, lo:hi])
        return out

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        results = {"one span": run(block_columns(3, torch.float32), n), "blocks of 7 elements": run(7, 7001)}
        results["a fresh thread, spans of 777, 1 element off"] = _in_thread(lambda: run(4096, 777, offset=1))
        with one_thread():
            results["one thread"] = run(block_columns(3, torch.float32), 50_000)
    finally:
        torch.set_num_threads(threads)
    assert [name for name, out in results.items() if not torch.equal(out, expected)] == []


@pytest.mark.parametrize("first", [1, 4, 7])
def test_new_rows_only_equal_the_rows_of_a_full_pass(first):
    """watch adds a checkpoint's row to a known Gram block (``first``): the rows from ``first`` on,
    and their mirror, are the full pass's to the bit; the known block is left zero."""
    t, shape = 8, (300, 512)
    inputs = [x.reshape(-1) for x in _window(t, 300 * 512, torch.float32)]
    chunk = gram_chunk(shape)
    scratch = Scratch.allocate(t, block_columns(t, torch.float32), torch.float32, CPU)
    full = fold_grams(span_gram(inputs, scratch, chunk))
    rows = fold_grams(span_gram(inputs, scratch, chunk, first))
    assert torch.equal(rows[first:], full[first:]) and torch.equal(rows[:, first:], full[:, first:])
    assert torch.equal(rows[:first, :first], torch.zeros(first, first, dtype=torch.float64))

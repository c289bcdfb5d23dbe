"""The engine's span and row bookkeeping and its Gram summation, against values worked out by
hand here: which rows each span covers, where it starts, and the order partial Gram matrices
are added in. Found by mutation testing (scripts/mutation.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from relex_merge.core import kernels
from relex_merge.core.relex import RelexSpec
from relex_merge.engine import EngineOptions, MergeJob
from relex_merge.engine.tasks import SPAN_BYTES, _TensorState, chunk_rows, row_ranges
from relex_merge.engine.tasks import plan_spans as _spans
from relex_merge.io.base import CheckpointReader, TensorMeta


@pytest.fixture(autouse=True)
def row_chunks(monkeypatch):
    """Gram chunks of one row, so that spans of a few rows show the budget's arithmetic (the real
    chunks are about 64 Ki elements: test_spans_are_whole_gram_chunks)."""
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1)


class MetaReader(CheckpointReader):
    """Shapes and dtypes only: _spans never reads data."""

    def __init__(self, metas: dict[str, TensorMeta]):
        self.metas = metas
        self.path = Path("<meta>")

    def names(self):
        return list(self.metas)

    def meta(self, name):
        return self.metas[name]

    def files(self):
        return []

    def read(self, name, rows=None):
        raise AssertionError("no data is read")


def job(
    shapes: dict[str, tuple],
    base_dtype=torch.float32,
    ckpt_dtype=torch.bfloat16,
    n_ckpt=3,
    targets=(20, 30),
    out_dtype=None,
    compute=torch.float32,
):
    base = MetaReader({n: TensorMeta(s, base_dtype) for n, s in shapes.items()})
    ckpts = [MetaReader({n: TensorMeta(s, ckpt_dtype) for n, s in shapes.items()}) for _ in range(n_ckpt)]
    return MergeJob(
        base, ckpts, list(range(1, n_ckpt + 1)), list(targets), RelexSpec(), compute_dtype=compute, out_dtype=out_dtype
    )


def test_row_ranges_tile_the_rows():
    assert row_ranges(10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert row_ranges(4, 4) == [(0, 4)]
    assert row_ranges(4, 9) == [(0, 4)]
    assert row_ranges(1, 1) == [(0, 1)]
    assert row_ranges(0, 5) == [(0, 0)]  # an empty tensor is still one (empty) span


def test_chunk_rows_fit_the_budget_at_least_one_at_most_all():
    meta = TensorMeta((100, 8), torch.float32)  # a row: 8 elements
    assert chunk_rows(meta, 4, 100) == 3  # 32-byte rows in 100 bytes
    assert chunk_rows(meta, 6, 100) == 2  # 48-byte rows
    assert chunk_rows(meta, 4, 96) == 3 and chunk_rows(meta, 4, 95) == 2
    assert chunk_rows(meta, 4, 10) == 1  # a row over budget still goes one at a time
    assert chunk_rows(meta, 4, 1 << 30) == 100
    assert chunk_rows(TensorMeta((), torch.float32), 4, 100) == 1  # a scalar: one row of one element
    assert chunk_rows(TensorMeta((7,), torch.float32), 4, 12) == 3
    assert chunk_rows(TensorMeta((0, 4), torch.float32), 4, 100) == 1
    # what convert does with it: row ranges of at most that many rows
    assert row_ranges(100, chunk_rows(meta, 4, 100))[:2] == [(0, 3), (3, 6)]


def test_spans_split_a_tensor_into_row_ranges_within_the_memory_budget():
    # per element: inputs 4 (f32 base) + 3 x 2 (bf16 checkpoints) = 10 bytes, outputs 2 x 4 (f32) = 8
    j = job({"w": (20, 8)})
    options = EngineOptions(max_memory=2 * 18 * 50, threads=2)  # 50 elements a span per worker
    assert _spans(j, options, "w") == [((0, 6), 0, 48), ((6, 12), 48, 48), ((12, 18), 96, 48), ((18, 20), 144, 16)]
    # the outputs in bf16: 14 bytes an element, 64 elements, 8 rows a span
    j16 = job({"w": (20, 8)}, out_dtype=torch.bfloat16)
    assert _spans(j16, EngineOptions(max_memory=2 * 14 * 64, threads=2), "w") == [
        ((0, 8), 0, 64),
        ((8, 16), 64, 64),
        ((16, 20), 128, 32),
    ]
    # one worker holds twice as much; no target still holds one output buffer's worth
    assert _spans(j, EngineOptions(max_memory=18 * 50, threads=1), "w")[0] == ((0, 6), 0, 48)
    jn = job({"w": (20, 8)}, targets=())
    assert _spans(jn, EngineOptions(max_memory=2 * 14 * 50, threads=2), "w")[0] == ((0, 6), 0, 48)


def test_spans_are_whole_gram_chunks(monkeypatch):
    """A span is a whole number of Gram chunks whatever the budget (at least one, over it if
    need be), so the chunks (and the order their Gram matrices are added in) are the same for
    every budget, thread count and rank."""
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 40)  # 5 rows of 8
    j = job({"w": (23, 8)})
    options = EngineOptions(max_memory=2 * 18 * 100, threads=2)  # 100 elements: 12 rows, down to 10
    assert _spans(j, options, "w") == [((0, 10), 0, 80), ((10, 20), 80, 80), ((20, 23), 160, 24)]
    tiny = EngineOptions(max_memory=2 * 18 * 8, threads=2)  # one row's budget: still a whole chunk
    assert _spans(j, tiny, "w")[:2] == [((0, 5), 0, 40), ((5, 10), 40, 40)]
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1 << 16)
    big = job({"w": (1000, 768)})  # 85 rows a chunk
    spans = _spans(big, EngineOptions(max_memory=2 * 18 * 200_000, threads=2), "w")
    assert [rows for rows, _, _ in spans][:2] == [(0, 255), (255, 510)] and spans[-1][0] == (765, 1000)


def test_spans_on_an_accelerator_count_the_device_copies():
    # + (4 inputs + 2 outputs) x 8 bytes (float64 compute) = 66 bytes an element, 33 a span: 4 rows
    j = job({"w": (20, 8)}, compute=torch.float64)
    options = EngineOptions(max_memory=2 * 66 * 33, threads=2, device=torch.device("cuda"))  # nothing is allocated
    assert _spans(j, options, "w")[:2] == [((0, 4), 0, 32), ((4, 8), 32, 32)]


def test_a_tensor_that_fits_is_one_whole_span():
    j = job({"w": (20, 8), "s": (), "e": (0, 8), "v": (9,)})
    roomy = EngineOptions(max_memory=1 << 30, threads=2)
    for name, numel in [("w", 160), ("s", 1), ("e", 0), ("v", 9)]:
        assert _spans(j, roomy, name) == [(None, 0, numel)]
    tight = EngineOptions(max_memory=2 * 18 * 5, threads=2)  # 5 elements: one row of "w" a span
    assert _spans(j, tight, "s") == [(None, 0, 1)] and _spans(j, tight, "e") == [(None, 0, 0)]
    assert len(_spans(j, tight, "w")) == 20
    # 159 elements: 19 rows a span, two spans
    assert _spans(j, EngineOptions(max_memory=2 * 18 * 159, threads=2), "w") == [((0, 19), 0, 152), ((19, 20), 152, 8)]
    # 157 elements of a 160-element, 2-row tensor: one row a span is still two spans
    two = job({"m": (2, 80), "r": (1, 80)})
    assert _spans(two, EngineOptions(max_memory=2 * 18 * 157, threads=2), "m") == [((0, 1), 0, 80), ((1, 2), 80, 80)]
    # a single row over budget cannot be split: it is the whole tensor
    assert _spans(two, EngineOptions(max_memory=2 * 18 * 50, threads=2), "r") == [(None, 0, 80)]


def test_spans_of_one_byte_tensors():
    # int8 copied through (4 inputs x 1 byte, 2 outputs x 1 byte): 6 bytes an element, 40 a span: 5 rows
    j = job({"q": (20, 8)}, base_dtype=torch.int8, ckpt_dtype=torch.int8)
    assert _spans(j, EngineOptions(max_memory=2 * 6 * 40, threads=2), "q")[:2] == [((0, 5), 0, 40), ((5, 10), 40, 40)]


def test_a_span_reads_at_most_span_bytes_of_input():
    rows = (SPAN_BYTES // 10) // 1000 + 5  # 1000-element rows: just over SPAN_BYTES of input in all
    j = job({"big": (rows, 1000)})
    spans = _spans(j, EngineOptions(max_memory=1 << 40, threads=1), "big")
    per_span = (SPAN_BYTES // 10) // 1000
    assert spans[0] == ((0, per_span), 0, per_span * 1000)
    assert spans[-1][0][1] == rows and len(spans) == -(-rows // per_span)


def test_partial_grams_are_added_in_span_then_chunk_order_whatever_order_they_finished():
    """float64 addition is not associative: 1e16 + 1 - 1e16 is 0 in span order, 1 in others.
    Each span brings its chunks' Gram matrices; a span waits (held) until every earlier one is in."""
    parts = {0: [1e16], 1: [1.0, 0.125], 2: [-1e16], 3: [0.25, 3.0]}
    state = _TensorState(spans=[], remaining=0, gram=torch.full((2, 2), 0.5, dtype=torch.float64), passes=2)
    held = []
    for index in (2, 3, 0, 1):  # the order the workers finished in
        state.add_gram(index, torch.stack([torch.full((2, 2), v, dtype=torch.float64) for v in parts[index]]))
        held.append(sorted(state.partial_grams))
    assert held == [[2], [2, 3], [2, 3], []]  # span 0 is added at once, then 1 lets 2 and 3 in
    expected = 0.5
    for index in range(4):
        for value in parts[index]:
            expected += value
    assert expected == 3.25 and state.gram.tolist() == [[expected] * 2] * 2 and state.folded == 4


def test_a_reader_of_whole_tensors_gets_one_span_per_tensor_whatever_the_budget(caplog):
    class WholeReader(MetaReader):
        whole_tensor_reads = True

    j = job({"w": (20, 8)})
    tight = EngineOptions(max_memory=2 * 18 * 50, threads=2)
    assert len(_spans(j, tight, "w")) > 1  # mapped readers: row spans
    j.checkpoints[1] = WholeReader(j.checkpoints[1].metas)
    with caplog.at_level(logging.DEBUG, logger="relex_merge.engine.tasks"):
        assert _spans(j, tight, "w") == [(None, 0, 160)]
    assert caplog.messages == ["w: one span (an input reads whole tensors), over the memory budget"]

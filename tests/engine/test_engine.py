"""The streaming engine's parts: block kernels, mapped reads, positional writes, and results
that do not depend on the number of worker threads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from relex_merge.common.errors import RelexError
from relex_merge.core import kernels
from relex_merge.core.kernels import Scratch, fold_grams, span_gram, span_outputs
from relex_merge.core.relex import RelexSpec
from relex_merge.engine import EngineOptions, MergeJob, run_job
from relex_merge.io.base import TensorMeta
from relex_merge.io.formats.safetensors import SafetensorsReader
from relex_merge.io.writers import OutputTensor
from relex_merge.io.writers.safetensors import ShardedModelWriter
from tests.helpers import CollectSink, DictReader, random_window


def _inputs(dtypes, n=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen)
    return [base.to(dtypes[0])] + [
        (base + 0.01 * (k + 1) * torch.randn(n, generator=gen)).to(dtype) for k, dtype in enumerate(dtypes[1:])
    ]


@pytest.mark.parametrize("columns", [7, 256, 5000])
@pytest.mark.parametrize(
    "dtypes", [[torch.float32] * 4, [torch.bfloat16] * 4, [torch.bfloat16, torch.float32, torch.float16, torch.float32]]
)
def test_span_kernels_match_dense_math_across_block_boundaries(columns, dtypes):
    inputs = _inputs(dtypes)
    base = inputs[0].double()
    deltas = torch.stack([x.double() - base for x in inputs[1:]])
    scratch = Scratch.allocate(3, min(columns, 1000), torch.float32, torch.device("cpu"))
    grams = span_gram(inputs, scratch, 300)  # chunks of 300: 3 whole, one of 100
    assert grams.dtype == torch.float64 and grams.shape == (4, 3, 3)
    for c in range(4):
        part = deltas[:, 300 * c : 300 * (c + 1)]
        assert torch.allclose(grams[c], part @ part.T, rtol=1e-5)
    assert torch.allclose(fold_grams(grams), deltas @ deltas.T, rtol=1e-5)
    weights = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    out = torch.empty(2, 1000, dtype=torch.float32)
    span_outputs(inputs, weights, scratch, out)
    assert torch.allclose(out.double(), base + weights @ deltas, atol=1e-5)


def test_zero_weights_copy_the_base_even_over_nan_deltas():
    inputs = _inputs([torch.float32] * 3, n=50)
    inputs[2][7] = float("nan")
    scratch = Scratch.allocate(2, 16, torch.float32, torch.device("cpu"))
    out = torch.empty(1, 50, dtype=torch.bfloat16)
    span_outputs(inputs, torch.zeros(1, 2, dtype=torch.float64), scratch, out)
    assert torch.equal(out[0], inputs[0].bfloat16())


def test_mapped_view_equals_read_and_releases_its_mapping(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(33, 5, generator=gen),
        "b": torch.randn(7, generator=gen).bfloat16(),
        "s": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    reader = SafetensorsReader(tmp_path / "m.safetensors")
    for name, rows in [("a", None), ("a", (3, 20)), ("b", None), ("s", None), ("empty", None)]:
        assert torch.equal(reader.view(name, rows), reader.read(name, rows))
    view = reader.view("a", (0, 33))
    assert _mappings(tmp_path) == 1
    del view
    assert _mappings(tmp_path) == 0


def _mappings(folder: Path) -> int:
    return sum(str(folder) in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_file_truncated_after_opening_is_an_error_not_a_crash(tmp_path):
    save_file({"a": torch.randn(1000, 10)}, tmp_path / "m.safetensors")
    reader = SafetensorsReader(tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "r+b") as f:
        f.truncate(20_000)  # a mapping past the end would raise SIGBUS on access
    with pytest.raises(RelexError, match="truncated"):
        reader.view("a", (900, 1000))


def test_writer_takes_spans_from_threads_in_any_order(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "x": torch.randn(64, 8, generator=gen),
        "y": torch.randn(10, generator=gen).bfloat16(),
        "z": torch.arange(12),
    }
    layout = [OutputTensor(n, TensorMeta(tuple(t.shape), t.dtype)) for n, t in tensors.items()]
    writer = ShardedModelWriter(tmp_path, layout, shard_size=1 << 30)
    writer.prepare()
    spans = [
        (name, start, t.reshape(-1)[start : start + 5])
        for name, t in tensors.items()
        for start in range(0, t.numel(), 5)
    ]
    threads = [
        threading.Thread(target=lambda part: [writer.write_at(*s) for s in part], args=(spans[i::3],)) for i in range(3)
    ]
    for thread in reversed(threads):
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_sharded_writer_output_reads_back_shard_by_shard(tmp_path):
    """Several shards of several tensors, spans written from threads in any order; each shard
    file opened on its own: its tensors are the planned ones, bit for bit, and the index maps
    every tensor to its shard."""
    import json
    import random

    from safetensors import safe_open

    gen = torch.Generator().manual_seed(1)
    tensors = {
        f"t{i}": torch.randn(shape, generator=gen).to(dtype)
        for i, (shape, dtype) in enumerate(
            [
                ((16, 8), torch.float32),
                ((33,), torch.bfloat16),
                ((50, 4), torch.float32),
                ((7, 3), torch.float16),
                ((64,), torch.float32),
                ((21, 5), torch.bfloat16),
                ((9,), torch.float32),
                ((30,), torch.float32),
            ]
        )
    }
    layout = [OutputTensor(n, TensorMeta(tuple(t.shape), t.dtype)) for n, t in tensors.items()]
    # 900 bytes a shard: t0 t1 | t2 t3 | t4 t5 t6 t7, every shard's first tensor followed by another
    writer = ShardedModelWriter(tmp_path, layout, shard_size=900)
    writer.prepare()
    spans = [
        (name, start, t.reshape(-1)[start : start + 11])
        for name, t in tensors.items()
        for start in range(0, t.numel(), 11)
    ]
    random.Random(0).shuffle(spans)
    threads = [
        threading.Thread(target=lambda part: [writer.write_at(*s) for s in part], args=(spans[i::3],)) for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert [s.name for s in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    seen = []
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            names = list(f.keys())
            for name in names:
                assert index["weight_map"][name] == shard.name
                got = f.get_tensor(name)
                assert got.dtype == tensors[name].dtype and torch.equal(got, tensors[name]), (shard.name, name)
        seen += names
    assert sorted(seen) == sorted(tensors)


def test_writer_refuses_to_close_with_a_missing_span(tmp_path):
    layout = [OutputTensor("x", TensorMeta((4, 4), torch.float32))]
    writer = ShardedModelWriter(tmp_path, layout, shard_size=1 << 30)
    with pytest.raises(RuntimeError, match="call prepare"):  # the files come from an explicit step
        writer.write_at("x", 8, torch.zeros(8))
    writer.prepare()
    writer.write_at("x", 8, torch.zeros(8))
    with pytest.raises(RuntimeError, match="before tensor x was complete"):
        writer.close()
    writer.abort()


def test_output_bits_do_not_depend_on_the_number_of_threads_or_the_budget(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 80)  # Gram chunks of 2 rows: many spans
    base, checkpoints = random_window(n_ckpt=6, shapes={"big": (300, 40), "v": (77,)}, seed=3)
    results = []
    for threads, budget in ((1, 20_000), (2, 40_000), (5, 100_000), (2, 1 << 30), (3, 9_000)):
        job = MergeJob(
            DictReader(base), [DictReader(c) for c in checkpoints], [1, 2, 3, 4, 5, 6], [12, 30], RelexSpec(rank=2)
        )
        sinks = [CollectSink(), CollectSink()]
        # other spans, other orders they finish in: the same chunks, added in the same order
        stats = run_job(job, sinks, EngineOptions(max_memory=budget, threads=threads))
        assert len(sinks[0].chunks["big"]) > 10 or budget == 1 << 30
        results.append(([s.tensor(n) for s in sinks for n in base], [r.gram for r in stats.tensors]))
    for outputs, grams in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outputs, results[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(grams, results[0][1]))


def test_a_worker_error_stops_the_merge_and_names_the_file(tmp_path):
    base, checkpoints = random_window(n_ckpt=3, shapes={"w": (400, 30)}, seed=1)
    for k, state in enumerate([base, *checkpoints]):
        save_file(state, tmp_path / f"{k}.safetensors")
    readers = [SafetensorsReader(tmp_path / f"{k}.safetensors") for k in range(4)]
    with open(tmp_path / "2.safetensors", "r+b") as f:
        f.truncate(30_000)
    job = MergeJob(readers[0], readers[1:], [1, 2, 3], [9], RelexSpec())
    with pytest.raises(RelexError, match="2.safetensors: ended early"):
        run_job(job, [CollectSink()], EngineOptions(max_memory=50_000, threads=3))


class _CountingReader(DictReader):
    """Records how many reads (or views) of it run at once."""

    def __init__(self, tensors, thread_safe: bool, views: bool):
        super().__init__(tensors)
        self.thread_safe_reads = thread_safe
        self.supports_views = views
        self.running = self.most = self.views = 0
        self._lock = threading.Lock()

    def _track(self, fn, *args):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.002)
            return fn(*args)
        finally:
            with self._lock:
                self.running -= 1

    def read(self, name, rows=None):
        return self._track(super().read, name, rows)

    def view(self, name, rows=None):
        self.views += 1
        return self._track(super().read, name, rows)


@pytest.mark.parametrize("thread_safe", [False, True])
def test_engine_uses_the_declared_reader_capabilities(thread_safe, monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 30)  # Gram chunks of one row: many spans
    base, checkpoints = random_window(n_ckpt=3, shapes={"w": (400, 30)}, seed=2)
    readers = [_CountingReader(state, thread_safe, views=thread_safe) for state in [base, *checkpoints]]
    job = MergeJob(readers[0], readers[1:], [1, 2, 3], [9], RelexSpec())
    run_job(job, [CollectSink()], EngineOptions(max_memory=4 * 20_000, threads=4))
    assert all((r.most > 1) == thread_safe for r in readers)  # undeclared: one read at a time
    assert all((r.views > 0) == thread_safe for r in readers)  # views only where declared

"""The streaming safetensors writer, read back by the safetensors library and by parsing the
file format by hand (8-byte little-endian header length, JSON header, 8-byte aligned data): the
shard plan, file names, header, front-to-back and positional writes, short writes, the index
and the refusals. Found by mutation testing (scripts/mutation.py)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from relex_merge.io.base import TensorMeta
from relex_merge.io.writers import OutputTensor
from relex_merge.io.writers import safetensors as writer_module
from relex_merge.io.writers.safetensors import ShardedModelWriter, plan_shards, shard_file_names


def layout(tensors: dict[str, torch.Tensor]) -> list[OutputTensor]:
    return [OutputTensor(n, TensorMeta(tuple(t.shape), t.dtype)) for n, t in tensors.items()]


def raw_header(path) -> tuple[dict, int]:
    """The file's JSON header and where its data section starts, parsed here."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), 8 + length


def sample(seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(3, 5, generator=gen),
        "b": torch.randn(7, generator=gen).bfloat16(),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(2, 2, generator=gen).half(),
    }


def test_plan_shards_is_greedy_in_order_and_isolates_oversized_tensors():
    sizes = [400, 400, 300, 1000, 50, 700, 100]
    tensors = [OutputTensor(f"t{i}", TensorMeta((n,), torch.uint8)) for i, n in enumerate(sizes)]
    shards = plan_shards(tensors, 800)
    assert [[t.name for t in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"], ["t6"]]
    refill = plan_shards([tensors[5], tensors[0], tensors[1]], 800)  # a later shard filled exactly
    assert [[t.name for t in shard] for shard in refill] == [["t5"], ["t0", "t1"]]
    big_first = plan_shards([tensors[3], tensors[4]], 800)  # too big for any shard: alone, even first
    assert [[t.name for t in shard] for shard in big_first] == [["t3"], ["t4"]]
    assert plan_shards([], 800) == [[]]


def test_shard_file_names_follow_hugging_face():
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert shard_file_names(12)[-1] == "model-00012-of-00012.safetensors"


def test_single_file_header_and_data_written_front_to_back(tmp_path):
    tensors = sample()
    w = ShardedModelWriter(tmp_path, layout(tensors), shard_size=1 << 30, metadata={"format": "pt", "note": "x"})
    w.prepare()
    for name, t in tensors.items():  # in spans of 4 elements, each tensor front to back
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), 4):
            w.write(name, flat[start : start + 4])
    w.close()
    path = tmp_path / "model.safetensors"
    header, data_start = raw_header(path)
    assert data_start % 8 == 0  # the data section is 8-byte aligned
    assert header.pop("__metadata__") == {"format": "pt", "note": "x"}
    offset = 0
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.float16: "F16"}
    for name, t in tensors.items():  # in the given order, back to back
        nbytes = t.numel() * t.element_size()
        assert header[name] == {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    assert path.stat().st_size == data_start + offset
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        assert all(torch.equal(f.get_tensor(n), t) for n, t in tensors.items())
    assert not list(tmp_path.glob("*.json"))  # one shard: no index


def test_default_metadata_and_a_custom_file_name(tmp_path):
    tensors = sample(1)
    w = ShardedModelWriter(tmp_path, layout(tensors), shard_size=1 << 30, file_name="adapter.safetensors")
    w.prepare()
    for name, t in tensors.items():
        w.write_at(name, 0, t)
    w.close()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(torch.equal(f.get_tensor(n), t) for n, t in tensors.items())
    with pytest.raises(ValueError, match="^file_name needs a single shard$"):
        ShardedModelWriter(tmp_path, layout(tensors), shard_size=10, file_name="x.safetensors")


def test_sharded_output_has_an_index_with_the_total_size(tmp_path):
    tensors = sample(2)
    # a (60 B) | b (14 B) | c (48 B) | d (8 B): four shards
    w = ShardedModelWriter(tmp_path, layout(tensors), shard_size=40)
    w.prepare()
    for name, t in tensors.items():
        w.write_at(name, 0, t)
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}
    files = {}
    for name in tensors:
        files.setdefault(index["weight_map"][name], []).append(name)
    n = len(files)
    assert sorted(files) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for file, names in files.items():
        header, _ = raw_header(tmp_path / file)
        assert sorted(k for k in header if k != "__metadata__") == sorted(names)
        with safe_open(str(tmp_path / file), "pt") as f:
            assert all(torch.equal(f.get_tensor(k), tensors[k]) for k in names)


def test_a_shard_of_empty_tensors_still_gets_its_header(tmp_path):
    tensors = {"e": torch.zeros(0, 4), "f": torch.ones(3)}
    w = ShardedModelWriter(tmp_path, layout(tensors), shard_size=1 << 30)
    w.prepare()
    w.write_at("f", 0, tensors["f"])
    w.close()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("e").shape == (0, 4) and torch.equal(f.get_tensor("f"), tensors["f"])


def test_positional_writes_in_any_order_and_short_pwrites(tmp_path, monkeypatch):
    """pwrite may write fewer bytes than asked (signals, network file systems): the rest follows."""
    real = os.pwrite
    calls = []

    def short(fd, data, position):
        calls.append(len(data))
        return real(fd, bytes(data[:3]), position)

    monkeypatch.setattr(writer_module.os, "pwrite", short)
    t = torch.arange(20, dtype=torch.float32)
    w = ShardedModelWriter(tmp_path, layout({"t": t}), shard_size=1 << 30)
    w.prepare()
    w.write_at("t", 12, t[12:])
    w.write_at("t", 0, t[:12])
    w.close()
    assert max(calls) > 3  # the writes were cut short, and completed
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("t"), t)


def test_write_refuses_wrong_dtype_bytes_past_the_end_and_incomplete_tensors(tmp_path):
    w = ShardedModelWriter(tmp_path, layout({"t": torch.zeros(2, 3)}), shard_size=1 << 30)
    w.prepare()
    with pytest.raises(RuntimeError, match=r"^writer expected t as torch.float32, got torch.float64$"):
        w.write_at("t", 0, torch.zeros(6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="^writer got bytes past the end of t$"):
        w.write_at("t", 4, torch.zeros(3))
    w.write_at("t", 3, torch.full((3,), 2.0))  # exactly up to the end: accepted
    w.write_at("t", 0, torch.ones(3))
    w.close()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("t").tolist() == [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    w = ShardedModelWriter(tmp_path, layout({"t": torch.zeros(2, 3)}), shard_size=1 << 30)
    w.prepare()
    w.write("t", torch.ones(3))
    with pytest.raises(RuntimeError, match="^writer closed before tensor t was complete$"):
        w.close()
    w.write("t", torch.full((3,), 2.0))  # the next span: after the 3 elements written so far
    w.close()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("t").tolist() == [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]


def test_close_and_abort_release_every_file(tmp_path):
    def open_fds():
        return {
            os.readlink(f"/proc/self/fd/{fd}")
            for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")
        }

    tensors = sample(3)
    before = open_fds()
    w = ShardedModelWriter(tmp_path, layout(tensors), shard_size=40)
    w.prepare()
    for name, t in tensors.items():
        w.write_at(name, 0, t)
    assert any(str(tmp_path) in fd for fd in open_fds() - before)
    w.abort()
    assert not any(str(tmp_path) in fd for fd in open_fds())
    w = ShardedModelWriter(tmp_path / ".." / tmp_path.name, layout(tensors), shard_size=40)
    w.prepare()
    for name, t in tensors.items():
        w.write_at(name, 0, t)
    w.close()
    assert not any(str(tmp_path.name) in fd for fd in open_fds() - before)


def test_the_data_section_is_aligned_to_8_bytes_whatever_the_header_length(tmp_path):
    for n in range(1, 9):  # names of 1..8 characters: headers of every length modulo 8
        t = torch.arange(3, dtype=torch.float32)
        w = ShardedModelWriter(tmp_path, layout({"x" * n: t}), shard_size=1 << 30, file_name=f"m{n}.safetensors")
        w.prepare()
        w.write_at("x" * n, 0, t)
        w.close()
        header, data_start = raw_header(tmp_path / f"m{n}.safetensors")
        assert data_start % 8 == 0, n
        with safe_open(str(tmp_path / f"m{n}.safetensors"), "pt") as f:
            assert torch.equal(f.get_tensor("x" * n), t)


def test_two_shards_get_an_index(tmp_path):
    tensors = {"a": torch.ones(10), "b": torch.zeros(10)}
    w = ShardedModelWriter(tmp_path, layout(tensors), shard_size=40)
    w.prepare()
    for name, t in tensors.items():
        w.write_at(name, 0, t)
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": 80},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }


def test_one_byte_tensors_written_front_to_back(tmp_path):
    tensors = {
        "u": torch.arange(10, dtype=torch.uint8),
        "q": torch.arange(-3, 4, dtype=torch.int8),
        "f": torch.tensor([0.5, -1.0, 2.0]).to(torch.float8_e4m3fn),
    }
    w = ShardedModelWriter(tmp_path, layout(tensors), shard_size=1 << 30)
    w.prepare()
    for name, t in tensors.items():
        for start in range(0, t.numel(), 3):
            w.write(name, t[start : start + 3])
    w.close()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name).view(torch.uint8), t.view(torch.uint8)), name


def test_output_files_are_readable_not_executable(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    tensors = {"a": torch.ones(10), "b": torch.zeros(10)}
    w = ShardedModelWriter(tmp_path, layout(tensors), shard_size=40)
    w.prepare()
    for name, t in tensors.items():
        w.write_at(name, 0, t)
    w.close()
    for shard in tmp_path.glob("*.safetensors"):
        assert shard.stat().st_mode & 0o777 == 0o644 & ~umask


# ---- several processes: prepare / attach / close_share / finalize ------------------------------


def test_nothing_is_written_before_prepare_or_attach(tmp_path):
    w = ShardedModelWriter(tmp_path, layout({"t": torch.zeros(2, 3)}), shard_size=1 << 30)
    with pytest.raises(RuntimeError) as caught:
        w.write_at("t", 0, torch.zeros(3))
    assert str(caught.value) == "writer: call prepare() (or attach()) before writing"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError) as caught:
        w.finalize([{"t": 24}])
    assert str(caught.value) == "writer: nothing was prepared"


def test_attach_writes_into_files_another_writer_prepared_and_refuses_missing_ones(tmp_path):
    tensors = sample()
    first = ShardedModelWriter(tmp_path, layout(tensors), shard_size=40)
    assert len(first.shards) > 1
    with pytest.raises(RuntimeError) as caught:
        first.attach()  # nothing prepared yet
    assert str(caught.value) == f"writer: {first.paths[0]} was not prepared"
    first.prepare()
    other = ShardedModelWriter(tmp_path, layout(tensors), shard_size=40)
    other.attach()
    names = list(tensors)
    mine, theirs = names[: len(names) // 2], names[len(names) // 2 :]
    for name in mine:
        first.write_at(name, 0, tensors[name])
    for name in theirs:
        other.write_at(name, 0, tensors[name])
    shares = [first.close_share(mine), other.close_share(theirs)]
    first.finalize(shares)
    for path in first.paths:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), tensors[name])
    index = (tmp_path / "model.safetensors.index.json").read_text()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {t.name: first.file_names[s] for s, shard in enumerate(first.shards) for t in shard}
    assert index == json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"


def test_finalize_adds_up_the_shares_of_a_tensor_split_between_processes(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    w = ShardedModelWriter(tmp_path, layout({"t": t, "empty": torch.zeros(0, 3)}), shard_size=1 << 30)
    w.prepare()
    w.write_at("t", 0, t[:2])
    w.write_at("t", 6, t[2:])
    w.finalize([{"t": 24}, {"t": 24}])  # two halves; "empty" (0 bytes) is in no share and needs none
    with pytest.raises(RuntimeError) as caught:
        w.finalize([{"t": 24}])
    assert str(caught.value) == "writer: tensor t is incomplete (24 of 48 bytes)"
    with pytest.raises(RuntimeError) as caught:
        w.finalize([{"empty": 0}])
    assert str(caught.value) == "writer: tensor t is incomplete (0 of 48 bytes)"


def test_each_shard_is_opened_once_however_many_writes(tmp_path):
    tensors = sample()
    w = ShardedModelWriter(tmp_path, layout(tensors), shard_size=40)
    w.prepare()
    before = len(os.listdir("/proc/self/fd"))
    for name, t in tensors.items():
        for row in range(t.shape[0]):
            w.write_at(name, row * t[0].numel(), t[row])
    assert len(os.listdir("/proc/self/fd")) - before == len(w.shards)
    w.close()
    assert len(os.listdir("/proc/self/fd")) == before

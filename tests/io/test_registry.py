"""The io package's shared pieces: the dtype table and the format registry."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from relex_merge.common.errors import RelexError
from relex_merge.io import formats as registry
from relex_merge.io.base import CheckpointFormat
from relex_merge.io.dtypes import CONFIG_DTYPES, CONFIG_NAMES, SAFETENSORS_DTYPES, SAFETENSORS_NAMES


def test_config_dtype_names_come_from_the_table():
    from relex_merge.cli import main
    from relex_merge.config.schema import DTYPES

    assert DTYPES == ("float32", "float16", "bfloat16", "float64") == tuple(CONFIG_DTYPES)
    convert = main.get_command(None, "convert")
    choices = next(p for p in convert.params if p.name == "dtype").type.choices
    assert set(choices) - {"keep"} <= set(CONFIG_DTYPES)
    assert all(CONFIG_DTYPES[CONFIG_NAMES[dtype]] == dtype for dtype in CONFIG_NAMES)


@pytest.mark.parametrize("dtype", list(SAFETENSORS_NAMES), ids=str)
def test_safetensors_names_match_the_safetensors_library(dtype, tmp_path):
    save_file({"x": torch.zeros(2, dtype=dtype)}, tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    name = json.loads(raw[8 : 8 + length])["x"]["dtype"]
    assert SAFETENSORS_NAMES[dtype] == name
    assert SAFETENSORS_DTYPES[name] == dtype


# --- the format registry ---------------------------------------------------------------------

FAKE_FORMAT = """
from pathlib import Path

from relex_merge.io.base import CheckpointFormat, StateDictReader, glob_any


def detect(path: Path) -> bool:
    return glob_any(path, ("*.fake",))


def _open(path: Path, allow_unsafe_pickle: bool = False) -> StateDictReader:
    return StateDictReader(path, {}, sorted(path.glob("*.fake")))


FORMAT = CheckpointFormat(
    name="fake", label="fake weights", description="a format that exists only in this test",
    priority=45, detect=detect, open=_open, weight_patterns=("*.fake",),
)
"""


def _io_modules() -> dict[str, object]:

    return {
        info.name: importlib.import_module(f"relex_merge.io.formats.{info.name}")
        for info in pkgutil.iter_modules(registry.__path__)
    }


def test_registry_holds_every_module_that_defines_a_format():
    modules = _io_modules()
    defined = {
        name for name, module in modules.items() if isinstance(getattr(module, "FORMAT", None), CheckpointFormat)
    }
    assert {fmt.name for fmt in registry.formats()} == defined
    assert set(modules) == defined
    # today's detection order: safetensors, .bin, verl FSDP, DCP, ZeRO
    assert [fmt.name for fmt in registry.formats()] == ["safetensors", "torch_bin", "fsdp", "dcp", "zero"]


def test_format_modules_import_only_the_shared_modules():
    """No import cycles: a format imports base (dtypes, hf, pickles), never another format or the registry."""
    for name, module in _io_modules().items():
        ours = set()
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "relex_merge.io":
                ours |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("relex_merge.io."):
                ours.add(node.module.rsplit(".", 1)[-1])
            elif isinstance(node, ast.Import):
                ours |= {a.name.rsplit(".", 1)[-1] for a in node.names if a.name.startswith("relex_merge.io.")}
        allowed = {"dtypes": set(), "hf": set(), "pickles": set(), "pages": set(), "base": {"dtypes", "pickles"}}.get(
            name, {"base", "dtypes", "hf", "pickles", "pages"}
        )
        assert ours <= allowed, (name, ours - allowed)


def test_a_new_format_is_one_file(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "fake.py").write_text(FAKE_FORMAT)
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, str(tmp_path / "pkg")])
    try:
        found = list(registry.REGISTRY._discover().values())
    finally:
        sys.modules.pop("relex_merge.io.formats.fake", None)
    assert [fmt.name for fmt in found] == ["safetensors", "torch_bin", "fsdp", "dcp", "fake", "zero"]
    monkeypatch.setattr(registry.REGISTRY, "_found", {fmt.name: fmt for fmt in found})
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "w.fake").write_bytes(b"")
    assert registry.open_checkpoint(folder).files() == [folder / "w.fake"]
    assert "*.fake" in registry.weight_patterns()
    with pytest.raises(RelexError) as err:
        registry.open_checkpoint(tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: no model weights found (safetensors, pytorch_model*.bin, verl FSDP shards, "
        "torch.distributed.checkpoint, fake weights or DeepSpeed ZeRO)"
    )


def test_unknown_weight_file_type(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(RelexError) as err:
        registry.open_checkpoint(tmp_path / "w.npz")
    assert str(err.value) == f"{tmp_path / 'w.npz'}: unknown weight file type (expected .safetensors, .bin or .pt)"


def test_trajectory_finds_zero_shards_before_an_hf_export(tmp_path):
    """trajectory: asks the registry for weight patterns, so a ZeRO actor/ is found like verl shards."""
    from relex_merge.config.trajectory import weights_dir

    actor = tmp_path / "global_step_10" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    (actor / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    (actor / "huggingface" / "model.safetensors").write_bytes(b"")
    assert weights_dir(tmp_path / "global_step_10") == actor
    # HF Trainer + DeepSpeed: checkpoint-N holds `latest` and the tag folder it names
    step = tmp_path / "checkpoint-10"
    (step / "global_step10").mkdir(parents=True)
    (step / "global_step10" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    (step / "latest").write_text("global_step10")
    assert weights_dir(step) == step / "global_step10"
    (step / "model.safetensors").write_bytes(b"")  # its own HF weights come first
    assert weights_dir(step) == step


# --- damaged files: one-line errors; anything else propagates -----------------------------------


def test_torch_file_errors_that_mean_a_bad_file_are_one_line(tmp_path, monkeypatch):
    from relex_merge.io import base

    file = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(3)}, file)
    file.write_bytes(file.read_bytes()[:100])  # truncated
    with pytest.raises(RelexError, match="cannot read: truncated or not a torch checkpoint"):
        base.load_torch_file(file)

    def missing_module(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'omegaconf'")

    monkeypatch.setattr(torch, "load", missing_module)  # an unsafe pickle naming an absent class
    with pytest.raises(RelexError, match=r"not a torch checkpoint \(No module named 'omegaconf'\)"):
        base.load_torch_file(file, allow_unsafe_pickle=True)

    def bug(*args, **kwargs):
        raise TypeError("load() got an unexpected keyword argument 'mmap'")

    monkeypatch.setattr(torch, "load", bug)
    with pytest.raises(TypeError):  # not the user's file: not a RelexError
        base.load_torch_file(file)


@pytest.fixture
def dcp_folder(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"w": torch.arange(12.0).reshape(4, 3)}, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True
        )
    return folder


def test_damaged_dcp_data_is_one_line(dcp_folder):
    reader = registry.open_checkpoint(dcp_folder)
    assert torch.equal(reader.read("w", (1, 3)), torch.arange(3.0, 9.0).reshape(2, 3))
    for data in dcp_folder.glob("*.distcp"):
        data.write_bytes(b"")
    # DCP raises CheckpointException, a BaseException that `except Exception` never caught
    with pytest.raises(RelexError) as err:
        reader.read("w")
    assert str(err.value) == f"{dcp_folder}: cannot read tensor w (EOFError)"


def test_damaged_dcp_metadata_is_one_line(dcp_folder):
    (dcp_folder / ".metadata").write_bytes(b"")
    with pytest.raises(RelexError) as err:
        registry.open_checkpoint(dcp_folder)
    assert str(err.value) == f"{dcp_folder}/.metadata: cannot read DCP metadata (Ran out of input)"


def test_a_safetensors_reader_that_fails_to_open_cleans_up_quietly(tmp_path, monkeypatch):
    import gc

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(RelexError, match="lists gone.safetensors, which does not exist"):
        registry.open_checkpoint(tmp_path)
    gc.collect()
    assert unraisable == []  # was: "Exception ignored in SafetensorsReader.__del__" (AttributeError)


def test_the_detected_format_is_logged_at_debug(dcp_folder, caplog):
    with caplog.at_level("DEBUG", logger="relex_merge.io.formats"):
        registry.open_checkpoint(dcp_folder)
    assert f"{dcp_folder}: dcp checkpoint" in caplog.messages


def test_convert_help_lists_the_registered_formats():
    from tests.helpers import run_cli

    result = run_cli("convert", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "Checkpoint formats (tried in this order):" in text
    for fmt in registry.formats():
        assert f"{fmt.name} {fmt.description}" in text


def test_inputs_held_in_ram_are_named_by_planning(qwen_run, tmp_path, monkeypatch):
    """A reader that holds its tensors in RAM (resident_bytes) is outside what --max-memory
    bounds, and a merge opens every input at once: the plan warns (one line) instead of staying
    silent. No shipped format does so today (ZeRO used to: DeepSpeed's consolidation)."""
    import yaml

    from relex_merge.common.units import human_bytes
    from relex_merge.workflows import plan
    from tests.helpers import run_cli

    opened = plan.open_checkpoint

    def holding(path, allow_unsafe_pickle=False):
        reader = opened(path, allow_unsafe_pickle)
        if "checkpoint-" in str(path):
            reader.resident_bytes = 1000
        return reader

    monkeypatch.setattr(plan, "open_checkpoint", holding)
    cfg = tmp_path / "c.yml"
    models = [{"model": str(qwen_run / f"checkpoint-{s}"), "parameters": {"step": s}} for s in (1, 2, 3)]
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "relex",
                "base_model": str(qwen_run / "base"),
                "models": models,
                "parameters": {"target_step": 9},
            }
        )
    )
    result = run_cli(str(cfg), str(tmp_path / "out"), "-q", "--max-memory", "1MB")
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if not line.startswith("verdict: ")] == [
        f"warning: 3 input(s), e.g. {qwen_run}/checkpoint-1, are held whole in RAM for the whole run "
        f"({human_bytes(3000)}), beyond --max-memory; convert them first (relex-merge convert) to stay within it"
    ]
    assert registry.open_checkpoint(qwen_run / "base").resident_bytes == 0  # mapped formats hold nothing


# ---- damaged safetensors files: one exact line each -------------------------------------------


def _raw_safetensors(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def _entry(shape, lo, hi, dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [lo, hi]}


DAMAGED = {
    "shorter than 8 bytes": (
        lambda p: p.write_bytes(b"\x01\x02\x03") and p,
        "{f}: not a safetensors file (shorter than 8 bytes); re-copy or re-save it",
    ),
    "header longer than the file": (
        lambda p: _raw_safetensors(p, {"t": _entry((2,), 0, 8)}, b"\0" * 8, length=1000),
        "{f}: truncated safetensors header ({size} bytes, header says 1000); re-copy or re-save it",
    ),
    "header ending exactly at the end of the file": (  # no tensors, no data: nothing is missing
        lambda p: _raw_safetensors(p, {"__metadata__": {"format": "pt"}}),
        None,
    ),
    "a header length with the top bit set": (  # unsigned: 2^63 + 2, not -2^63 + 2
        lambda p: _raw_safetensors(p, {}, length=(1 << 63) + 2),
        "{f}: truncated safetensors header ({size} bytes, header says 9223372036854775810); re-copy or re-save it",
    ),
    "a header over safetensors' 100 MB cap": (
        lambda p: _raw_safetensors(p, {}, length=100 * 1024 * 1024 + 1),
        "{f}: truncated safetensors header ({size} bytes, header says 104857601); re-copy or re-save it",
    ),
    "a header exactly at safetensors' 100 MB cap": (  # the cap itself is allowed, as safetensors allows it
        lambda p: p.write_bytes(struct.pack("<Q", 100 * 1024 * 1024) + b"{}".ljust(100 * 1024 * 1024)) and p,
        None,
    ),
    "not JSON": (
        lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{x: " + b"\0" * 8) and p,
        "{f}: corrupt safetensors header (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
    ),
    "an entry without a dtype": (
        lambda p: _raw_safetensors(p, {"t": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "{f}: tensor t has an unreadable or unsupported header entry {{'shape': [2], 'data_offsets': [0, 8]}}",
    ),
    "offsets that disagree with the shape": (
        lambda p: _raw_safetensors(p, {"t": _entry((2,), 4, 16)}, b"\0" * 16),
        "{f}: tensor t spans 12 bytes but its shape needs 8",
    ),
    "data cut short": (
        lambda p: _raw_safetensors(p, {"t": _entry((4,), 0, 16)}, b"\0" * 15),
        "{f}: data is shorter than the header says (15 of 16 bytes); the file is truncated: re-copy or re-save it",
    ),
    "a tensor whose data ends at the end of the file": (
        lambda p: _raw_safetensors(p, {"t": _entry((1,), 0, 4)}, b"\0" * 4),
        None,
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_safetensors_files_are_named_with_what_is_wrong(case, tmp_path):
    from relex_merge.io.formats.safetensors import read_safetensors_header

    make, expected = DAMAGED[case]
    f = make(tmp_path / "model.safetensors")
    if expected is None:
        start, tensors = read_safetensors_header(f)
        assert start + sum(meta.nbytes for meta, _ in tensors.values()) == f.stat().st_size
        return
    with pytest.raises(RelexError) as caught:
        read_safetensors_header(f)
    assert str(caught.value) == expected.format(f=f, size=f.stat().st_size)


def test_row_spans_of_a_misaligned_tensor_and_of_a_one_row_tensor(tmp_path):
    """A tensor whose data does not start at a multiple of its item size (a writer that does not
    pad the header) cannot be mapped: view falls back to a copy of the same rows. A tensor of
    one row is one row's bytes."""
    from relex_merge.io.formats.safetensors import SafetensorsReader

    b, c = torch.arange(6, dtype=torch.float32).reshape(3, 2), torch.arange(4, dtype=torch.float32).reshape(1, 4)
    header = {"a": _entry((1,), 0, 1, "U8"), "b": _entry((3, 2), 1, 25), "c": _entry((1, 4), 25, 41)}
    text = json.dumps(header)
    text += " " * ((1 - (8 + len(text) + 1)) % 4)  # b starts 1 byte past a multiple of 4
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(text)) + text.encode() + b"\x07" + b.numpy().tobytes() + c.numpy().tobytes())
    reader = SafetensorsReader(f)
    assert (8 + len(text) + 1) % 4 == 1
    for rows in [None, (1, 3), (2, 3)]:
        expected = b if rows is None else b[rows[0] : rows[1]]
        assert torch.equal(reader.view("b", rows), expected) and torch.equal(reader.read("b", rows), expected)
    assert torch.equal(reader.read("c", (0, 1)), c) and torch.equal(reader.view("c", (0, 1)), c)
    reader.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts this process's descriptors in /proc")
def test_a_reader_opens_each_file_once_however_many_spans_it_reads(qwen_run):
    """A window of 30 checkpoints is read span by span, thousands of reads: a descriptor per
    read would run out of them (EMFILE) on a large model."""
    from relex_merge.io.formats.safetensors import SafetensorsReader

    reader = SafetensorsReader(qwen_run / "checkpoint-1" / "model.safetensors")
    before = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(20):
        for name in reader.names():
            reader.read(name)
            reader.view(name)
    assert len(list(Path("/proc/self/fd").iterdir())) <= before + 1
    reader.close()


def test_a_sharded_folder_whose_index_or_shards_disagree_is_refused(tmp_path):
    from relex_merge.io.formats.safetensors import SafetensorsReader

    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"a": torch.zeros(2)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(folder / "model-00002-of-00002.safetensors"))
    index = folder / "model.safetensors.index.json"
    good = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    index.write_text(json.dumps({"metadata": {}, "weight_map": good}))
    reader = SafetensorsReader(folder)
    assert reader.names() == ["a", "b"] and torch.equal(reader.read("b"), torch.ones(2))
    reader.close()
    index.write_text(json.dumps({"metadata": {}, "weight_map": {**good, "b": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(RelexError) as caught:
        SafetensorsReader(folder)
    assert str(caught.value) == f"{index}: tensor b is not in model-00001-of-00002.safetensors"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {**good, "c": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(RelexError) as caught:
        SafetensorsReader(folder)
    assert str(caught.value) == f"{index}: tensor c is not in model-00002-of-00002.safetensors"
    index.unlink()
    save_file({"a": torch.zeros(2)}, str(folder / "model-00002-of-00002.safetensors"))  # "a" twice
    with pytest.raises(RelexError) as caught:
        SafetensorsReader(folder)
    assert str(caught.value) == (
        f"{folder / 'model-00002-of-00002.safetensors'}: tensor a is also in "
        f"{folder / 'model-00001-of-00002.safetensors'}"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RelexError) as caught:
        SafetensorsReader(empty)
    assert str(caught.value) == f"{empty}: no .safetensors files"
    single = tmp_path / "one.safetensors"
    save_file({"x": torch.arange(3.0)}, str(single))
    assert SafetensorsReader(single).names() == ["x"]  # a file, not a folder: no index is looked for

"""No pickle runs code without consent (issue 23): for every format relex-merge unpickles, a crafted
file whose unpickling would create a file is refused in one line (exit 2) naming the file and
what it asked for, and nothing is created; ``--allow-unsafe-pickle`` lifts the refusal (which
shows the crafted files are real)."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from relex_merge.io.pickles import RestrictedUnpickler, load_dcp_metadata
from tests.helpers import run_cli, write_config


class Payload:
    """Unpickling it calls ``func(*args)``: here ``open(marker, "w")``, which creates a file."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def creates(marker: Path) -> Payload:
    return Payload(builtins.open, str(marker), "w")


def _dcp_save(folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}, checkpoint_id=str(folder), no_dist=True)


def _genuine_metadata(folder: Path):
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)  # our own file, written just now


def dcp_metadata_reduce(folder: Path, marker: Path) -> Path:
    """The issue's attack: .metadata is a bare reduce."""
    _dcp_save(folder)
    (folder / ".metadata").write_bytes(pickle.dumps(creates(marker)))
    return folder


def dcp_metadata_nested(folder: Path, marker: Path) -> Path:
    """A genuine Metadata object with the payload hidden in one of its fields."""
    _dcp_save(folder)
    metadata = _genuine_metadata(folder)
    metadata.planner_data = {"w": creates(marker)}
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return folder


def dcp_item(folder: Path, marker: Path) -> Path:
    """Genuine .metadata; the tensor item's bytes are a torch.save of the payload."""
    _dcp_save(folder)
    metadata = _genuine_metadata(folder)
    buffer = io.BytesIO()
    torch.save({"evil": creates(marker)}, buffer)
    item = next(folder.glob("*.distcp"))
    offset = item.stat().st_size
    with open(item, "ab") as f:
        f.write(buffer.getvalue())
    for index, info in metadata.storage_data.items():
        if index.fqn == "w":
            info.offset, info.length = offset, len(buffer.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    # a config transformers does not know (so the names cannot be checked against it), so that
    # conversion gets as far as reading the tensor
    (folder / "config.json").write_text(json.dumps({"model_type": "relex-test", "architectures": ["NoSuchModel"]}))
    return folder


def verl_shard(folder: Path, marker: Path) -> Path:
    folder.mkdir()
    torch.save({"w": torch.ones(3, 4), "evil": creates(marker)}, folder / "model_world_size_1_rank_0.pt")
    (folder / "fsdp_config.json").write_text(json.dumps({"world_size": 1}))
    return folder


def torch_bin(folder: Path, marker: Path) -> Path:
    folder.mkdir()
    torch.save({"w": torch.ones(3, 4), "evil": creates(marker)}, folder / "pytorch_model.bin")
    return folder


def _zero(folder: Path, marker: Path, where: str) -> Path:
    tag = folder / "global_step1"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("global_step1")
    model = {"module": {"w": torch.ones(3, 4)}, "param_shapes": [{"w": torch.Size([3, 4])}], "ds_version": "0.19"}
    flat = [torch.ones(12)]  # enough of a ZeRO-2 optimizer state for the reader to go on to the model states
    optim = {
        "optimizer_state_dict": {"zero_stage": 2, "partition_count": 1, "single_partition_of_fp32_groups": flat},
        "ds_version": "0.19",
    }
    (model if where == "model" else optim)["ds_config"] = creates(marker)
    torch.save(model, tag / "mp_rank_00_model_states.pt")
    torch.save(optim, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return folder


def zero_model_states(folder: Path, marker: Path) -> Path:
    return _zero(folder, marker, "model")


def zero_optim_states(folder: Path, marker: Path) -> Path:
    return _zero(folder, marker, "optim")


CRAFTED = {
    "dcp .metadata (a bare reduce)": (dcp_metadata_reduce, "io.open"),
    "dcp .metadata (inside a genuine Metadata)": (dcp_metadata_nested, "io.open"),
    "dcp tensor item": (dcp_item, "io.open"),
    "verl FSDP shard": (verl_shard, "io.open"),
    "torch .bin": (torch_bin, "io.open"),
    "DeepSpeed ZeRO model states": (zero_model_states, "io.open"),
    "DeepSpeed ZeRO optimizer states": (zero_optim_states, "io.open"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_pickle_is_refused_in_one_line_and_runs_nothing(case, tmp_path):
    make, refused_global = CRAFTED[case]
    marker = tmp_path / "pwned"
    source = make(tmp_path / "crafted", marker)
    assert not marker.exists()
    result = run_cli("convert", str(source), str(tmp_path / "out"))
    assert not marker.exists(), f"{case}: the pickle ran code"
    assert result.exit_code == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {source}"), result.stderr
    assert f"refusing to unpickle {refused_global}" in lines[0] and "--allow-unsafe-pickle" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case", ["dcp .metadata (a bare reduce)", "torch .bin", "verl FSDP shard", "DeepSpeed ZeRO optimizer states"]
)
def test_allow_unsafe_pickle_lifts_the_refusal(case, tmp_path):
    """The crafted files are real: trusted, their unpickling does create the file."""
    make, _ = CRAFTED[case]
    marker = tmp_path / "pwned"
    source = make(tmp_path / "crafted", marker)
    run_cli("convert", str(source), str(tmp_path / "out"), "--allow-unsafe-pickle")
    assert marker.exists()


def test_a_fit_cache_that_is_a_pickle_is_refused_and_runs_nothing(qwen_run, tmp_path):
    """Fit caches are safetensors: a pickle in their place is not unpickled at all."""
    marker = tmp_path / "pwned"
    cache = tmp_path / "fit_cache.safetensors"
    cache.write_bytes(pickle.dumps(creates(marker)))
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    result = run_cli(str(cfg), str(tmp_path / "out"), "--fit-cache", str(cache))
    assert not marker.exists()
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(cache) in result.stderr and not (tmp_path / "out").exists()


def test_genuine_dcp_metadata_passes_the_allow_list(tmp_path):
    _dcp_save(tmp_path / "dcp")
    genuine = _genuine_metadata(tmp_path / "dcp")
    restricted = load_dcp_metadata(tmp_path / "dcp" / ".metadata")
    assert restricted.state_dict_metadata == genuine.state_dict_metadata
    assert restricted.storage_data == genuine.storage_data
    # genuine DeepSpeed files pass the ZeRO reader's allow-list: tests/io/test_zero.py, on the real fixtures


def test_the_restricted_unpickler_allows_dtypes_and_sizes_but_no_other_torch_name(tmp_path):
    data = pickle.dumps({"size": torch.Size([2, 3]), "dtype": torch.bfloat16})
    assert RestrictedUnpickler(io.BytesIO(data), {("torch", "Size"): torch.Size}, "x").load() == {
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
    }
    evil = pickle.dumps(Payload(torch.load, os.devnull))
    with pytest.raises(
        Exception, match=r"^x: refusing to unpickle torch\.serialization\.load|^x: refusing to unpickle torch\.load"
    ):
        RestrictedUnpickler(io.BytesIO(evil), {("torch", "Size"): torch.Size}, "x").load()


def test_the_allow_list_is_left_as_found_and_safe_across_threads():
    """torch's ``safe_globals`` removes every entry it names on exit, DTensor's own included: a
    plain weights-only load of a verl FSDP2 shard then failed for the rest of the process, and
    concurrent loads refused DTensor at random. The allow-list is now left as it was found."""
    import threading

    import torch.distributed.tensor  # noqa: F401  (torch registers DTensor's types for weights-only loads)

    from relex_merge.io.base import load_torch_file
    from tests.helpers import REPO

    shard = REPO / "tests/fixtures/real_writers/verl_fsdp2_ws2/run/global_step_2/actor/model_world_size_2_rank_0.pt"
    before = list(torch.serialization.get_safe_globals())
    load_torch_file(shard)
    assert list(torch.serialization.get_safe_globals()) == before
    torch.load(shard, map_location="cpu", weights_only=True)  # torch's own registration still holds
    failures: list[BaseException] = []

    def load_many():
        for _ in range(5):
            try:
                load_torch_file(shard)
            except BaseException as exc:  # noqa: BLE001
                failures.append(exc)

    workers = [threading.Thread(target=load_many) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == []

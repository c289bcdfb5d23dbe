"""``relex-merge jump``: one target step in the trainer's own layout. With ``--resume-layout
verl`` on checkpoints verl itself wrote (tests/fixtures/real_writers, FSDP1 and FSDP2, 2 and 3
ranks, uneven shards): our verl reader reads exactly the HF output of the same jump, every rank
file keeps the template's keys, DTensor specs, local shapes and dtypes, and everything else of the
last window checkpoint is carried over byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from relex_merge.io.formats.fsdp import FsdpShardReader
from relex_merge.io.verl import rank_files
from tests.helpers import load_state, run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "real_writers"


def _run(tmp_path: Path, writer: str) -> Path:
    """A copy of a verl fixture run, with the optimizer, extra state and dataloader files the
    fixtures were pruned of (stand-ins: jump must carry them over as they are)."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / writer / "run", run)
    for step in (2, 4, 6):
        actor = run / f"global_step_{step}" / "actor"
        world = len(rank_files(actor))
        for rank in range(world):
            torch.save(
                {"state": {0: {"exp_avg": torch.full((3,), float(step + rank))}}},
                actor / f"optim_world_size_{world}_rank_{rank}.pt",
            )
            torch.save(
                {"lr_scheduler": {"last_epoch": step}, "rng": None},
                actor / f"extra_state_world_size_{world}_rank_{rank}.pt",
            )
        torch.save({"dataloader": step}, run / f"global_step_{step}" / "data.pt")
    return run


def _config(tmp_path: Path, run: Path, target: int = 9) -> Path:
    config = {
        "merge_method": "relex",
        "base_model": str(FIXTURES / "base"),
        "trajectory": {"run_dir": str(run)},
        "parameters": {"target_step": target, "base_step": 0},
    }
    path = tmp_path / "jump.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("writer", ["verl_fsdp2_ws2", "verl_fsdp1_ws2", "verl_fsdp2_ws3", "verl_fsdp1_ws3"])
def test_verl_layout_round_trip(tmp_path, writer):
    run = _run(tmp_path, writer)
    config = _config(tmp_path, run)
    hf = run_cli("jump", str(config), str(tmp_path / "hf"), "-q")
    assert hf.exit_code == 0, hf.output
    result = run_cli("jump", str(config), str(tmp_path / "out"), "--resume-layout", "verl", "-q")
    assert result.exit_code == 0, result.output
    # -q hides all but warnings and the verdict (this fixture's model has no tokenizer: one warning)
    lines = result.stderr.splitlines()
    assert [x for x in lines if not x.startswith("warning: ")][0].startswith("verdict: ") and result.stdout == ""
    warned = [x for x in lines if x.startswith("warning: ")]
    assert len(warned) == 1 and "nor the last window checkpoint has tokenizer files: the outputs have none" in warned[0]
    out = tmp_path / "out"
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "9"
    actor = out / "global_step_9" / "actor"
    template = run / "global_step_6" / "actor"
    # our reader reads exactly the HF output of the same jump
    expected = load_state(tmp_path / "hf")
    reader = FsdpShardReader(actor)
    assert sorted(reader.names()) == sorted(expected)
    for name, want in expected.items():
        assert torch.equal(reader.read(name), want), name
    moved = sum(
        not torch.equal(want, load_state(FIXTURES / writer / "reference" / "step_6")[n]) for n, want in expected.items()
    )
    assert moved > 0
    # every rank file is the template's, values aside
    for new_file, old_file in zip(rank_files(actor), rank_files(template)):
        assert new_file.name == old_file.name
        new, old = torch.load(new_file, weights_only=False), torch.load(old_file, weights_only=False)
        assert list(new) == list(old)
        for key in old:
            a, b = new[key], old[key]
            assert type(a) is type(b), key
            assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride(), key
            if hasattr(b, "placements"):
                assert a.placements == b.placements, key
                assert a.device_mesh == b.device_mesh and a.device_mesh.mesh_dim_names == b.device_mesh.mesh_dim_names
                assert a._local_tensor.shape == b._local_tensor.shape, key
    # carried over unchanged
    for entry in template.rglob("*"):
        if entry.is_file() and not entry.name.startswith("model_world_size"):
            copy = actor / entry.relative_to(template)
            assert copy.read_bytes() == entry.read_bytes(), entry.name
    assert (out / "global_step_9" / "data.pt").read_bytes() == (run / "global_step_6" / "data.pt").read_bytes()
    assert "relex-merge verdict" in (out / "relex_config.yml").read_text()  # the verdict travels with it
    assert not (out / "hf").exists()


def test_resume_step_last_and_keep_hf(tmp_path):
    run = _run(tmp_path, "verl_fsdp2_ws2")
    config = _config(tmp_path, run)
    result = run_cli(
        "jump",
        str(config),
        str(tmp_path / "out"),
        "--resume-layout",
        "verl",
        "--resume-step",
        "last",
        "--keep-hf",
        "-q",
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "6"
    reader = FsdpShardReader(out / "global_step_6" / "actor")
    for name, want in load_state(out / "hf").items():
        assert torch.equal(reader.read(name), want), name


def test_verl_layout_needs_a_verl_window(tmp_path, qwen_run):
    config = tmp_path / "c.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "relex",
                "base_model": str(qwen_run / "base"),
                "trajectory": {"run_dir": str(qwen_run)},
                "parameters": {"target_step": 9},
            }
        )
    )
    result = run_cli("jump", str(config), str(tmp_path / "out"), "--resume-layout", "verl")
    assert result.exit_code == 2
    assert "is not a verl actor folder" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    several = yaml.safe_load(config.read_text())
    several["parameters"]["target_step"] = [8, 9]
    config.write_text(yaml.safe_dump(several))
    result = run_cli("jump", str(config), str(tmp_path / "out"))
    assert result.exit_code == 2 and "one target step" in result.output


def test_missing_rank_file_is_one_line(tmp_path):
    run = _run(tmp_path, "verl_fsdp2_ws2")
    (run / "global_step_6" / "actor" / "model_world_size_2_rank_1.pt").unlink()
    result = run_cli("jump", str(_config(tmp_path, run)), str(tmp_path / "out"), "--resume-layout", "verl")
    assert result.exit_code == 2 and "model_world_size_2_rank_1.pt" in result.output
    assert not (tmp_path / "out").exists()

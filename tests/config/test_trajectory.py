"""``trajectory:`` discovery of each trainer's layout (the real libraries' own folders are in
tests/workflows/test_real_writers.py; these are the choices between layouts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relex_merge.common.errors import RelexError
from relex_merge.config.trajectory import discover_steps, weights_dir


def _save(folder: Path, file: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file).write_bytes(b"")
    return folder


ZERO_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def test_openrlhf_prefers_the_actors_zero_saves_over_its_hf_exports(tmp_path):
    """OpenRLHF's ckpt_path holds _actor/global_stepN (fp32 ZeRO) and global_stepN_hf (exports)."""
    ckpt = tmp_path / "ckpt"
    for step in (10, 20):
        _save(ckpt / "_actor" / f"global_step{step}", ZERO_FILE)
        _save(ckpt / f"global_step{step}_hf")
    assert discover_steps(ckpt) == {10: ckpt / "_actor" / "global_step10", 20: ckpt / "_actor" / "global_step20"}
    # without the actor's saves, the exports are the checkpoints
    exports = tmp_path / "exports"
    _save(exports / "global_step10_hf")
    _save(exports / "global_step20_hf")
    assert discover_steps(exports) == {10: exports / "global_step10_hf", 20: exports / "global_step20_hf"}


def test_each_layouts_step_folder_and_weights(tmp_path):
    layouts = {
        "deepspeed": ("global_step7", ZERO_FILE, "global_step7"),
        "torchtitan": ("checkpoint/step-7", "__0_0.distcp", "checkpoint/step-7"),
        "accelerate": ("step_7/pytorch_model_fsdp_0", "__0_0.distcp", "step_7/pytorch_model_fsdp_0"),
        "verl": ("global_step_7/actor", "model_world_size_1_rank_0.pt", "global_step_7/actor"),
        "trainer": ("checkpoint-7", "model.safetensors", "checkpoint-7"),
    }
    for name, (folder, file, weights) in layouts.items():
        run = tmp_path / name
        _save(run / folder, file)
        if name == "accelerate":
            _save(run / "step_7" / "optimizer_0", "__0_0.distcp")  # never the optimizer's DCP
        found = discover_steps(run)
        assert list(found) == [7], name
        assert weights_dir(found[7]) == run / weights, name


def test_a_step_twice_is_refused(tmp_path):
    _save(tmp_path / "global_step5", ZERO_FILE)
    _save(tmp_path / "global_step_5" / "actor", "model_world_size_1_rank_0.pt")
    with pytest.raises(RelexError) as err:
        discover_steps(tmp_path)
    assert str(err.value) == "trajectory.run_dir: step 5 appears twice (global_step5, global_step_5)"


def test_accelerates_save_counters_are_not_steps(tmp_path):
    for k in range(3):
        _save(tmp_path / "checkpoints" / f"checkpoint_{k}", "pytorch_model_fsdp.bin")
    with pytest.raises(RelexError) as err:
        discover_steps(tmp_path)
    assert str(err.value) == (
        f"trajectory.run_dir: {tmp_path / 'checkpoints'} holds accelerate's checkpoint_0, checkpoint_1, checkpoint_2 "
        "folders, numbered by save, not by optimizer step; list them under models: with the step each was saved at"
    )

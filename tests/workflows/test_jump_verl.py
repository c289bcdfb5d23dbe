"""verl itself resumes from a jump: a run written by verl's FSDPCheckpointManager (2 gloo ranks,
FSDP1 and FSDP2, with its optimizer and extra state), ``relex-merge jump --resume-layout verl``,
then verl's find_latest_ckpt_path and load_checkpoint in verl's own environment, and one more
training step. Needs verl's venv (RELEX_VERL_PYTHON, default /work/venvs/writers/bin/python; see
tests/fixtures/real_writers/make_real_checkpoints.py for how it is made); skipped without it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, run_cli

VERL_PYTHON = Path(os.environ.get("RELEX_VERL_PYTHON", "/work/venvs/writers/bin/python"))
pytestmark = pytest.mark.slow


def _has_verl() -> bool:
    if not VERL_PYTHON.is_file():
        return False
    probe = subprocess.run([str(VERL_PYTHON), "-c", "import verl, omegaconf"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _has_verl(), reason=f"verl's venv not found ({VERL_PYTHON}; set RELEX_VERL_PYTHON)")
@pytest.mark.parametrize("fsdp", [2, 1])
def test_verl_resumes_from_a_jump(tmp_path, fsdp):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VERL_LOGGING_LEVEL": "WARN"}
    env.pop("PYTHONPATH", None)
    writer = f"verl_fsdp{fsdp}_ws2"
    script = REPO / "tests" / "fixtures" / "real_writers" / "make_real_checkpoints.py"
    made = subprocess.run(
        [str(VERL_PYTHON), str(script), "--out", str(tmp_path / "written"), "--only", writer, "--no-prune"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    run = tmp_path / "written" / writer / "run"
    template = run / "global_step_6" / "actor"
    assert (template / "optim_world_size_2_rank_0.pt").is_file()  # a complete verl save
    config = tmp_path / "jump.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "relex",
                "base_model": str(tmp_path / "written" / "base"),
                "trajectory": {"run_dir": str(run)},
                "parameters": {"target_step": 9},
            }
        )
    )
    out = tmp_path / "jumped"
    result = run_cli("jump", str(config), str(out), "--resume-layout", "verl", "--keep-hf", "-q")
    assert result.exit_code == 0, result.output
    report = tmp_path / "resume.json"
    resumed = subprocess.run(
        [
            str(VERL_PYTHON),
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(REPO / "tests" / "workflows" / "verl_resume.py"),
            str(fsdp),
            str(out),
            str(out / "hf"),
            str(template),
            str(report),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    got = json.loads(report.read_text())
    assert got["folder"] == str(out / "global_step_9") and got["global_step"] == 9
    assert got["weights_equal"], got  # verl's model holds the jump, exactly
    assert got["optimizer_equal"], got  # and the optimizer state of the last real step
    assert got["scheduler_last_epoch"] == 6  # the lr scheduler state of the last real step (extra state)
    assert got["loss_after"] == got["loss_after"] and got["loss_after"] > 0  # it trains on

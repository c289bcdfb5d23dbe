"""Jumps with sharded parameters: FSDP2 (fully_shard) on 2 gloo ranks under torchrun, each rank
holding uneven (and empty) slices, must move the weights as one unsharded process does: the
per-rank Gram pieces summed by one all-reduce are the full tensors' Gram matrices, and each rank
moves its own slice. With the snapshots spilled to disk, the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(nproc: int, out: Path, budget: str, scratch: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [str(REPO / "tests" / "integrations" / "fsdp_jump.py"), str(out), budget, str(scratch)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("budget", ["1GB", "0"])
def test_fsdp2_jumps_equal_one_process(tmp_path, budget):
    single = _run(1, tmp_path / "single.pt", "1GB", tmp_path / "s1")
    sharded = _run(2, tmp_path / "sharded.pt", budget, tmp_path / "s2")
    assert [h["ahead"] for h in sharded["history"]] == [h["ahead"] for h in single["history"]]
    assert [h["ahead"] for h in single["history"]] == [5, 5]
    # full-tensor Gram matrices on both; they differ by the float32 block products' rounding (the
    # backtest errors are differences of such sums, so they carry more of it)
    for key, rel in (
        ("explained_variance_1", 1e-6),
        ("linear_r2", 1e-6),
        ("backtest_error", 1e-4),
        ("stop_error", 1e-4),
    ):
        for a, b in zip(sharded["history"], single["history"]):
            assert a[key] == pytest.approx(b[key], rel=rel), key
    if budget == "0":
        assert sharded["spilled"] > 0
    for step, (got, want) in enumerate(zip(sharded["weights"], single["weights"]), start=1):
        assert got.keys() == want.keys()
        for name in want:
            scale = want[name].abs().max().item()
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-6 * max(scale, 1.0), msg=f"{step} {name}")
    assert not list((tmp_path / "s2").rglob("*.safetensors"))  # dropped after each window

"""Jumps with sharded parameters: FSDP2 (fully_shard) on 2 gloo ranks under torchrun, each rank
holding uneven (and empty) slices, must move the weights as one unsharded process does: the
per-rank Gram pieces summed by one all-reduce are the full tensors' Gram matrices, and each rank
moves its own slice. With the snapshots spilled to disk, the same. DeepSpeed ZeRO-3 (in a venv
that has DeepSpeed): the optimizer's fp32 master partitions move, exactly as dense RELEX says."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import dense_relex

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


DEEPSPEED_PYTHON = Path(os.environ.get("RELEX_DEEPSPEED_PYTHON", "/work/venvs/writers/bin/python"))


def _has_deepspeed() -> bool:
    if not DEEPSPEED_PYTHON.is_file():
        return False
    probe = subprocess.run([str(DEEPSPEED_PYTHON), "-c", "import deepspeed"], capture_output=True, env=_ds_env())
    return probe.returncode == 0


def _ds_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _full(slices: list[dict], shapes: dict, name: str) -> torch.Tensor:
    """A tensor joined from every rank's slice of it (ZeRO-3 partitions in rank order)."""
    return torch.cat([s[name].reshape(-1).double() for s in slices])[: math.prod(shapes[name])].reshape(shapes[name])


@pytest.mark.skipif(not _has_deepspeed(), reason=f"no DeepSpeed venv ({DEEPSPEED_PYTHON}; set RELEX_DEEPSPEED_PYTHON)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_moves_the_master_weights(tmp_path, precision):
    """DeepSpeed ZeRO-3 on 2 gloo ranks: the jump moves the optimizer's fp32 master partitions by
    exactly the dense RELEX move of the window (joined from both ranks' slices); the bf16 copies
    and the gathered weights the model computes with follow; the next step starts from the jump."""
    out = tmp_path / "run.pt"
    cmd = [str(DEEPSPEED_PYTHON), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [str(REPO / "tests" / "integrations" / "zero3_jump.py"), str(out), precision]
    result = subprocess.run(cmd, cwd=REPO, env=_ds_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    shapes = ranks[0]["shapes"]
    assert [h["ahead"] for h in ranks[0]["history"]] == [5, 5]
    assert ranks[0]["history"] == ranks[1]["history"]  # rank 0 decided for both
    full = {
        key: {s: {n: _full([r[key][s] for r in ranks], shapes, n) for n in shapes} for s in ranks[0][key]}
        for key in ("pre", "post")
    }
    for jump_step, anchor_step in ((5, 0), (10, 5)):
        steps = list(range(anchor_step + 1, jump_step + 1))
        for name in shapes:
            anchor = full["post"][anchor_step][name]
            snaps = [full["pre"][s][name] for s in steps]
            ahead = dense_relex(anchor, snaps, steps, jump_step + 5)
            want = snaps[-1] + ahead - dense_relex(anchor, snaps, steps, jump_step)
            got = full["post"][jump_step][name]
            moved = (want - snaps[-1]).norm()
            assert moved > 0 and (got - want).norm() <= 1e-5 * moved + 1e-6 * want.norm(), (precision, jump_step, name)
            gathered = ranks[0]["full"][jump_step][name].double()  # what the model computes with
            tol = 1e-7 if precision == "fp32" else 2**-8
            assert (gathered - got).abs().max() <= tol * got.abs().max(), (precision, name)
    # the step after the jump starts from it: the masters moved on by one step, not back
    for name in shapes:
        jump = (full["post"][5][name] - full["pre"][5][name]).norm()
        step = (full["pre"][6][name] - full["post"][5][name]).norm()
        assert step < 0.5 * jump, name
    if precision == "bf16":
        for r in ranks:
            for name, copy in r["mirrors"][5].items():
                assert torch.equal(copy, r["post"][5][name].to(copy.dtype)), name

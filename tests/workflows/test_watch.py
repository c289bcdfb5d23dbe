"""``relex-merge watch``: while it runs, checkpoints land in the run directory one at a time; its
Gram matrices (updated one row per checkpoint) must equal a fresh ``analyze``'s, the target the
backtest supports must be written and equal ``merge``'s output for the same window, and a
sketched Gram matrix must stay within its stated error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from relex_merge.core.sketch import CountSketch, relative_error_bound
from relex_merge.testing.synthetic import make_planted_run
from relex_merge.workflows.watch import Watcher
from tests.helpers import REPO, load_state, run_cli


def _grams(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _land(source: Path, run: Path, step: int) -> None:
    """A checkpoint appears the way trainers finish one: written aside, then renamed into place."""
    tmp = run / f".tmp-checkpoint-{step}"
    shutil.copytree(source / f"checkpoint-{step}", tmp)
    tmp.rename(run / f"checkpoint-{step}")


def _config(path: Path, run: Path, base: Path, **parameters) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "relex",
                "base_model": str(base),
                "trajectory": {"run_dir": str(run)},
                "parameters": {"target_step": 12, **parameters},
            }
        )
    )
    return path


@pytest.mark.slow
def test_watch_follows_a_growing_run(tmp_path):
    source = make_planted_run(tmp_path / "source", steps=range(1, 8), rate=1e-3)
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        _land(source, run, step)
    config = _config(tmp_path / "watch.yml", run, source / "base")
    out = tmp_path / "watching"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "relex_merge", "watch", str(config), "--out", str(out), "--poll", "0.3"]
    cmd += ["--settle", "0", "--max-wait", "120", "--threads", "1"]
    watch = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def windows() -> list[list[int]]:
        history = out / "watch.json"
        return [e["steps"] for e in json.loads(history.read_text())] if history.is_file() else []

    def wait_for(steps: list[int]) -> None:
        deadline = time.monotonic() + 120
        while steps not in windows():
            assert watch.poll() is None, watch.communicate()
            assert time.monotonic() < deadline, (steps, windows())
            time.sleep(0.2)

    try:
        wait_for([1, 2])
        for step in range(3, 8):
            _land(source, run, step)
            wait_for(list(range(1, step + 1)))
        history = json.loads((out / "watch.json").read_text())
        watch.send_signal(signal.SIGINT)
        stdout, stderr = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == 0, stderr
    assert "stopped" in stdout
    assert [e["gram"] for e in history] == ["fresh"] + ["updated"] * 5  # one new row per checkpoint after the first
    # the Gram matrices equal a fresh analyze's
    fresh = tmp_path / "fresh"
    analyze = _config(tmp_path / "analyze.yml", run, source / "base")
    result = run_cli("analyze", str(analyze), "--out", str(fresh), "--threads", "1")
    assert result.exit_code == 0, result.output
    watched, analyzed = _grams(out / "fit_cache.safetensors"), _grams(fresh / "fit_cache.safetensors")
    assert watched.keys() == analyzed.keys()
    # not bitwise: the engine sums float32 block products, and its blocks are sized by the window's
    # length, so a row computed when the window was shorter is summed in other blocks
    worst = 0.0
    for name in analyzed:
        scale = torch.outer(analyzed[name].diagonal(), analyzed[name].diagonal()).sqrt().clamp_min(1e-300)
        worst = max(worst, float(((watched[name] - analyzed[name]).abs() / scale).max()))
    assert worst <= 1e-5, worst  # float32 rounding (measured: 6e-7 here)
    print(f"Gram matrices: largest difference from analyze's {worst:.1e} of sqrt(G_jj G_kk)")
    assert json.loads((out / "analysis.json").read_text())["steps"] == list(range(1, 8))
    # the supported target was written, from the last window, as merge writes it
    written = [w["target"] for e in history for w in e["written"]]
    assert 12 in written
    assert history[-1]["verdicts"][0]["supported"]
    merged = tmp_path / "merged"
    result = run_cli("merge", str(analyze), str(merged), "--threads", "1", "-q")
    assert result.exit_code == 0, result.output
    got, want = load_state(out / "step-12"), load_state(merged)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6 * want[name].abs().max().item())


def test_watch_once_waits_then_updates_and_drops(tmp_path):
    source = make_planted_run(tmp_path / "source", steps=range(1, 7), rate=1e-3)
    run = tmp_path / "run"
    run.mkdir()
    _land(source, run, 1)
    watcher = Watcher(_config(tmp_path / "c.yml", run, source / "base"), tmp_path / "out", settle=0, write="never")
    first = watcher.poll()
    assert first.analysis is None and "at least 2" in first.waiting
    for step in range(2, 6):
        _land(source, run, step)
    assert watcher.poll().fresh
    _land(source, run, 6)
    shutil.rmtree(run / "checkpoint-1")  # save_total_limit: the trainer deleted the oldest
    update = watcher.poll()
    assert update.added == [6] and update.dropped == [1] and not update.fresh
    assert watcher.poll().analysis is None  # nothing new: no work
    fresh = Watcher(_config(tmp_path / "d.yml", run, source / "base"), None, settle=0)
    fresh.poll()
    for name, g in fresh.grams.items():
        scale = torch.outer(g.diagonal(), g.diagonal()).sqrt()
        assert ((watcher.grams[name] - g).abs() <= 1e-6 * scale + 1e-300).all(), name
    watcher.close()
    fresh.close()


def test_watch_needs_a_run_directory(tmp_path, qwen_run):
    config = tmp_path / "c.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "relex",
                "base_model": str(qwen_run / "base"),
                "models": [{"model": str(qwen_run / "checkpoint-1"), "parameters": {"step": 1}}],
            }
        )
    )
    result = run_cli("watch", str(config), "--once")
    assert result.exit_code == 2 and "trajectory" in result.output


def test_sketched_gram_within_its_bound(tmp_path):
    source = make_planted_run(tmp_path / "source", steps=range(1, 7), rate=1e-3, noise=3e-4)
    config = _config(tmp_path / "c.yml", source, source / "base")
    exact = Watcher(config, None, settle=0)
    exact.poll()
    width = 256
    sketched = Watcher(config, None, settle=0, sketch=width)
    update = sketched.poll()
    assert update.analysis is not None
    bound = relative_error_bound(width)
    worst = 0.0
    for name, g in exact.grams.items():
        s = sketched.grams[name]
        numel = exact.numels[name]
        scale = torch.outer(g.diagonal(), g.diagonal()).sqrt()
        if numel <= width:  # kept exactly (in float64; the engine's Gram rounds its deltas to float32)
            assert ((s - g).abs() <= 1e-6 * scale + 1e-300).all(), name
            continue
        worst = max(worst, float(((s - g).abs() / scale.clamp_min(1e-300)).max()))
    assert 0 < worst <= 6 * bound  # six standard deviations of the bound, over every entry
    exact.close()
    sketched.close()


def test_count_sketch_spans_and_expectation():
    sketch = CountSketch(64, seed=3)
    x = torch.randn(5000, dtype=torch.float64)
    whole = sketch.sketch("w", x, 0, 5000)
    parts = sum(sketch.sketch("w", x[lo : lo + 777], lo, 5000) for lo in range(0, 5000, 777))
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-12)  # spans of any size, one sketch
    assert not torch.equal(whole, CountSketch(64, seed=4).sketch("w", x, 0, 5000))
    y = x + 0.5 * torch.randn(5000, dtype=torch.float64)
    estimates = torch.tensor(
        [
            float(CountSketch(64, seed=s).sketch("w", x, 0, 5000) @ CountSketch(64, seed=s).sketch("w", y, 0, 5000))
            for s in range(200)
        ]
    )
    truth = float(x @ y)
    sd = relative_error_bound(64) * float(x.norm() * y.norm())
    assert abs(float(estimates.mean()) - truth) < 4 * sd / 200**0.5  # unbiased
    assert float(estimates.std()) <= sd  # within the bound


def test_watch_waits_only_for_a_short_window_and_shows_plan_warnings_once(tmp_path):
    """Any plan error containing "at least" used to be taken for "keep waiting", and the plan's
    warnings were never shown."""
    from safetensors.torch import load_file, save_file

    from relex_merge.common.errors import RelexError

    source = make_planted_run(tmp_path / "source", steps=range(1, 6), rate=1e-3)
    for step in (3, 4):  # saved in bf16 by a careless trainer
        ckpt = source / f"checkpoint-{step}"
        state = load_file(ckpt / "model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, ckpt / "model.safetensors", {"format": "pt"})
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        _land(source, run, step)
    watcher = Watcher(_config(tmp_path / "c.yml", run, source / "base", rank=3), None, settle=0, write="never")
    first = watcher.poll()
    assert first.analysis is None and first.waiting == "parameters.rank: 3 exceeds the 2 checkpoints in the window"
    _land(source, run, 3)
    update = watcher.poll()
    assert update.warnings == [
        f"{run / 'checkpoint-3'}: stored in bfloat16, the rest of the window in float32: the rounding enters "
        "the fit as movement; convert the window to one precision (relex-merge convert)"
    ]
    _land(source, run, 4)
    assert watcher.poll().warnings == []  # said once, though its text now says "(and 1 more)"
    watcher.close()
    strict = Watcher(
        _config(tmp_path / "d.yml", run, source / "base", fit="polynomial", degree=2, refit_every=1, refit_window=2),
        None,
        settle=0,
    )
    with pytest.raises(RelexError, match="needs at least 3 points per re-fit"):  # a longer window will not help
        strict.poll()
    strict.close()

"""The benchmark script runs at a tiny size and emits the table's columns (no timing asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_script_runs_and_prints_the_table(tmp_path):
    table = tmp_path / "table.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "bench.py"),
            "--size",
            "tiny",
            "--dtype",
            "bfloat16",
            "--window",
            "3",
            "--reps",
            "1",
            "--work",
            str(tmp_path / "work"),
            "--table",
            str(table),
            "--skip",
            "dense",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = table.read_text()
    header = (
        "| run | median wall (s) | peak RSS (GB) | input read (GB) | throughput (GB/s) | vs mergekit | vs I/O floor |"
    )
    assert header in text
    for row in (
        "relex-merge (1 target)",
        "relex-merge (3 targets)",
        "mergekit task_arithmetic",
        "read floor",
        "write floor",
        "relex-merge (1 process, --threads 1)",
        "relex-merge (torchrun, 2 processes x 1 thread)",
    ):
        assert f"| {row} |" in text
    assert "Command: `python bench/bench.py --size tiny --dtype bfloat16 --window 3 --reps 1 --skip dense`" in text


@pytest.mark.slow
def test_bench_zero_rows_run_on_a_deepspeed_window(tmp_path):
    """bench.py --zero on the ZeRO-3 window DeepSpeed wrote for the test fixtures (its references
    are DeepSpeed's own consolidations of the same saves, as make_zero_window.py writes them)."""
    import shutil

    fixture = REPO / "tests" / "fixtures" / "real_writers"
    work = tmp_path / "work"
    shutil.copytree(fixture / "base", work / "base")
    shutil.copytree(fixture / "deepspeed_zero3" / "ckpt" / "_actor", work / "ckpt")
    for step in (2, 4, 6):
        shutil.copytree(
            fixture / "deepspeed_zero3" / "reference" / f"step_{step}", work / "consolidated" / f"step_{step}"
        )
    table = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench.py"), "--zero", str(work), "--reps", "1", "--max-memory", "1GB"]
        + ["--table", str(table)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = table.read_text()
    assert "| run | median wall (s) | peak RSS (GB) | fp32 weights read (GB) |" in text
    assert "| relex-merge, ZeRO-3 window read from DeepSpeed's files (T=3, --max-memory 1GB) |" in text
    assert "| relex-merge, DeepSpeed's consolidations of the same saves (T=3, safetensors, --max-memory 1GB) |" in text
    assert "The two merges wrote the same bytes (15 tensors, checked)." in text

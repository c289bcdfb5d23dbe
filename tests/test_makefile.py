"""`make install`'s choice of torch build (issue 21): the CPU build unless told otherwise, from a
local wheel when pip already has one (this project's machines, offline), else from PyTorch's CPU
index (public PyPI's plain `torch` is the multi-GB CUDA build on Linux x86_64); a CUDA build when
TORCH_INDEX names one. The Makefile runs against a stand-in venv whose `python` records every call
and answers as a machine with or without a local wheel would."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

CPU = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def install(tmp_path: Path, local_wheel: bool, *variables: str) -> tuple[list[str], str]:
    """Run `make install` into a stand-in venv; (every call its python got, make's output)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    fake = venv / "bin" / "python"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in *--no-index*) exit $RELEX_FAKE_NO_INDEX;; esac\n'
        'case "$*" in -c*) echo "installed torch (stand-in)";; esac\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    done = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "install", f"VENV={venv}", "PYTHON=true", *variables],
        capture_output=True,
        text=True,
        env={**os.environ, "RELEX_FAKE_NO_INDEX": "0" if local_wheel else "1"},
    )
    assert done.returncode == 0, done.stderr
    assert (venv / ".installed").is_file()
    return log.read_text().splitlines(), done.stdout + done.stderr


def torch_calls(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("-m pip install") and "torch==" in c]


def test_a_local_cpu_wheel_is_used_offline(tmp_path):
    calls, output = install(tmp_path, local_wheel=True)
    assert torch_calls(calls) == ["-m pip install -qq --no-index --no-deps torch==2.13.0"]
    assert "-m pip install -qq -e .[test,plots]" in calls
    assert not [c for c in calls if "--index-url" in c]


def test_without_a_local_wheel_the_cpu_build_comes_from_pytorchs_cpu_index(tmp_path):
    calls, output = install(tmp_path, local_wheel=False)
    assert torch_calls(calls) == [
        "-m pip install -qq --no-index --no-deps torch==2.13.0",
        f"-m pip install -qq --no-deps --index-url {CPU} torch==2.13.0",
    ]
    # torch's own dependencies come with relex-merge's, after it
    assert calls.index("-m pip install -qq -e .[test,plots]") > calls.index(torch_calls(calls)[-1])


@pytest.mark.parametrize(
    "index,expected",
    [
        (
            "https://download.pytorch.org/whl/cu128",
            "-m pip install -qq --no-deps --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0",
        ),
        ("", "-m pip install -qq --no-deps torch==2.13.0"),  # pip's default index: CUDA on Linux x86_64
    ],
)
def test_a_cuda_build_is_asked_for_by_its_index(tmp_path, index, expected):
    calls, output = install(tmp_path, True, f"TORCH_INDEX={index}")
    assert torch_calls(calls) == [expected]  # no local-wheel shortcut: that is for the CPU build


def test_the_installer_is_quiet_and_says_what_it_did(tmp_path):
    """pip's progress and warnings (one "Location ... is ignored" line per package on this project's
    machines) are hidden; make's own lines say what is installed and how to see pip's output."""
    calls, output = install(tmp_path, local_wheel=True)
    pip = [c for c in calls if c.startswith("-m pip")]
    assert pip and all(" -qq " in c for c in pip)
    lines = output.strip().splitlines()
    assert lines[0].startswith(f"setting up {tmp_path / 'venv'}: torch==2.13.0 from {CPU}, then relex-merge")
    assert "VERBOSE=1 shows pip's output" in lines[0]
    assert lines[1:] == ["installed torch (stand-in)"]
    verbose, _ = install(tmp_path / "v", True, "VERBOSE=1")
    assert not [c for c in verbose if "-qq" in c]


def test_an_installed_venv_is_not_touched_again(tmp_path):
    calls, _ = install(tmp_path, local_wheel=True)
    again = subprocess.run(
        ["make", "-s", "-C", str(REPO), "install", f"VENV={tmp_path / 'venv'}", "PYTHON=true"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and "setting up" not in again.stdout
    assert (tmp_path / "calls").read_text().splitlines() == calls  # no pip run

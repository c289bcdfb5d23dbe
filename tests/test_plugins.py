"""Every extension point is one new file: a toy plug-in from tests/plugins/ (a fit family with a
shape parameter no other family has, an executor, an output format, a command) is put on its
folder's search path in a fresh process, found by the registry and used through the command line;
each output is compared with what the built-in plug-in it imitates writes. (The checkpoint-format
case is tests/io/test_registry.py::test_a_new_format_is_one_file.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import load_state, run_cli, write_config

PLUGINS = Path(__file__).resolve().parent / "plugins"
FOLDERS = {
    "fits": "relex_merge.core.fits",
    "executors": "relex_merge.engine.executors",
    "writers": "relex_merge.io.writers",
    "cli": "relex_merge.cli",
}


def run_with(folder: str, *argv: str, code: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``relex-merge ARGV`` (or ``code``) in a fresh process whose plug-in package for ``folder`` also
    looks in tests/plugins/FOLDER."""
    setup = f"import {FOLDERS[folder]} as package\npackage.__path__.append({str(PLUGINS / folder)!r})\n"
    body = code or "from relex_merge.cli import main\nmain(sys.argv[1:], prog_name='relex-merge')\n"
    return subprocess.run(
        [sys.executable, "-c", "import sys\n" + setup + body, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_a_fit_family_with_a_new_shape_parameter_is_one_file(qwen_run, tmp_path):
    steps = [1, 2, 3, 4, 5, 6]
    toy = write_config(tmp_path / "toy.yml", qwen_run, steps, 12, parameters={"fit": "powq", "q": 0.5})
    power = write_config(tmp_path / "power.yml", qwen_run, steps, 12, parameters={"fit": "power", "p": 0.5})
    done = run_with("fits", str(toy), str(tmp_path / "toy"))
    assert done.returncode == 0, done.stderr
    assert run_cli(str(power), str(tmp_path / "power")).exit_code == 0
    got, expected = load_state(tmp_path / "toy"), load_state(tmp_path / "power")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    written = yaml.safe_load((tmp_path / "toy" / "relex_config.yml").read_text())["parameters"]
    assert (written["fit"], written["q"]) == ("powq", 0.5)
    # the key is validated from the declaration like the built-in ones
    wrong = write_config(tmp_path / "wrong.yml", qwen_run, steps, 12, parameters={"fit": "linear", "q": 0.5})
    refused = run_with("fits", str(wrong), str(tmp_path / "wrong"))
    assert refused.returncode == 2
    assert refused.stderr.strip() == f"error: {wrong}: parameters.q: only used by fit: powq (fit is linear)"
    # the mergekit method's parameters and analyze's family table come from the declarations too
    names = run_with(
        "fits",
        code="from relex_merge.interop.mergekit_method import RELEX_METHOD\n"
        "print(' '.join(p.name for p in RELEX_METHOD.spec.parameters))\n",
    )
    shapes = names.stdout.split()[names.stdout.split().index("base_step") + 1 :]
    assert shapes == sorted(shapes) and {"q", "p", "degree", "tau", "alpha"} <= set(shapes)
    analysis = run_with("fits", "analyze", str(toy), "--json", "-q")
    rows = {row["family"]: row["fit"] for row in json.loads(analysis.stdout)["families"]}
    assert rows["powq"].startswith("powq (q=")


@pytest.mark.slow
def test_an_executor_is_one_file_and_one_flag(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 4, 5, 6], 12)
    mark = tmp_path / "ran"
    done = run_with(
        "executors",
        str(cfg),
        str(tmp_path / "serial"),
        "--executor",
        "serial",
        env={"RELEX_TOY_EXECUTOR_MARK": str(mark)},
    )
    assert done.returncode == 0, done.stderr
    assert mark.read_text() == f"{len(load_state(qwen_run / 'base'))} tensors"
    assert run_cli(str(cfg), str(tmp_path / "threads")).exit_code == 0
    for shard in ("model.safetensors",):
        assert (tmp_path / "serial" / shard).read_bytes() == (tmp_path / "threads" / shard).read_bytes()
    unknown = run_cli(str(cfg), str(tmp_path / "x"), "--executor", "serial")
    assert unknown.exit_code == 2
    assert "--executor: unknown executor 'serial' (known: distributed, threads)" in unknown.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_an_output_format_is_one_file_and_one_flag(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 4, 5, 6], 12)
    done = run_with("writers", str(cfg), str(tmp_path / "toy"), "--output-format", "torchfile")
    assert done.returncode == 0, done.stderr
    assert run_cli(str(cfg), str(tmp_path / "st")).exit_code == 0
    got = torch.load(tmp_path / "toy" / "model.pt", weights_only=True)
    expected = load_state(tmp_path / "st")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    converted = run_with(
        "writers", "convert", str(qwen_run / "checkpoint-3"), str(tmp_path / "conv"), "--output-format", "torchfile"
    )
    assert converted.returncode == 0, converted.stderr
    source = load_state(qwen_run / "checkpoint-3")
    got = torch.load(tmp_path / "conv" / "model.pt", weights_only=True)
    assert got.keys() == source.keys() and all(torch.equal(got[k], source[k]) for k in got)


def test_a_command_is_one_file():
    listed = run_with("cli", "--help")
    assert listed.returncode == 0 and "hello" in listed.stdout
    done = run_with("cli", "hello", "world")
    assert (done.returncode, done.stdout) == (0, "hello world\n")
    failed = run_with("cli", "hello", "world", "--fail")
    assert failed.returncode == 2
    assert failed.stderr.strip() == "error: hello: cannot greet world"

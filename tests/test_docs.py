"""README.md and docs/ say what the code does: scripts/check_docs.py's static checks in every run
(links, copied tables, quoted measurements, synopses against the commands' flags, YAML), every
block of every page run as a slow test (CI), and the check itself shown to fail on pages that
are wrong."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO


def _check_docs():
    spec = importlib.util.spec_from_file_location("check_docs", REPO / "scripts" / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_docs", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_readme_fits_on_a_screen_and_links_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for page in sorted((REPO / "docs").glob("*.md")):
        if page.name != "timings.json":
            assert f"](docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def test_the_static_checks_pass():
    docs = _check_docs()
    assert docs.static_problems(docs.pages()) == []


def test_the_quoted_measurements_come_from_the_script():
    """docs/timings.json is what `check_docs.py --timings` writes, and the pages quote its phrases."""
    docs = _check_docs()
    if os.environ.get(docs.UNQUOTED):
        pytest.skip("check_docs.py --timings is measuring this run: docs/timings.json is being made")
    timings = json.loads((REPO / "docs" / "timings.json").read_text())
    assert {"make_install", "make_demo", "make_test", "tests", "example"} <= set(timings["values"])
    assert timings["phrases"] == {k: docs.phrase(k, v) for k, v in timings["values"].items() if k != "install_lines"}
    quoted = "\n".join(p.read_text() for p in docs.pages())
    for key in ("make_install", "make_demo", "make_test", "example"):
        assert f"{timings['phrases'][key]}<!-- measured: {key} -->" in quoted


def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent(text))
    return page


def test_the_static_checks_catch_wrong_pages(tmp_path, monkeypatch):
    monkeypatch.delenv("RELEX_DOCS_UNQUOTED", raising=False)  # quotes checked even while --timings measures
    docs = _check_docs()
    monkeypatch.setattr(docs, "load_timings", lambda: {"values": {"make_demo": 185.0}})
    page = _page(
        tmp_path,
        """\
        A [link](nowhere.md) and `make demo` takes about 2 minutes<!-- measured: make_demo -->.

        <!-- include: demo/more_runs.md -->
        an old copy
        <!-- end include -->

        <!-- numbers-from: demo/more_runs.md -->
        The line scored 0.999 at 9.5x.
        <!-- end numbers -->

        <!-- docs-check: synopsis -->
        ```text
        relex-merge eval MODEL --tasks T [--include-path DIR] [--limit N] [--device D] [--batch-size N]
                         [-v] [--frobnicate]
        ```

        <!-- docs-check: skip -->
        ```bash
        true
        ```

        <!-- docs-check: sometimes -->
        ```yaml
        merge_method: relex
        base_model: b
        parameters: {target_step: 4, rnak: 1}
        ```

        ```toml
        a = 1
        ```
        """,
    )
    problems = docs.static_problems([page])
    text = "\n".join(problems)
    assert "link to nowhere.md, which does not exist" in text
    assert "make_demo was measured as '3 minutes' (docs/timings.json), but the page says" in text
    assert "the copy of demo/more_runs.md is not current" in text
    assert "0.999 is in no file it is said to come from" in text
    assert "the synopsis of `relex-merge eval` omits --output" in text
    assert "the synopsis of `relex-merge eval` shows --frobnicate, which it does not have" in text
    assert "a skip needs a reason" in text
    assert "unknown docs-check marker 'sometimes'" in text
    assert "unknown key 'parameters.rnak' (did you mean 'rank'?)" in text
    assert "a ```toml block, which the check neither runs nor reads" in text
    assert len(problems) == 10, problems


def test_a_page_whose_commands_fail_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.delenv("RELEX_DOCS_UNQUOTED", raising=False)  # quotes checked even while --timings measures
    """Blocks run in a copy of the repository, in order, sharing it; an exit status other than
    the one shown, output other than shown, or a timed block far slower than measured fail."""
    docs = _check_docs()
    page = _page(
        tmp_path,
        """\
        <!-- docs-check: file out/hello.txt -->
        ```text
        hello from a file block
        ```

        ```bash
        cat out/hello.txt && test -f pyproject.toml && test -x .venv/bin/relex-merge
        ```

        <!-- docs-check: output -->
        ```text
        hello from … block
        ```

        <!-- docs-check: exit 2 -->
        ```bash
        relex-merge merge_configs/nowhere.yml out/x
        ```

        <!-- docs-check: output -->
        ```text
        error: merge_configs/nowhere.yml: config file not found
        ```

        ```python
        print("python", 1 + 1)
        ```

        <!-- docs-check: output -->
        ```text
        python 3
        ```

        <!-- docs-check: timed quick -->
        ```bash
        true
        ```

        <!-- docs-check: timed quick -->
        ```bash
        sleep 3
        ```

        ```bash
        exit 3
        ```

        <!-- docs-check: skip (shown, not run) -->
        ```bash
        exit 4
        ```
        """,
    )
    timings = {"values": {"quick": 0.5}}
    monkeypatch.setattr(docs, "SLACK_FACTOR", 2.5)
    monkeypatch.setattr(docs, "SLACK_SECONDS", 1.5)  # 2.5 x 0.5 + 1.5 = 2.75 s allowed
    outcomes = docs.run_page(page, Path(sys.prefix), timings, timeout=120, log=lambda line: None)
    got = [(o.block.line, o.status) for o in outcomes]
    assert got == [
        (2, "file"),
        (6, "ok"),
        (11, "ok"),
        (16, "ok"),
        (21, "ok"),
        (25, "ok"),
        (30, "FAIL"),  # printed 2, the page says 3
        (35, "ok"),
        (40, "FAIL"),  # 3 s, more than the 2.75 s allowed
        (44, "FAIL"),
        (49, "skip"),
    ], got
    assert "not in the output of line 25: 'python 3'" in outcomes[6].note
    assert "more than the 3 s allowed" in outcomes[8].note
    assert "exit status 3, expected 0" in outcomes[9].note
    assert outcomes[10].note == "shown, not run"
    assert not any(Path(tmp_path).glob("relex-docs-*"))


@pytest.mark.slow
def test_every_command_in_the_docs_runs():
    """The whole check: every block of README.md and docs/*.md (a few minutes)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_docs.py")],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
        timeout=3600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]

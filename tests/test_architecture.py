"""The house keeps its shape: no import circle, no upward import, in-function imports of our own
modules only where scripts/architecture.py says why, and docs/architecture.md is what the code
says today."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from tests.helpers import REPO


def _architecture():
    spec = importlib.util.spec_from_file_location("architecture", REPO / "scripts" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("architecture", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_no_circle_no_upward_import_and_every_lazy_import_explained():
    arch = _architecture()
    assert arch.problems(arch.load_modules()) == []


def test_the_rules_notice_an_upward_import_and_a_circle():
    arch = _architecture()
    modules = arch.load_modules()
    modules["relex_merge.core.relex"].top.add("relex_merge.workflows.merge")  # core reaching up
    found = arch.problems(modules)
    assert any(
        line.startswith("upward import: relex_merge.core.relex (core) imports relex_merge.workflows.merge")
        for line in found
    )
    assert any(line.startswith("import circle:") and "relex_merge.core.relex" in line for line in found)


def test_the_architecture_page_is_current():
    arch = _architecture()
    assert (REPO / "docs" / "architecture.md").read_text() == arch.render(arch.load_modules()), (
        "docs/architecture.md is stale: run python scripts/architecture.py --write"
    )


def test_the_command_line_starts_without_torch():
    """`relex-merge --help` and every command's flags load without torch (commands import what they
    run when they run)."""
    code = (
        "import sys, relex_merge.cli as cli\ncli.REGISTRY.all()\nimport relex_merge.config.options\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"

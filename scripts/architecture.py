"""The package's architecture, read from its code: layers, the import graph, and the picture in
docs/architecture.md (generated here, so it cannot drift: tests/test_architecture.py runs
``--check``).

    python scripts/architecture.py            # print the problems (circles, upward imports); exit 1 if any
    python scripts/architecture.py --write    # regenerate docs/architecture.md
    python scripts/architecture.py --check    # exit 1 if docs/architecture.md is not what --write would write

Rules: a module may import modules of its own layer or of the layers below it, never above; no
import circle, counting imports inside functions too; an import of the package's own modules
inside a function is allowed only where LAZY says why (start-up time).
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "relex_merge"
DOC = ROOT / "docs" / "architecture.md"

# Bottom first. A module's layer is its first package under relex_merge/ ("" for the top-level
# API: relex_merge/__init__.py and __main__.py).
LAYERS: list[tuple[str, tuple[str, ...], str]] = [
    ("common", ("common",), "errors, units, progress, the plug-in registry: imports nothing of ours"),
    ("core", ("core",), "the RELEX math, fit families, backtests, verdicts: pure torch, no IO"),
    ("io", ("io",), "checkpoint readers (formats/), output sinks (writers/), dtypes, fingerprints"),
    ("engine", ("engine",), "the streaming engine: jobs, span tasks, the process group, sharding, executors"),
    ("config", ("config",), "what the user asks for: YAML schema, trajectory discovery, stages, run options"),
    ("output", ("output",), "output folders, model cards, provenance, plots, the sink lifecycle"),
    ("adapters", ("evaluation", "interop"), "lm-eval and mergekit"),
    ("workflows", ("workflows", "integrations"), "what the commands do, as library calls; trainer integrations"),
    ("cli", ("cli",), "the command line: one file per command"),
    ("api", ("",), "the lazy top-level API (relex_merge.run_merge, ...) and python -m relex_merge"),
    ("testing", ("testing",), "fixtures for tests and demos (tiny models, planted runs): not used by the tool"),
]

# In-function imports of our own modules that are there on purpose: (importer prefix, imported
# prefix, why). Everything else is imported at the top of its module.
LAZY: list[tuple[str, str, str]] = [
    (
        "relex_merge.cli.",
        "relex_merge.",
        "a command imports what it runs when it runs, so `relex-merge --help` does not load torch",
    ),
    (
        "relex_merge.config.options",
        "relex_merge.engine",
        "the CLI builds its flags from Options at start-up; the engine (torch) loads only when a command runs",
    ),
    (
        "relex_merge.config.options",
        "relex_merge.io.writers",
        "as above: output formats are looked up when a command runs",
    ),
    (
        "relex_merge.interop.mergekit_runner",
        "relex_merge.interop.mergekit_method",
        "mergekit takes seconds to import; only mergekit stages need it",
    ),
]


@dataclass
class Module:
    name: str
    path: Path
    summary: str
    top: set[str] = field(default_factory=set)  # our modules imported at module level
    lazy: set[str] = field(default_factory=set)  # ... inside functions


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(target: str, names: list[str], known: set[str]) -> set[str]:
    """The modules ``from target import names`` loads: target.name where that is a module, else target."""
    out = set()
    for name in names:
        out.add(f"{target}.{name}" if f"{target}.{name}" in known else target)
    return out


def load_modules() -> dict[str, Module]:
    paths = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules: dict[str, Module] = {}
    for path in paths:
        tree = ast.parse(path.read_text())
        paragraph = " ".join((ast.get_docstring(tree) or "").strip().split("\n\n")[0].split())
        first = paragraph.split(". ")[0].rstrip(".")
        modules[_module_name(path)] = Module(_module_name(path), path, first + ("." if first else ""))
    known = set(modules)
    for module in modules.values():
        tree = ast.parse(module.path.read_text())
        _collect(tree, module, known, in_function=False)
    return modules


def _collect(node: ast.AST, module: Module, known: set[str], in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
        inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
        found: set[str] = set()
        if isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").split(".")[0] == PACKAGE:
            found = _resolve(child.module, [a.name for a in child.names], known)
        elif isinstance(child, ast.Import):
            found = {a.name for a in child.names if a.name.split(".")[0] == PACKAGE}
        if found:
            (module.lazy if inside else module.top).update(found - {module.name})
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            continue  # typing only: not an import at run time
        _collect(child, module, known, inside)


def _is_type_checking(test: ast.AST) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def layer_of(name: str) -> int:
    parts = name.split(".")
    first = parts[1] if len(parts) > 1 else ""
    if first in ("__main__",):
        first = ""
    for i, (_, packages, _) in enumerate(LAYERS):
        if first in packages:
            return i
    raise SystemExit(f"{name}: in no layer of scripts/architecture.py LAYERS; add its package there")


def _lazy_reason(importer: str, imported: str) -> str | None:
    for prefix, target, why in LAZY:
        if importer.startswith(prefix) and imported.startswith(target):
            return why
    return None


def problems(modules: dict[str, Module]) -> list[str]:
    out = []
    for module in modules.values():
        for target in sorted(module.top | module.lazy):
            if layer_of(target) > layer_of(module.name):
                out.append(
                    f"upward import: {module.name} ({LAYERS[layer_of(module.name)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
        for target in sorted(module.lazy - module.top):
            if _lazy_reason(module.name, target) is None:
                out.append(
                    f"in-function import: {module.name} imports {target} inside a function (import it at the "
                    "top, or say why in LAZY)"
                )
    out += [f"import circle: {' -> '.join(cycle)}" for cycle in cycles(modules)]
    return out


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Every elementary circle found by a depth-first search (one per back edge)."""
    graph = {name: sorted((m.top | m.lazy) & set(modules)) for name, m in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def _group(name: str) -> str:
    """The box a module is drawn in: its first package (``api`` for the top level)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else "api"


def render(modules: dict[str, Module]) -> str:
    edges = sorted(
        {(_group(m.name), _group(t)) for m in modules.values() for t in m.top | m.lazy if _group(m.name) != _group(t)}
    )
    lines = [
        "# Architecture",
        "",
        "Generated by `python scripts/architecture.py --write` from the package's imports; "
        "`tests/test_architecture.py` fails when this page or the code breaks the rules below.",
        "",
        "Layers, bottom first. A module imports its own layer or the layers below it, never above; there is no "
        "import circle; imports of our own modules inside functions are listed at the end with the reason.",
        "",
        "```mermaid",
        "flowchart BT",
    ]
    present = {_group(name) for name in modules}
    for name, packages, _ in LAYERS:
        boxes = [p or "api" for p in packages if (p or "api") in present]
        lines.append(f'  subgraph layer_{name}["{name}"]')
        lines += [f"    {box}[{box}]" for box in boxes]
        lines.append("  end")
    lines += [f"  {a} --> {b}" for a, b in edges]
    lines += ["```", "", "| layer | packages | what it holds |", "|---|---|---|"]
    for name, packages, what in LAYERS:
        shown = ", ".join(
            f"`{p}/`" if p else "`__init__.py`, `__main__.py`" for p in packages if (p or "api") in present
        )
        lines.append(f"| {name} | {shown} | {what} |")
    lines += ["", "## Modules", ""]
    for name in sorted(modules, key=lambda n: (layer_of(n), n)):
        path = modules[name].path.relative_to(ROOT)
        lines.append(f"- `{path}`: {modules[name].summary}")
    lines += ["", "## Imports inside functions", ""]
    for m in sorted(modules.values(), key=lambda m: m.name):
        for target in sorted(m.lazy - m.top):
            lines.append(f"- `{m.name}` -> `{target}`: {_lazy_reason(m.name, target)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="regenerate docs/architecture.md")
    parser.add_argument("--check", action="store_true", help="fail if docs/architecture.md is stale")
    args = parser.parse_args(argv)
    modules = load_modules()
    found = problems(modules)
    for line in found:
        print(line, file=sys.stderr)
    text = render(modules)
    if args.write:
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    if args.check and (not DOC.is_file() or DOC.read_text() != text):
        print(f"{DOC.relative_to(ROOT)} is stale: run python scripts/architecture.py --write", file=sys.stderr)
        return 1
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

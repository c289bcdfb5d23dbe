#!/usr/bin/env python
"""Mutation testing of the modules where a silent bug ruins a model (mutmut 3).

    pip install -e '.[test,mutation]'
    python scripts/mutation.py                          # every module in MODULES below
    python scripts/mutation.py relex_merge/fit.py       # one module (any path in MODULES)
    python scripts/mutation.py --resume relex_merge/fit.py   # re-test only its last survivors
    python scripts/mutation.py relex_merge/workflows/plan.py --tests 'tests/cli/test_validation.py'   # any other module

Each module is mutated on its own copy of the package (``mutants/<module>/``, git-ignored; the
working tree is never touched) and tested against a scoped selection of fast tests: mutmut runs,
for each mutant, only those tests of the selection that call the mutated function. The table at
the end gives killed / survived / timeout / total per module; survivors listed in
tests/mutation_equivalents.md (one line each on why the mutant cannot change any output) are
counted apart, and every other survivor is printed with its diff. ``--strict`` exits 1 when any
survivor is not listed there. Columns: "other" is mutants no selected test reaches (mutmut's "no
tests") or that crashed mutmut's runner; "% killed" is killed / total; "score %" is the usual
mutation score, (killed + timeout) / (total - equivalent).

mutmut mutates function bodies only: module constants, class attributes and decorated functions
(properties, ``functools.lru_cache``) are never mutated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "mutants"
EQUIVALENTS = ROOT / "tests" / "mutation_equivalents.md"

# module (a path or glob; edit here when a module moves) -> (pytest arguments selecting the tests
# that exercise it, the functions to mutate or None for all; a method is written ǁClassǁmethod, as
# mutmut names it). For each mutant mutmut runs only the selected tests that call the mutated
# function. Slow end-to-end tests (CLI runs, mergekit) are left out: they kill nothing the unit
# tests do not, at 10-100x the time.
_E2E = "not end_to_end and not mergekit and not require_supported and not plain_merge"
_MATH_TESTS = ["tests/core/test_relex.py", "tests/core/test_fits.py", "-k", _E2E]
_BACKTEST_TESTS = [
    "tests/core/test_backtest.py",
    "tests/core/test_fits.py",
    "tests/workflows/test_analyze.py",
    "-k",
    _E2E + " and not cli and not fit_cache",
]
_ENGINE_TESTS = ["tests/core/test_relex.py", "tests/engine/test_engine.py", "tests/engine/test_tasks.py"]
MODULES: dict[str, tuple[list[str], list[str] | None]] = {
    "relex_merge/core/relex.py": (_MATH_TESTS, None),
    "relex_merge/core/fits/*.py": (_MATH_TESTS, None),
    "relex_merge/core/kernels.py": (
        ["tests/core/test_relex.py", "tests/engine/test_engine.py", "tests/core/test_kernels.py"],
        None,
    ),
    "relex_merge/core/backtest.py": (_BACKTEST_TESTS, None),
    "relex_merge/core/verdict.py": (_BACKTEST_TESTS, None),
    "relex_merge/io/writers/safetensors.py": (
        ["tests/engine/test_engine.py", "tests/io/test_writer.py", "-k", "writer"],
        None,
    ),
    # the engine's span/row bookkeeping and the Gram summation, not the scheduler's threading
    "relex_merge/engine/tasks.py": (
        _ENGINE_TESTS,
        ["plan_spans", "row_ranges", "chunk_rows", "ǁ_TensorStateǁadd_gram"],
    ),
    # the reader every merge of HF checkpoints uses: header parsing, size checks, row spans
    "relex_merge/io/formats/safetensors.py": (
        [
            "tests/io/test_registry.py",
            "tests/io/test_formats.py",  # fault-injected reads: short, failed, past the end
            "tests/engine/test_engine.py",
            "tests/cli/test_validation.py",
            "-k",
            "not end_to_end",
        ],
        None,
    ),
}


@dataclass
class Score:
    module: str
    killed: int = 0
    survived: int = 0
    equivalent: int = 0
    timeout: int = 0
    other: int = 0  # no tests, segfault, suspicious, not checked
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.killed + self.survived + self.equivalent + self.timeout + self.other

    @staticmethod
    def percent(n: int, of: int) -> str:
        return f"{100 * n / of:.1f}" if of else "-"


def slug(module: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", module.removesuffix(".py")).strip("_")


def equivalents() -> dict[str, str]:
    """Mutant name -> the line that explains it, from tests/mutation_equivalents.md."""
    found = {}
    if EQUIVALENTS.exists():
        for line in EQUIVALENTS.read_text().splitlines():
            for name in re.findall(r"`(relex_merge\.[^`]+__mutmut_\d+)`", line):
                found[name] = line.strip()
    return found


def pyproject(module: str, tests: list[str]) -> str:
    """The project's pyproject.toml (for pytest's settings) with a [tool.mutmut] section."""
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"\n\[tool\.mutmut\].*?(?=\n\[|\Z)", "", text, flags=re.S)
    section = {
        "source_paths": ["relex_merge/"],
        "only_mutate": [module],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
        "process_isolation": "forkserver",  # torch is not fork-safe once its threads have started
        "use_git_change_detection": False,
    }
    lines = [f"{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in section.items()]
    return text.rstrip() + "\n\n[tool.mutmut]\n" + "\n".join(lines) + "\n"


def mutmut(workdir: Path, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [
        sys.executable,
        "-c",
        "import sys; from mutmut.__main__ import cli; sys.argv[0] = 'mutmut'; cli()",
        *args,
    ]
    return subprocess.run(
        command,
        cwd=workdir,
        env=env,
        text=True,
        check=False,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


_SHOW = """
import sys
from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant
for name in sys.stdin.read().split():
    print(name)
    print(get_diff_for_mutant(name, path=find_mutant(name).path))
    print("\\0")
"""


def diffs(workdir: Path, names: list[str]) -> list[str]:
    """``mutmut show`` of each mutant, in one process."""
    if not names:
        return []
    done = subprocess.run(
        [sys.executable, "-c", _SHOW], cwd=workdir, input="\n".join(names), text=True, capture_output=True, check=False
    )
    shown = [block.strip() for block in done.stdout.split("\0")][: len(names)]
    return shown + [f"{name} (no diff: {done.stderr.strip()[-200:]})" for name in names[len(shown) :]]


def prepare(workdir: Path, module: str, tests: list[str], resume: bool) -> None:
    if workdir.exists() and not resume:
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("relex_merge", "tests"):
        target = workdir / folder
        if folder == "tests" or not resume or not target.exists():  # on resume the sources stay as mutated
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / folder, target, ignore=ignore)
    (workdir / "pyproject.toml").write_text(pyproject(module, tests))


def results(workdir: Path) -> dict[str, str]:
    """Mutant name -> status, read from mutmut's per-file result files."""
    from mutmut.stats import status_by_exit_code

    statuses = {}
    for meta in (workdir / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        for name, code in data.get("exit_code_by_key", {}).items():
            statuses[name] = status_by_exit_code[code]
    return statuses


def readable(functions: list[str]) -> str:
    return ", ".join(f.replace("ǁ", ".").strip(".") for f in functions)


def selected(name: str, functions: list[str] | None) -> bool:
    if functions is None:
        return True
    function = name.rsplit(".", 1)[-1].rsplit("__mutmut_", 1)[0]
    return any(function in (f"x_{f}", f"x{f}") for f in functions)


def tally(label: str, statuses: dict[str, str], keep, known: dict[str, str], seconds: float) -> tuple[Score, list[str]]:
    """The score of the mutants ``keep`` accepts, and the names of those not explained."""
    score, unexplained = Score(label, seconds=seconds), []
    for name, status in sorted(statuses.items()):
        if not keep(name):
            continue
        if status == "killed":
            score.killed += 1
        elif status == "timeout":
            score.timeout += 1
        elif status == "survived" and name in known:
            score.equivalent += 1
        elif status == "survived":
            score.survived += 1
            unexplained.append(name)
        else:
            score.other += 1
            unexplained.append(name)
    return score, unexplained


def run_module(
    module: str, tests: list[str], functions: list[str] | None, focus: list[str] | None, args, known: dict[str, str]
) -> list[Score]:
    """Mutate ``functions`` (None: every function) of ``module``; score them, and ``focus`` apart."""
    workdir = WORK / slug(module)
    previous = results(workdir) if args.resume and (workdir / "mutants").exists() else {}
    prepare(workdir, module, tests, args.resume)
    patterns = (
        []
        if functions is None
        else [f"relex_merge.*.x{'' if f.startswith('ǁ') else '_'}{f}__mutmut_*" for f in functions]
    )
    if previous:  # only what was not killed last time
        patterns = [n for n, s in previous.items() if s != "killed" and selected(n, functions)]
    start = time.monotonic()
    if previous and not patterns:
        print(f"== {module}: every mutant was killed last time; nothing to re-test", flush=True)
        done = subprocess.CompletedProcess([], 0, "")
    else:
        print(
            f"== {module}: mutmut run ({len(patterns) or 'all'} mutant patterns) in {workdir.relative_to(ROOT)}",
            flush=True,
        )
        done = mutmut(workdir, "run", "--max-children", str(args.jobs), *patterns, capture=True)
        (workdir / "mutmut-run.log").write_text(done.stdout)
    seconds = time.monotonic() - start
    statuses = results(workdir)
    if done.returncode != 0 or not statuses:
        print(done.stdout[-3000:])
        raise SystemExit(f"mutmut failed on {module} (exit {done.returncode}); see {workdir}/mutmut-run.log")
    label = module if functions is None else f"{module} ({readable(functions)})"
    score, unexplained = tally(label, statuses, lambda n: selected(n, functions), known, seconds)
    scores = [score]
    if focus is not None and functions is None:  # the whole module, and the functions MODULES names
        scores.append(tally(f"{module} ({readable(focus)})", statuses, lambda n: selected(n, focus), known, seconds)[0])
    stale = [n for n, status in statuses.items() if n in known and status != "survived" and selected(n, functions)]
    if stale:
        now = ", ".join(sorted({statuses[n] for n in stale}))
        print(f"   listed as equivalent in {EQUIVALENTS.name} but {now}: {', '.join(sorted(stale))}")
    report = [f"{statuses[name]}: {diff}\n" for name, diff in zip(unexplained, diffs(workdir, unexplained))]
    (workdir / "survivors.txt").write_text("\n".join(report))
    if report and not args.quiet:
        print("\n".join(report))
    print(
        f"   {score.killed} killed, {score.survived} survived, {score.equivalent} equivalent, "
        f"{score.timeout} timeout, {score.other} other, in {seconds:.0f} s",
        flush=True,
    )
    return scores


def table(scores: list[Score]) -> str:
    head = ("module", "killed", "survived", "equivalent", "timeout", "other", "total", "% killed", "score %", "time")
    rows = [head] + [
        (
            s.module,
            str(s.killed),
            str(s.survived),
            str(s.equivalent),
            str(s.timeout),
            str(s.other),
            str(s.total),
            s.percent(s.killed, s.total),
            s.percent(s.killed + s.timeout, s.total - s.equivalent),
            f"{s.seconds / 60:.1f} min",
        )
        for s in scores
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("modules", nargs="*", help=f"module paths from MODULES (default: all of {list(MODULES)})")
    parser.add_argument(
        "--tests",
        type=shlex.split,
        metavar="'PYTEST ARGS'",
        help="pytest arguments selecting the tests, one quoted string (for a module not in MODULES, "
        "or to override its selection), e.g. --tests 'tests/test_x.py -k \"not slow\"'",
    )
    parser.add_argument(
        "--all-functions", action="store_true", help="mutate every function of a module that MODULES restricts to a few"
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="mutants tested at once")
    parser.add_argument(
        "--resume", action="store_true", help="keep the last run's mutants and results; re-test only those not killed"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a survivor is not listed in tests/mutation_equivalents.md"
    )
    parser.add_argument("--quiet", action="store_true", help="do not print the survivors' diffs")
    args = parser.parse_args()
    try:
        import mutmut  # noqa: F401
    except ImportError:
        parser.error("mutmut is not installed: pip install -e '.[mutation]'")

    wanted = args.modules or list(MODULES)
    known = equivalents()
    scores = []
    for module in wanted:
        if module in MODULES:
            tests, functions = MODULES[module]
        elif args.tests:
            tests, functions = args.tests, None
        else:
            parser.error(f"{module} is not in MODULES (scripts/mutation.py): give its tests with --tests")
        if args.tests:
            tests = args.tests
        if not list(ROOT.glob(module)):
            print(f"== {module}: no such file here, skipped (update MODULES in scripts/mutation.py)")
            continue
        scores += run_module(module, tests, None if args.all_functions else functions, functions, args, known)
    from importlib.metadata import version

    print(
        f"\nmutmut {version('mutmut')}, {time.strftime('%Y-%m-%d')}, {platform.machine()} with "
        f"{os.cpu_count()} CPUs, {args.jobs} at once"
    )
    print(table(scores))
    unexplained = sum(s.survived + s.other for s in scores)
    if unexplained:
        print(
            f"\n{unexplained} mutants survived that tests/mutation_equivalents.md does not explain "
            f"(diffs in mutants/<module>/survivors.txt)"
        )
    return 1 if args.strict and unexplained else 0


if __name__ == "__main__":
    sys.exit(main())

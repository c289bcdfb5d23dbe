#!/usr/bin/env python
"""Every command in README.md and docs/*.md, run; every number they quote, checked against the
script that made it.

    python scripts/check_docs.py                 # run every block of every page (a few minutes)
    python scripts/check_docs.py --only docs/cli.md   # one page (repeatable)
    python scripts/check_docs.py --static        # only the fast checks below, no block run (seconds)
    python scripts/check_docs.py --list          # every block and what happens to it
    python scripts/check_docs.py --sync          # rewrite the included regions from their files
    python scripts/check_docs.py --timings       # measure set-up, demo, suite from nothing (~30 min);
                                                 # writes docs/timings.json, which the pages quote

Run it with the project's virtual environment (``.venv/bin/python scripts/check_docs.py``): the
blocks use that environment's ``relex-merge``, ``python``, ``make`` targets.

Blocks. A fenced block runs by its language: ``bash``/``sh`` as one bash script (``set -eo
pipefail``), ``python`` with the environment's python, ``yaml`` is parsed (a ``merge_method:
relex`` document is validated as a config: unknown keys are errors). ``text`` blocks are not run.
Each page runs in its own scratch copy of the repository (the files git tracks or would track,
with ``.venv`` standing for the environment running this script, already installed), from its
root, offline; its blocks run in order and share that copy. An HTML comment on a line of its own
just before a block changes what happens to it (several may be stacked):

    <!-- docs-check: skip (REASON) -->   not run; REASON is required and the report lists it
    <!-- docs-check: exit N -->          the block must exit with status N (it shows an error)
    <!-- docs-check: output -->          (a text block) every line must appear in the output of the
                                         block before it; "…" in a line stands for anything
    <!-- docs-check: file PATH -->       the block is written to PATH in the scratch copy (not run)
    <!-- docs-check: synopsis -->        (a text block) each `relex-merge [COMMAND]` entry shows every
                                         flag of that command, and no flag it does not have
    <!-- docs-check: timed KEY -->       the block must take at most 4x (+60 s) docs/timings.json's KEY

Static checks (tests/test_docs.py runs them in every test run, --static alone):
- relative links and images point at files that exist;
- ``<!-- include: PATH -->`` ... ``<!-- end include -->`` holds exactly PATH's text (--sync copies it);
- ``<!-- measured: KEY -->`` follows the phrase docs/timings.json gives for KEY ("3 minutes");
- ``<!-- numbers-from: PATH [PATH...] -->`` ... ``<!-- end numbers -->``: every number in between
  appears in one of those files (the results they were copied from);
- synopsis blocks match the commands; YAML blocks parse; every marker is known, every skip says why.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = ROOT / "docs" / "timings.json"
RUN_LANGUAGES = {"bash": "bash", "sh": "bash", "python": "python"}
READ_LANGUAGES = {"yaml", "text", "", "mermaid"}  # parsed (yaml) or shown as they are
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
SLACK_FACTOR, SLACK_SECONDS = 4.0, 60.0  # how much longer than measured a timed block may take (shared machines)
# set while --timings measures: the quotes are what is being measured, so they are not checked
UNQUOTED = "RELEX_DOCS_UNQUOTED"

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*docs-check:\s*(.*?)\s*-->\s*$")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_MEASURED = re.compile(r"<!--\s*measured:\s*(\w+)\s*-->")
_INCLUDE = re.compile(r"<!--\s*include:\s*(\S+)\s*-->\n(.*?)<!--\s*end include\s*-->", re.S)
_NUMBERS = re.compile(r"<!--\s*numbers-from:\s*(.*?)\s*-->(.*?)<!--\s*end numbers\s*-->", re.S)


def pages(only: list[str] | None = None) -> list[Path]:
    """README.md and every docs/*.md (or the pages named), in that order."""
    found = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    if not only:
        return found
    chosen = [Path(p).resolve() if Path(p).is_absolute() else (ROOT / p).resolve() for p in only]
    missing = [str(p) for p in chosen if not p.is_file()]
    if missing:
        raise SystemExit(f"error: no such page: {', '.join(missing)}")
    return chosen


def rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    markers: list[str]

    @property
    def where(self) -> str:
        return f"{rel(self.page)}:{self.line}"

    def marker(self, name: str) -> str | None:
        """The argument of the first ``name`` marker ("" when it has none), None when absent."""
        for m in self.markers:
            head, _, rest = m.partition(" ")
            if head == name:
                return rest.strip()
        return None

    @property
    def skip(self) -> str | None:
        reason = self.marker("skip")
        if reason is None:
            return None
        return reason[1:-1] if reason.startswith("(") and reason.endswith(")") else reason

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and self.skip is None and self.marker("file") is None


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, each with the docs-check markers on the lines just before it."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, language = match.group(1), match.group(2)
        markers: list[str] = []
        j = i - 1
        while j >= 0 and _MARKER.match(lines[j]):
            markers.insert(0, _MARKER.match(lines[j]).group(1))
            j -= 1
        body: list[str] = []
        k = i + 1
        while k < len(lines) and lines[k].strip() != "```":
            body.append(lines[k][len(indent) :] if lines[k].startswith(indent) else lines[k])
            k += 1
        found.append(Block(page, i + 1, language, "\n".join(body) + "\n", markers))
        i = k + 1
    return found


# ---- static checks ---------------------------------------------------------------------------

KNOWN_MARKERS = {"skip", "exit", "output", "file", "synopsis", "timed"}


def phrase(key: str, value: float) -> str:
    """How a page quotes a measurement: counts as they are, times rounded to what a reader needs
    (10 s below 90 s, whole minutes above)."""
    if key == "tests":
        return f"{int(value)} tests"
    if value < 90:
        return f"{max(10, int(round(value / 10.0)) * 10)} seconds"
    minutes = max(1, int(round(value / 60.0)))
    return f"{minutes} minute" + ("s" if minutes != 1 else "")


def load_timings() -> dict:
    return json.loads(TIMINGS.read_text()) if TIMINGS.is_file() else {}


def check_links(page: Path, text: str) -> list[str]:
    problems = []
    for match in _LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z]+://|^mailto:|^#", target):
            continue
        path = target.split("#", 1)[0]
        if path and not (page.parent / path).exists():
            problems.append(f"{rel(page)}: link to {target}, which does not exist")
    return problems


def check_includes(page: Path, text: str, sync: bool = False) -> tuple[list[str], str]:
    problems = []

    def replace(match: re.Match) -> str:
        source = ROOT / match.group(1)
        if not source.is_file():
            problems.append(f"{rel(page)}: includes {match.group(1)}, which does not exist")
            return match.group(0)
        want = source.read_text().strip() + "\n"
        if match.group(2).strip() + "\n" != want:
            if sync:
                return f"<!-- include: {match.group(1)} -->\n{want}<!-- end include -->"
            problems.append(
                f"{rel(page)}: the copy of {match.group(1)} is not current (python scripts/check_docs.py --sync)"
            )
        return match.group(0)

    return problems, _INCLUDE.sub(replace, text)


def check_measured(page: Path, text: str, timings: dict) -> list[str]:
    problems = []
    for match in _MEASURED.finditer(text):
        key = match.group(1)
        value = timings.get("values", {}).get(key)
        if value is None:
            problems.append(f"{rel(page)}: quotes measurement {key!r}, which docs/timings.json does not hold")
            continue
        want = phrase(key, value)
        before = text[: match.start()].rstrip()
        if not before.endswith(want):
            got = before[-40:].splitlines()[-1] if before else ""
            problems.append(
                f"{rel(page)}: {key} was measured as {want!r} (docs/timings.json), but the page says "
                f"'...{got}' (python scripts/check_docs.py --timings measures again)"
            )
    return problems


def check_numbers(page: Path, text: str) -> list[str]:
    problems = []
    for match in _NUMBERS.finditer(text):
        sources = [ROOT / p for p in match.group(1).split()]
        missing = [rel(s) for s in sources if not s.is_file()]
        if missing:
            problems.append(f"{rel(page)}: numbers-from {', '.join(missing)}, which does not exist")
            continue
        known = "\n".join(s.read_text() for s in sources)
        for number in re.findall(r"(?<![\w.])\d+\.\d+(?![\d])", match.group(2)):
            if number not in known:
                problems.append(f"{rel(page)}: {number} is in no file it is said to come from ({match.group(1)})")
    return problems


def synopsis_problems(block: Block) -> list[str]:
    """Each `relex-merge [COMMAND] ...` entry (continued on indented lines) against the command's
    click options."""
    import click

    from relex_merge.cli import REGISTRY

    problems = []
    entries: list[str] = []
    for line in block.text.splitlines():
        if line.startswith("relex-merge"):
            entries.append(line)
        elif line.startswith((" ", "\t")) and entries:
            entries[-1] += " " + line.strip()
    for entry in entries:
        words = entry.split("#", 1)[0].split()
        name = words[1] if len(words) > 1 and words[1] in REGISTRY else "merge"
        command: click.Command = REGISTRY.get(name)
        options = [p for p in command.params if isinstance(p, click.Option) and "--help" not in p.opts]
        shown = set(re.findall(r"(?<![\w-])--?[a-zA-Z][a-z0-9-]*", entry.split(None, 1)[1] if " " in entry else ""))
        for option in options:
            if not shown & set(option.opts):
                problems.append(
                    f"{block.where}: the synopsis of `relex-merge {name}` omits {max(option.opts, key=len)}"
                )
        known = {o for option in options for o in option.opts}
        for flag in sorted(f for f in shown - known if f.startswith("--")):
            problems.append(f"{block.where}: the synopsis of `relex-merge {name}` shows {flag}, which it does not have")
    if not entries:
        problems.append(f"{block.where}: a synopsis block without a relex-merge line")
    return problems


def yaml_problems(block: Block) -> list[str]:
    import yaml

    from relex_merge.common.errors import RelexError
    from relex_merge.config.schema import parse_config

    try:
        documents = [d for d in yaml.safe_load_all(block.text) if d is not None]
    except yaml.YAMLError as exc:
        return [f"{block.where}: YAML does not parse: {str(exc).splitlines()[0]}"]
    problems = []
    for document in documents:
        if isinstance(document, dict) and document.get("merge_method") == "relex":
            try:
                parse_config(document, block.where)
            except RelexError as exc:
                problems.append(str(exc))
    return problems


def static_problems(page_list: list[Path], sync: bool = False) -> list[str]:
    timings = load_timings()
    problems: list[str] = []
    for page in page_list:
        text = page.read_text()
        found, synced = check_includes(page, text, sync)
        if sync and synced != text:
            page.write_text(synced)
            print(f"synced {rel(page)}")
            text = synced
        problems += [] if sync else found
        problems += check_links(page, text)
        if not os.environ.get(UNQUOTED):
            problems += check_measured(page, text, timings)
        problems += check_numbers(page, text)
        for block in blocks(page):
            for m in block.markers:
                if m.split(" ", 1)[0] not in KNOWN_MARKERS:
                    problems.append(f"{block.where}: unknown docs-check marker {m!r}")
            if block.marker("skip") is not None and not block.skip:
                problems.append(f"{block.where}: a skip needs a reason: <!-- docs-check: skip (why) -->")
            timed = block.marker("timed")
            if timed and not os.environ.get(UNQUOTED) and timed not in timings.get("values", {}):
                problems.append(
                    f"{block.where}: timed {block.marker('timed')!r}, which docs/timings.json does not hold"
                )
            if block.marker("synopsis") is not None:
                problems += synopsis_problems(block)
            if block.language == "yaml" and block.marker("file") is None:
                problems += yaml_problems(block)
            if block.language in READ_LANGUAGES or block.language in RUN_LANGUAGES or block.marker("file") is not None:
                continue
            problems.append(f"{block.where}: a ```{block.language} block, which the check neither runs nor reads")
    return problems


# ---- running the blocks ----------------------------------------------------------------------


_NOT_COPIED = {".git", ".venv", "out", "runs", "mutants", "__pycache__", ".pytest_cache", "build", "dist"}


def repository_files() -> list[str]:
    """The files a fresh clone would have (tracked, or new and not ignored); outside a git checkout
    (a copy made by this script), everything but environments, outputs and caches."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
    )
    if done.returncode == 0 and (ROOT / ".git").exists():
        return sorted({f for f in done.stdout.decode().split("\0") if f and (ROOT / f).is_file()})
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _NOT_COPIED and not d.endswith(".egg-info")]
        found += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files]
    return sorted(found)


def scratch_copy(dest: Path, venv: Path | None) -> Path:
    """A copy of the repository at ``dest``; with ``venv``, ``dest/.venv`` stands for it (links to
    its contents and an install marker of its own, so `make` sees an installed environment)."""
    for name in repository_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    if venv is not None:
        own = dest / ".venv"
        own.mkdir()
        for entry in venv.iterdir():
            if entry.name != ".installed":
                (own / entry.name).symlink_to(entry)
        (own / ".installed").touch()
    return dest


def environment(scratch: Path, venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(OFFLINE)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONPATH"] = str(scratch)  # the copy's package, not the editable install's checkout
    env["COLUMNS"] = "160"
    return env


@dataclasses.dataclass
class Outcome:
    block: Block
    status: str  # ok, FAIL, skip, file
    seconds: float = 0.0
    note: str = ""
    output: str = ""


def _output_lines_present(expected: str, output: str) -> list[str]:
    flat = " ".join(output.split())
    missing = []
    for line in expected.splitlines():
        line = " ".join(line.split())
        if not line:
            continue
        pattern = ".*?".join(re.escape(part.strip()) for part in line.split("…"))
        if not re.search(pattern, flat):
            missing.append(line)
    return missing


def run_block(block: Block, scratch: Path, env: dict, timeout: float) -> Outcome:
    language = RUN_LANGUAGES[block.language]
    if language == "bash":
        argv = ["bash", "-c", "set -eo pipefail\n" + block.text]
    else:
        argv = [str(Path(env["VIRTUAL_ENV"]) / "bin" / "python"), "-c", block.text]
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        output = out.decode(errors="replace") if isinstance(out, bytes) else out
        return Outcome(block, "FAIL", time.perf_counter() - start, f"still running after {timeout:.0f} s", output)
    seconds = time.perf_counter() - start
    expected = int(block.marker("exit") or 0)
    if code != expected:
        return Outcome(block, "FAIL", seconds, f"exit status {code}, expected {expected}", output)
    return Outcome(block, "ok", seconds, "" if not expected else f"exit {code} as shown", output)


def run_page(page: Path, venv: Path, timings: dict, timeout: float, log=print) -> list[Outcome]:
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="relex-docs-") as tmp:
        scratch = scratch_copy(Path(tmp) / "repo", venv)
        env = environment(scratch, venv)
        last: Outcome | None = None
        for block in blocks(page):
            if block.marker("file") is not None:
                target = scratch / block.marker("file")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.text)
                outcomes.append(Outcome(block, "file", note=f"written to {block.marker('file')}"))
                continue
            if block.marker("output") is not None:
                if last is None or last.status != "ok":
                    outcomes.append(Outcome(block, "FAIL", note="an output block with no block run before it"))
                    continue
                missing = _output_lines_present(block.text, last.output)
                status = "FAIL" if missing else "ok"
                note = f"not in the output of line {last.block.line}: {missing[0]!r}" if missing else "output as shown"
                outcomes.append(Outcome(block, status, note=note, output=last.output if missing else ""))
                continue
            if block.skip is not None:
                outcomes.append(Outcome(block, "skip", note=block.skip))
                continue
            if not block.runs:
                continue
            outcome = run_block(block, scratch, env, timeout)
            key = block.marker("timed")
            if outcome.status == "ok" and key and not os.environ.get(UNQUOTED):
                quoted = timings.get("values", {}).get(key)
                if quoted is not None:
                    allowed = SLACK_FACTOR * quoted + SLACK_SECONDS
                    outcome.note = f"{key}: {outcome.seconds:.0f} s here, {quoted:.0f} s measured for the page"
                    if outcome.seconds > allowed:
                        outcome.status = "FAIL"
                        outcome.note += f"; more than the {allowed:.0f} s allowed"
            log(f"{outcome.status:4} {outcome.seconds:6.1f} s  {block.where}  {outcome.note}")
            if outcome.status == "FAIL":
                log(_tail(outcome.output))
            outcomes.append(outcome)
            last = outcome
    return outcomes


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join("      | " + line for line in text.rstrip().splitlines()[-lines:])


def the_venv(given: str | None) -> Path:
    venv = Path(given).resolve() if given else Path(sys.prefix)
    if not given and sys.prefix == sys.base_prefix:
        raise SystemExit("error: run this with the project's virtual environment (.venv/bin/python), or give --venv")
    if not (venv / "bin" / "relex-merge").is_file():
        raise SystemExit(f"error: {venv}: no relex-merge installed there (make install)")
    return venv


# ---- measuring what the pages quote ------------------------------------------------------------


def _timed(argv: list[str], cwd: Path, env: dict, label: str, log) -> tuple[float, str]:
    log(f"measuring {label}: {' '.join(argv)}")
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    log(f"  {seconds:.1f} s, exit {done.returncode}")
    if done.returncode != 0:
        raise SystemExit(f"error: {label} failed (exit {done.returncode}):\n{_tail(output, 60)}")
    return seconds, output


def _machine() -> str:
    import psutil  # a dependency of relex-merge

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 1024**3
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), {memory:.0f} GiB RAM"


def measure(log=print) -> dict:
    """Set-up, demo, the README example and the suite, each timed from a fresh copy with a fresh
    environment made by `make install` (as a new user would)."""
    readme_example = next((b for b in blocks(ROOT / "README.md") if b.marker("timed") == "example"), None)
    values: dict[str, float] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="relex-timings-") as tmp:
        scratch = scratch_copy(Path(tmp) / "repo", None)
        env = {**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, **OFFLINE, UNQUOTED: "1"}
        env.pop("PYTHONPATH", None)
        load = os.getloadavg()
        values["make_install"], out = _timed(["make", "install"], scratch, env, "make install (from nothing)", log)
        noise = [line for line in out.splitlines() if "is ignored" in line or line.startswith(("WARNING", "  "))]
        if noise:
            raise SystemExit("error: make install printed the installer's noise:\n" + "\n".join(noise[:10]))
        values["install_lines"] = len(out.strip().splitlines())
        values["make_demo"], out = _timed(["make", "demo"], scratch, env, "make demo (installed)", log)
        venv = scratch / ".venv"
        run_env = {**environment(scratch, venv), UNQUOTED: "1"}
        if readme_example is not None:
            outcome = run_block(readme_example, scratch, run_env, 1800)
            if outcome.status != "ok":
                raise SystemExit(f"error: README's example failed: {outcome.note}\n{_tail(outcome.output)}")
            values["example"] = outcome.seconds
            log(f"measuring README's example: {outcome.seconds:.1f} s")
        values["make_test"], out = _timed(["make", "test"], scratch, env, "make test (installed)", log)
        passed = re.search(r"(\d+) passed", out)
        values["tests"] = float(passed.group(1)) if passed else 0.0
        load_after = os.getloadavg()
    busy = max(load[0], load_after[0])
    if busy > (os.cpu_count() or 1):
        notes.append(f"the machine was shared: load average {load[0]:.1f} before, {load_after[0]:.1f} after")
    return {
        "machine": _machine(),
        "python": platform.python_version(),
        "measured": time.strftime("%Y-%m-%d"),
        "notes": notes,
        "values": {k: round(v, 1) for k, v in values.items()},
        "phrases": {k: phrase(k, v) for k, v in values.items() if k != "install_lines"},
    }


# ---- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="a page to check (repeatable; default: all)")
    parser.add_argument("--static", action="store_true", help="only the static checks; run no block")
    parser.add_argument("--list", action="store_true", help="list the blocks and what happens to each")
    parser.add_argument("--sync", action="store_true", help="rewrite the included regions from their files")
    parser.add_argument("--timings", action="store_true", help="measure what the pages quote; write docs/timings.json")
    parser.add_argument("--venv", help="the environment the blocks use (default: the one running this)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one block may take")
    args = parser.parse_args(argv)

    if args.timings:
        result = measure()
        TIMINGS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {rel(TIMINGS)}: " + ", ".join(f"{k} {v}" for k, v in result["phrases"].items()))
        return 0
    page_list = pages(args.only)
    if args.list:
        for page in page_list:
            for block in blocks(page):
                what = (
                    f"skip ({block.skip})"
                    if block.skip is not None
                    else f"file {block.marker('file')}"
                    if block.marker("file") is not None
                    else "run"
                    if block.runs
                    else "read"
                )
                print(f"{block.where:28} {block.language or '-':8} {what}" + "".join(f"; {m}" for m in block.markers))
        return 0
    problems = static_problems(page_list, sync=args.sync)
    for line in problems:
        print(f"FAIL {line}")
    if args.static or args.sync:
        print(f"static checks: {len(problems)} problem(s) in {len(page_list)} page(s)")
        return 1 if problems else 0
    venv = the_venv(args.venv)
    timings = load_timings()
    start = time.perf_counter()
    outcomes: list[Outcome] = []
    for page in page_list:
        print(f"== {rel(page)}", flush=True)
        outcomes += run_page(page, venv, timings, args.timeout, log=lambda s: print(s, flush=True))
    failed = [o for o in outcomes if o.status == "FAIL"]
    skipped = [o for o in outcomes if o.status == "skip"]
    ran = [o for o in outcomes if o.status == "ok" and o.seconds]
    print(
        f"\n{len(ran)} blocks ran in {time.perf_counter() - start:.0f} s, {len(failed)} failed, "
        f"{len(skipped)} skipped; {len(problems)} static problem(s)"
    )
    for o in skipped:
        print(f"skip {o.block.where}: {o.note}")
    for o in failed:
        print(f"FAIL {o.block.where}: {o.note}")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())

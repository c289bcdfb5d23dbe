"""Score the calibration corpus: for every (run, target), the last window checkpoint, the true
checkpoint and every relex candidate, with lm-eval on the held-out problems (issue 19).

Rerun (from the repository root; runs trained by demo/calibration/runs.py):

    python demo/calibration/score.py                    # prepare + score + report (resumable)
    python demo/calibration/score.py prepare            # configs + analyze, before any scoring
    python demo/calibration/score.py score [--only RUN,...] [--redo LABEL,...]
    python demo/calibration/score.py report             # results.json -> demo/calibration.md
    python demo/calibration/score.py check              # in-process score == `relex-merge eval`?

Stages:
1. prepare: for each run and each relex candidate, a config in demo/calibration/configs/
   <run>-<label>.yml (the run's window as trajectory steps, its targets). For `linear` and `auto`,
   `relex-merge analyze CONFIG --out DIR --json`; analysis.json (gzipped: analysis-<label>.json.gz)
   and fit_cache.safetensors (every tensor's Gram matrix of the window: any backtest verdict rule
   can be recomputed from it, with no reads) are copied into demo/calibration/data/<run>/.
2. score: per run, each relex candidate is built by ONE `run_merge` of its config (all targets);
   each output's verdict is recorded exactly as the merge returned it, before any evaluation.
   Then every model is scored with lm-eval's Python API (hf backend, greedy exact match, batch
   16, the task YAML in demo/calibration/tasks/) in this one process: one model object is
   loaded and its weights are swapped (HFLM accepts a model object). `check` verifies that this
   gives exactly `relex-merge eval`'s score. Per-problem correctness is kept (hex bit strings),
   so paired statistics need no rescoring. Finished (run, candidate) entries are skipped unless
   their definition changed or --redo names them.
3. report: demo/calibration.md, from demo/calibration/results.json alone.

Adding a candidate: one entry in CANDIDATES below (a label, how to build it and, for a relex
merge, the `parameters` it sets: ``Candidate("expo", "relex", {"fit": "expo"})`` once the engine
has it), then
``python demo/calibration/score.py`` scores only what is missing and rewrites the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import runs as corpus  # noqa: E402  (demo/calibration/runs.py)

RESULTS = HERE / "results.json"
REPORT = REPO / "demo" / "calibration.md"
CONFIGS = HERE / "configs"
DATA = HERE / "data"
TASKS_DIR = HERE / "tasks"
BATCH_SIZE = 16  # relex-merge eval's
ANALYZED = ("linear", "auto")  # candidates whose window analysis is saved (the fit cache is shared)


@dataclass(frozen=True)
class Candidate:
    """A model to score at each target, and how to build it: ``build`` names a builder in
    BUILDERS (below): "relex" runs one merge of the run's window to all its targets with
    ``params`` as the relex ``parameters`` (recording each output's verdict); "true" takes the
    true checkpoints. A new builder (e.g. an average computed here) is one function there."""

    label: str
    build: str
    params: dict | None = None
    title: str = ""

    def definition(self) -> dict:
        return {"build": self.build, "params": self.params}


# The candidate table: label -> how to build it. A new candidate is one line; rerun score.py.
CANDIDATES = {
    c.label: c
    for c in [
        Candidate("true", "true", None, "true checkpoint at the target"),
        Candidate("linear", "relex", {"fit": "linear"}, "RELEX, fit: linear"),
        Candidate("auto", "relex", {"fit": "auto"}, "RELEX, fit: auto (the backtest picks family and shape)"),
        Candidate("expo", "relex", {"fit": "expo"}, "two-point extrapolation (ExPO), alpha by the backtest"),
        Candidate("average", "relex", {"fit": "average"}, "mean of the last k checkpoints (LAWA), k by the backtest"),
        Candidate("ema", "relex", {"fit": "ema"}, "EMA of the window checkpoints, half-life by the backtest"),
    ]
}
RELEX = [c for c in CANDIDATES.values() if c.build == "relex"]


def verdict_word(v: dict) -> str:
    """The merge's verdict word (supported, not supported, untested), "not supported" split by
    whether the backtest was closer than stopping ("not supported, closer") or not ("not
    supported, stop"). Records scored before the engine had three words (no "verdict" key) are
    read from their other fields: untested when the window could not backtest."""
    err, stop = v.get("backtest_error"), v.get("stop_error")
    said = v.get("verdict")
    if said is None:
        untestable = err is None or stop is None or (isinstance(err, float) and math.isnan(err))
        said = "untested" if untestable else ("supported" if v["supported"] else "not supported")
    if said != "not supported":
        return said
    return "not supported, stop" if err >= stop else "not supported, closer"


# ----------------------------------------------------------------------------- prepare


def relex_config(run: corpus.Run, cand: Candidate, root: Path) -> dict:
    folder = root / run.name
    return {
        "merge_method": "relex",
        "base_model": str(folder / "base"),
        "trajectory": {"run_dir": str(folder), "steps": list(run.window)},
        "parameters": {"target_step": list(run.targets), **cand.params},
        "dtype": "float32",
    }


def write_config(run: corpus.Run, cand: Candidate, root: Path) -> Path:
    import yaml

    path = CONFIGS / f"{run.name}-{cand.label}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (
        f"# calibration run {run.name} ({run.task}, lr {run.lr:g}, seed {run.seed}, beta {run.beta:g}): "
        f"candidate {cand.label}.\n# Written by demo/calibration/score.py prepare (runs under {root}).\n"
    )
    path.write_text(head + yaml.safe_dump(relex_config(run, cand, root), sort_keys=False, default_flow_style=None))
    return path


def _gzip(src: Path, dst: Path) -> None:
    """A reproducible gzip (no name, no time stamp): analysis.json is ~200 KB of text, ~35 KB gzipped."""
    import gzip

    with open(dst, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as f:
        f.write(src.read_bytes())


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def prepare(runs: list[corpus.Run], root: Path, log) -> None:
    for run in runs:
        if not (root / run.name / "run.json").is_file():
            log(f"{run.name}: not trained yet, skipped")
            continue
        for cand in RELEX:
            config = write_config(run, cand, root)
            if cand.label not in ANALYZED:
                continue
            dest = DATA / run.name
            saved = dest / f"analysis-{cand.label}.json.gz"
            if saved.is_file() and (dest / "fit_cache.safetensors").is_file():
                continue
            out = root / run.name / f"analysis-{cand.label}"
            t, c = time.time(), _children_cpu()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "relex_merge",
                    "analyze",
                    str(config),
                    "--out",
                    str(out),
                    "--json",
                    "--overwrite",
                    "--threads",
                    "1",
                    "-q",
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            if proc.returncode != 0:
                raise SystemExit(f"analyze {config} failed ({proc.returncode}):\n{proc.stderr}")
            dest.mkdir(parents=True, exist_ok=True)
            _gzip(out / "analysis.json", saved)
            cache = out / "fit_cache.safetensors"
            if (dest / "fit_cache.safetensors").is_file():
                if (dest / "fit_cache.safetensors").read_bytes() != cache.read_bytes():
                    shutil.copy(cache, dest / f"fit_cache-{cand.label}.safetensors")  # not expected: kept apart
            else:
                shutil.copy(cache, dest / "fit_cache.safetensors")
            results = load_results()
            seconds = results["runs"].setdefault(run.name, {}).setdefault("seconds", {})
            seconds[f"analyze_{cand.label}"] = round(time.time() - t, 1)
            seconds[f"analyze_{cand.label}_cpu"] = round(_children_cpu() - c, 1)
            save_results(results)
            log(f"{run.name}: analyze ({cand.label}) in {time.time() - t:.1f} s -> {saved.relative_to(REPO)}")


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """One model object and one lm-eval HFLM for every score: weights are swapped in."""

    def __init__(self, like: Path):
        import torch
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(like, dtype=torch.float32)
        self.tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        self.lm = HFLM(
            pretrained=self.model, tokenizer=AutoTokenizer.from_pretrained(like), batch_size=BATCH_SIZE, device="cpu"
        )
        self.manager = TaskManager(include_path=str(TASKS_DIR))

    def __call__(self, folder: Path, task: str) -> dict:
        import contextlib
        import io

        from lm_eval import simple_evaluate
        from safetensors.torch import load_file

        missing, unexpected = self.model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
        if set(missing) - self.tied or unexpected:
            raise SystemExit(f"{folder}: weights do not match the model (missing {missing}, unexpected {unexpected})")
        with contextlib.redirect_stderr(io.StringIO()):
            out = simple_evaluate(
                model=self.lm, tasks=[task], task_manager=self.manager, log_samples=True, verbosity="ERROR"
            )
        metrics = out["results"][task]
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        bits = "".join("1" if s["exact_match"] else "0" for s in samples)
        return {
            "accuracy": metrics["exact_match,none"],
            "stderr": metrics["exact_match_stderr,none"],
            "n": len(samples),
            "correct_hex": f"{int(bits[::-1] or '0', 2):x}",
        }


def weight_error(model: Path, true: Path, base: Path) -> float:
    """||model - true|| / ||true - base|| over every tensor (float64)."""
    from safetensors.torch import load_file

    m, t, b = (load_file(f / "model.safetensors") for f in (model, true, base))
    err = sum(float(((m[k].double() - t[k].double()) ** 2).sum()) for k in t)
    disp = sum(float(((t[k].double() - b[k].double()) ** 2).sum()) for k in t)
    return round((err / disp) ** 0.5, 5)


def load_results() -> dict:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text())
    return {"runs": {}}


def save_results(results: dict) -> None:
    results["notes"] = {
        "accuracy": "lm-eval exact_match (greedy) on the task's 1000 held-out problems; stderr: lm-eval's",
        "correct_hex": "per-problem correctness: bit i of int(correct_hex, 16) (LSB = line 0 of the test file) is 1 "
        "when problem i was answered exactly",
        "weight_error": "||model - true|| / ||true - base|| over every tensor; weight_error_last: the last window "
        "checkpoint's",
        "verdict": "TargetVerdict.as_dict() and .line() as run_merge returned them, before any evaluation",
        "seconds": "wall seconds (shared, niced machine); *_cpu: CPU seconds of the process (one thread)",
    }
    results["candidates"] = {c.label: {**c.definition(), "title": c.title} for c in CANDIDATES.values()}
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    tmp.replace(RESULTS)


def build_true(cand: Candidate, run: corpus.Run, root: Path) -> dict[int, tuple[Path, dict]]:
    """The true checkpoints at the targets."""
    return {s: (root / run.name / f"checkpoint-{s}", {}) for s in run.targets}


def build_relex(cand: Candidate, run: corpus.Run, root: Path) -> dict[int, tuple[Path, dict]]:
    """One merge of the window to every target (config: demo/calibration/configs/<run>-<label>.yml,
    output: ROOT/<run>/pred-<label>/step-N); each output's verdict as the merge returned it."""
    from relex_merge import Options, run_merge

    config = write_config(run, cand, root)
    result = run_merge(
        config, root / run.name / f"pred-{cand.label}", Options(threads=1, max_memory="2GB", overwrite=True)
    )
    merge = result.final.merge
    built = {}
    for (target, _, path), fit, verdict in zip(merge.outputs, merge.assessment.fits, merge.assessment.verdicts):
        said = verdict.as_dict()
        built[target] = (
            path,
            {
                "fit": fit.describe(),
                "verdict": said,
                "verdict_line": verdict.line(),
                "verdict_word": verdict_word(said),
            },
        )
    return built


BUILDERS = {"true": build_true, "relex": build_relex}


def score_run(run: corpus.Run, root: Path, results: dict, scorer: Scorer, redo: set[str], log) -> None:
    folder = root / run.name
    record = json.loads((folder / "run.json").read_text())
    task = corpus.TASKS[run.task]
    entry = results["runs"].setdefault(run.name, {})
    entry["meta"] = {
        **record["run"],
        "lm_eval_task": task.lm_eval_task,
        "train_seconds": record["seconds"],
        "quick_accuracy": record["quick_accuracy"],
        "train_reward": record["train_reward"],
    }
    timing = entry.setdefault("seconds", {})
    last = folder / f"checkpoint-{run.window[-1]}"
    base = folder / "base"
    refs = entry.setdefault("reference", {})
    for label, path in (("base", base), ("last", last)):
        if label not in refs or label in redo:
            t, c = time.time(), time.process_time()
            refs[label] = {"step": 0 if label == "base" else run.window[-1], **scorer(path, task.lm_eval_task)}
            timing[f"score_{label}"] = round(time.time() - t, 1)
            timing[f"score_{label}_cpu"] = round(time.process_time() - c, 1)
    targets = entry.setdefault("targets", {})
    for t_step in run.targets:
        row = targets.setdefault(str(t_step), {})
        row["horizon"] = round(run.horizon(t_step), 4)
        row.setdefault("weight_error_last", weight_error(last, folder / f"checkpoint-{t_step}", base))
    for cand in CANDIDATES.values():
        done = all(targets[str(s)].get(cand.label, {}).get("definition") == cand.definition() for s in run.targets)
        if done and cand.label not in redo:
            continue
        t0, c0 = time.time(), time.process_time()
        built = BUILDERS[cand.build](cand, run, root)
        timing[f"build_{cand.label}"] = round(time.time() - t0, 1)
        timing[f"build_{cand.label}_cpu"] = round(time.process_time() - c0, 1)
        t1, c1 = time.time(), time.process_time()
        for s in run.targets:
            path, info = built[s]
            scored = scorer(path, task.lm_eval_task)
            if cand.build != "true":
                scored["weight_error"] = weight_error(path, folder / f"checkpoint-{s}", base)
            targets[str(s)][cand.label] = {"definition": cand.definition(), **info, **scored}
        timing[f"score_{cand.label}"] = round(time.time() - t1, 1)
        timing[f"score_{cand.label}_cpu"] = round(time.process_time() - c1, 1)
        save_results(results)
        log(f"{run.name}: {cand.label} built and scored in {time.time() - t0:.0f} s")
    save_results(results)


def score(runs: list[corpus.Run], root: Path, redo: set[str], log) -> None:
    import torch

    torch.set_num_threads(1)
    results = load_results()
    trained = [r for r in runs if (root / r.name / "run.json").is_file()]
    for r in runs:
        if r not in trained:
            log(f"{r.name}: not trained yet, skipped")
    if not trained:
        return
    missing = [r.name for r in trained if not (DATA / r.name / "analysis-auto.json.gz").is_file()]
    if missing:
        raise SystemExit(f"run `score.py prepare` first (no analysis for {', '.join(missing)})")
    scorer = Scorer(root / trained[0].name / "base")
    for run in trained:
        t = time.time()
        score_run(run, root, results, scorer, redo, log)
        log(f"{run.name}: scored ({time.time() - t:.0f} s)")


def check(root: Path, log) -> None:
    """The in-process score of one folder against `relex-merge eval`'s (a subprocess)."""
    run = next(r for r in corpus.RUNS if (root / r.name / "run.json").is_file())
    task = corpus.TASKS[run.task]
    folder = root / run.name / f"checkpoint-{run.window[-1]}"
    import torch

    torch.set_num_threads(1)
    mine = Scorer(root / run.name / "base")(folder, task.lm_eval_task)
    out = root / "check-eval.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "relex_merge",
            "eval",
            str(folder),
            "--tasks",
            task.lm_eval_task,
            "--include-path",
            str(TASKS_DIR),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise SystemExit(f"relex-merge eval failed:\n{proc.stderr}")
    theirs = json.loads(out.read_text())["scores"][0]
    same = theirs["value"] == mine["accuracy"] and theirs["stderr"] == mine["stderr"]
    results = load_results()
    results["check"] = {
        "folder": str(folder),
        "task": task.lm_eval_task,
        "in_process": [mine["accuracy"], mine["stderr"]],
        "relex_merge_eval": [theirs["value"], theirs["stderr"]],
        "identical": same,
    }
    save_results(results)
    log(
        f"check on {folder}: in-process {mine['accuracy']} ± {mine['stderr']}, relex-merge eval "
        f"{theirs['value']} ± {theirs['stderr']}: {'identical' if same else 'DIFFERENT'}"
    )
    if not same:
        raise SystemExit(1)


# ----------------------------------------------------------------------------- report


def _share(pred: float, last: float, true: float) -> float | None:
    return None if true == last else (pred - last) / (true - last)


def report(results: dict) -> str:
    import statistics

    relex = [c.label for c in RELEX]
    lines = [
        "# Calibration corpus: does extrapolating beat stopping at the last window checkpoint?",
        "",
        'Rerun (from the repository root, `pip install ".[demo]"`; ~1.5 h of one core to train, ~0.5 h to score):',
        "",
        "```bash",
        "export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1",
        "python demo/calibration/runs.py --data      # held-out test sets + task YAMLs (committed)",
        "python demo/calibration/runs.py             # train the runs into /work/runs/calibration (resumable)",
        "python demo/calibration/score.py            # configs + analyze, merges + verdicts, lm-eval, this file",
        "python demo/calibration/verdict.py          # the verdict as a classifier: demo/calibration/verdict.md",
        "```",
        "",
        "How well the verdict predicts these outcomes (leave-one-run-out, confusion table, precision of go): "
        "[calibration/verdict.md](calibration/verdict.md).",
        "",
        "Real GRPO runs (TRL) of a tiny Qwen2 (~80K parameters) on two tasks; every model scored with lm-eval "
        "(greedy exact match) on 1000 held-out problems of its task. Horizon = (target - last window step) / "
        "(last - first window step). `last` = the last window checkpoint (stopping), `true` = the real "
        "checkpoint at the target. Verdict = what the merge returned before any evaluation, under the rule in "
        "force when it was scored (results.json keeps it): supported; not supported, closer (the backtest was "
        "closer than stopping); not supported, stop (stopping was at least as close); untested. "
        "`demo/calibration/verdict.md` recomputes every verdict under one rule and measures it as a classifier. "
        "Captured = share of the future gain, (prediction - last) / (true - last); n/a when true = last. "
        "± = lm-eval's stderr of one score (~0.016 at these accuracies).",
        "",
        "## Runs",
        "",
        "| run | task | lr | seed | beta | warm start | window (every) | targets | base | last | true (farthest) "
        "| farthest true - base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = results["runs"]
    for name, e in runs.items():
        if "reference" not in e or "targets" not in e:
            continue
        m = e["meta"]
        far = e["targets"][str(m["targets"][-1])].get("true", {}).get("accuracy")
        b = e["reference"]["base"]
        gain = "" if far is None else f" {(far - b['accuracy']) / b['stderr']:+.1f} stderr |"
        lines.append(
            f"| {name} | {m['task']} | {m['lr']:g} | {m['seed']} | {m['beta']:g} | {m['warm_start']} | "
            f"{m['window'][0]}-{m['window'][-1]} ({m['spacing']}) | {', '.join(map(str, m['targets']))} | "
            f"{e['reference']['base']['accuracy']:.3f} | {e['reference']['last']['accuracy']:.3f} | "
            + (f"{far:.3f} |" if far is not None else " |")
            + gain
        )
    head = (
        "| run | task | target | horizon | last | true | "
        + " | ".join(f"{c} | {c} verdict | {c} captured" for c in relex)
        + " |"
    )
    lines += ["", "## Every (run, target)", "", head, "|---" * (6 + 3 * len(relex)) + "|"]
    pairs = []
    for name, e in runs.items():
        if "reference" not in e:
            continue
        last = e["reference"]["last"]
        for step, row in e["targets"].items():
            if "true" not in row or not all(c in row for c in relex):
                continue
            pairs.append((name, e, step, row))
            cells = [
                name,
                e["meta"]["task"][:3],
                step,
                f"{row['horizon']:.1f}x",
                f"{last['accuracy']:.3f}",
                f"{row['true']['accuracy']:.3f}",
            ]
            for c in relex:
                p = row[c]
                share = _share(p["accuracy"], last["accuracy"], row["true"]["accuracy"])
                fit = f" ({p['fit']})" if p["fit"] != c else ""  # what the backtest chose
                said = verdict_word(p["verdict"]) + fit
                cells += [f"{p['accuracy']:.3f}", said, "n/a" if share is None else f"{share:+.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    # summary
    lines += ["", "## Summary", "", f"{len({p[0] for p in pairs})} runs, {len(pairs)} (run, target) pairs.", ""]
    lines += [
        "Prediction minus the last window checkpoint, in units of the last's stderr; captured share over "
        "every target, and over the targets whose true checkpoint beats the last by > 2 stderr (a real "
        "future gain: elsewhere the share divides by noise).",
        "",
        "| candidate | task | targets | beats last by > 1 stderr | > 2 stderr | within 1 stderr | "
        "worse by > 1 stderr | captured: median [25%, 75%] | captured where true gains > 2 stderr |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def outcome(name, e, row, label):
        last = e["reference"]["last"]
        d = row[label]["accuracy"] - last["accuracy"]
        return d / last["stderr"] if last["stderr"] else 0.0

    def shares_of(sel, c):
        return [
            s
            for p in sel
            if (s := _share(p[3][c]["accuracy"], p[1]["reference"]["last"]["accuracy"], p[3]["true"]["accuracy"]))
            is not None
        ]

    def spread(shares):
        if len(shares) < 2:
            return f"{shares[0]:+.2f}" if shares else "n/a"
        q = statistics.quantiles(shares, n=4)
        return f"{statistics.median(shares):+.2f} [{q[0]:+.2f}, {q[2]:+.2f}]"

    for c in ["true"] + relex:
        for task in ["all"] + sorted({p[1]["meta"]["task"] for p in pairs}):
            sel = [p for p in pairs if task == "all" or p[1]["meta"]["task"] == task]
            z = [outcome(*p[:2], p[3], c) for p in sel]
            gaining = [p for p in sel if outcome(*p[:2], p[3], "true") > 2]
            lines.append(
                f"| {c} | {task} | {len(z)} | {sum(x > 1 for x in z)} | {sum(x > 2 for x in z)} | "
                f"{sum(abs(x) <= 1 for x in z)} | {sum(x < -1 for x in z)} | {spread(shares_of(sel, c))} | "
                f"{spread(shares_of(gaining, c))} (n={len(gaining)}) |"
            )
    lines += [
        "",
        "Outcome by verdict (prediction vs last window checkpoint, in units of the last's stderr):",
        "",
        "| candidate | verdict | targets | better > 1 stderr | within 1 stderr | worse > 1 stderr |",
        "|---|---|---|---|---|---|",
    ]
    for c in relex:
        for word in ("supported", "not supported, closer", "not supported, stop", "untested"):
            z = [outcome(*p[:2], p[3], c) for p in pairs if verdict_word(p[3][c]["verdict"]) == word]
            if z:
                lines.append(
                    f"| {c} | {word} | {len(z)} | {sum(x > 1 for x in z)} | "
                    f"{sum(abs(x) <= 1 for x in z)} | {sum(x < -1 for x in z)} |"
                )
    lines += [
        "",
        "Horizon bins (median captured share; targets where the candidate beats last by > 1 stderr):",
        "",
        "| horizon | targets | " + " | ".join(f"{c} captured | {c} > last" for c in relex) + " |",
        "|---|---" + "|---|---" * len(relex) + "|",
    ]
    for lo, hi in ((0, 1.5), (1.5, 3), (3, 6), (6, 11), (11, 21)):
        sel = [p for p in pairs if lo <= p[3]["horizon"] < hi]
        if not sel:
            continue
        cells = [f"{lo:g}-{hi:g}x", str(len(sel))]
        for c in relex:
            shares = [
                s
                for p in sel
                if (s := _share(p[3][c]["accuracy"], p[1]["reference"]["last"]["accuracy"], p[3]["true"]["accuracy"]))
                is not None
            ]
            cells += [
                f"{statistics.median(shares):+.2f}" if shares else "n/a",
                f"{sum(outcome(*p[:2], p[3], c) > 1 for p in sel)}/{len(sel)}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Time",
        "",
        "CPU seconds (one thread each; wall time was longer: the machine was shared):",
        "",
        "| stage | CPU s |",
        "|---|---|",
    ]
    totals: dict[str, float] = {}
    for e in runs.values():
        train = e.get("meta", {}).get("train_seconds", {})
        for key in ("warm_start_cpu_s", "grpo_cpu_s", "quick_accuracy_cpu_s"):
            totals["train: " + key[: -len("_cpu_s")].replace("_", " ")] = totals.get(
                "train: " + key[: -len("_cpu_s")].replace("_", " "), 0.0
            ) + train.get(key, 0.0)
        for key, value in e.get("seconds", {}).items():
            if key.endswith("_cpu"):
                stage = key[: -len("_cpu")].split("_")[0]
                totals[stage] = totals.get(stage, 0.0) + value
    for stage, value in totals.items():
        lines.append(f"| {stage} | {value:.0f} |")
    lines.append(f"| total | {sum(totals.values()):.0f} ({sum(totals.values()) / 3600:.2f} h) |")
    chk = results.get("check")
    if chk:
        lines += [
            "",
            f"Scoring check: the in-process score of `{Path(chk['folder']).name}` of one run "
            f"({chk['in_process'][0]} ± {chk['in_process'][1]:.4f}) and `relex-merge eval`'s "
            f"({chk['relex_merge_eval'][0]} ± {chk['relex_merge_eval'][1]:.4f}) are "
            + ("identical." if chk["identical"] else "DIFFERENT."),
        ]
    lines += [
        "",
        "Every number, each verdict's data and line, per-problem correctness: "
        "`demo/calibration/results.json`; each window's analysis and Gram matrices: `demo/calibration/data/`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", default="all", choices=["all", "prepare", "score", "report", "check"])
    parser.add_argument("--root", type=Path, default=corpus.ROOT)
    parser.add_argument("--only", default="", help="comma-separated run names")
    parser.add_argument("--redo", default="", help="comma-separated candidate labels (or base, last) to rescore")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # the task YAMLs' data paths are relative to the repository root
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    wanted = [n for n in args.only.split(",") if n]
    runs = [corpus.BY_NAME[n] for n in wanted] if wanted else corpus.RUNS
    redo = {x for x in args.redo.split(",") if x}

    def log(text: str) -> None:
        print(text, flush=True)

    if args.stage in ("all", "prepare"):
        prepare(runs, args.root, log)
    if args.stage == "check":
        check(args.root, log)
    if args.stage in ("all", "score"):
        score(runs, args.root, redo, log)
    if args.stage in ("all", "report"):
        REPORT.write_text(report(load_results()))
        log(f"wrote {REPORT.relative_to(REPO)}")


if __name__ == "__main__":
    main()

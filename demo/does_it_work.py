"""README's "Does it work?" tables, recomputed from the shipped demo runs.

    python demo/does_it_work.py [--limit N] [--out demo/results.md]     # from the repo root

For each shipped run (its config in merge_configs/):
1. analyze the window: every family's backtest, the verdict per target;
2. build the linear (RELEX), `fit: auto`, expo, average and ema predictions for every shipped true checkpoint past
   the window, from one read;
3. score with lm-eval on the demo task: the base, the last window checkpoint, every prediction,
   and the TRUE GRPO checkpoint at the same steps;
4. measure each prediction against the true checkpoint in weight space:
   ||pred - true|| / ||true - base||, and show what the backtest said before any evaluation.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TASK = "relex_demo_addition"
RUNS = [  # (title, config, run folder)
    ("demo run (lr 1e-4, window 1-20)", "merge_configs/demo.yml", "demo/run"),
    ("second run (lr 3e-6, window: every 2nd step of 2-30)", "merge_configs/demo-lowlr.yml", "demo/run-lowlr"),
]
FITS = ["linear", "auto", "expo", "average", "ema"]  # shapes left open: the backtest chooses them


def weight_error(pred: Path, true: Path, base: Path) -> float:
    from safetensors.torch import load_file

    p, t, b = (load_file(f / "model.safetensors") for f in (pred, true, base))
    err = sum(float(((p[k].double() - t[k].double()) ** 2).sum()) for k in t)
    disp = sum(float(((t[k].double() - b[k].double()) ** 2).sum()) for k in t)
    return (err / disp) ** 0.5


def true_steps_after(run: Path, last: int) -> list[int]:
    return sorted(s for s in (int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")) if s > last)


def section(title: str, config: Path, run: Path, limit: int | None, manager) -> list[str]:
    from relex_merge.config.schema import load_config
    from relex_merge.core.analysis import summary_rows
    from relex_merge.core.backtest import horizon
    from relex_merge.core.relex import FitSpec
    from relex_merge.engine import EngineOptions
    from relex_merge.evaluation.lm_eval import evaluate
    from relex_merge.workflows.analyze import run_analysis
    from relex_merge.workflows.merge import execute_merge
    from relex_merge.workflows.plan import plan_merge

    plan = plan_merge(load_config(config))
    steps = list(plan.job.steps)
    targets = true_steps_after(run, steps[-1])
    options = EngineOptions(max_memory=1 << 30)
    analysis, _ = run_analysis(replace(plan, job=replace(plan.job, targets=targets)), options)

    def score(folder: Path, results: Path) -> tuple[float, float]:
        r = evaluate(folder, [TASK], limit=limit, manager=manager, results_file=results)
        return r.scores[0].value, r.scores[0].stderr

    fits = [FitSpec(f, None, plan.job.spec.fit.origin_step) for f in FITS]
    pairs = [(t, f) for t in targets for f in fits]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        job = replace(plan.job, targets=[t for t, _ in pairs], fits=[f for _, f in pairs], scales=None)
        names = [f"step-{t}-{f.family}" for t, f in pairs]
        built = execute_merge(replace(plan, job=job), tmp / "pred", options, names=names)
        rows.append(("base (GRPO step 0)", "", score(run / "base", tmp / "base.json"), None, "", ""))
        last = run / f"checkpoint-{steps[-1]}"
        rows.append((f"last window checkpoint (step {steps[-1]})", "", score(last, tmp / "last.json"), None, "", ""))
        by_target: dict[int, list] = {}
        for (t, requested), (_, _, folder), fit, verdict in zip(
            pairs, built.outputs, built.assessment.fits, built.assessment.verdicts
        ):
            by_target.setdefault(t, []).append((requested, folder, fit, verdict))
        for target in targets:
            h = horizon(steps, target)
            true_dir = run / f"checkpoint-{target}"
            stop_err = weight_error(last, true_dir, run / "base")
            rows.append(
                (
                    f"**true GRPO step {target}**",
                    f"{h:.1f}x",
                    score(true_dir, tmp / f"true-{target}.json"),
                    stop_err,
                    "",
                    "(weight error: the last window checkpoint's)",
                )
            )
            for requested, folder, fit, verdict in by_target[target]:
                label = f"RELEX step {target}, fit: {requested.family}" + (
                    f" → {fit.describe()}" if requested.resolved is None else ""
                )
                backtest = f"{verdict.error:.0%} vs {verdict.stop_error:.0%}"
                said = verdict.word
                rows.append(
                    (
                        label,
                        f"{h:.1f}x",
                        score(folder, tmp / f"{folder.name}.json"),
                        weight_error(folder, true_dir, run / "base"),
                        backtest,
                        said,
                    )
                )

    n = f"first {limit} of 300" if limit else "all 300"
    lines = [
        f"### {title}",
        "",
        f"`{config.relative_to(REPO)}` over `{run.relative_to(REPO)}`: GRPO steps {steps[0]}-{steps[-1]} observed; "
        f"lm-eval `{TASK}` exact match on {n} held-out problems (greedy). Horizon = steps past the window's end "
        f"in units of the window span ({steps[-1] - steps[0]} steps). Weight error = ||model - true checkpoint|| / "
        "||true checkpoint - base||. Backtest = the whole-model error of the fit near the target's horizon "
        "inside the window, against that of stopping at the last fitted checkpoint; the verdict is what the "
        "merge printed before any evaluation: supported, not supported, or untested (beyond what the window "
        "can test). expo: two-point extrapolation through the first and last window checkpoints; average / "
        "ema: checkpoint averaging over the window (they do not extrapolate).",
        "",
        "| model | horizon | exact match (± stderr) | weight error vs truth | backtest: fit vs stopping | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for name, h, (value, stderr), werr, bt, said in rows:
        w = f"{werr:.2f}" if werr is not None else ""
        lines.append(f"| {name} | {h} | {value:.3f} ± {stderr:.3f} | {w} | {bt} | {said} |")
    lines += ["", "analyze on the window:", ""] + [f"- {k}: {v}" for k, v in summary_rows(analysis)]
    lines += [
        "",
        "| family (best shape) | "
        + " | ".join(f"{lo:g}-{hi:g}x" if hi != float("inf") else f">{lo:g}x" for lo, hi in analysis.horizon_bins)
        + " |",
        "|---|" + "---|" * len(analysis.horizon_bins),
    ]
    for row in analysis.families:
        name = "stopping" if row.family == "stop" else row.fit
        lines.append(f"| {name} | " + " | ".join("" if e is None else f"{e:.0%}" for e in row.errors) + " |")
    lines += ["", "analyze's verdict:", ""] + [f"- {v}" for v in analysis.verdict]
    return lines + [""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="lm-eval documents per model (default: all 300)")
    parser.add_argument("--out", type=Path, default=REPO / "demo" / "results.md")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # the task YAML's data path is relative to the repository root
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from relex_merge.evaluation.lm_eval import task_manager

    manager = task_manager(REPO / "demo" / "tasks")
    lines = []
    for title, config, run in RUNS:
        if (REPO / run).is_dir():
            lines += section(title, REPO / config, REPO / run, args.limit, manager)
    lines += ["Rerun: `python demo/does_it_work.py" + (f" --limit {args.limit}" if args.limit else "") + "`"]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

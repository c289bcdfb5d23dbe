"""README's "Does it work?" table, recomputed from the shipped demo run.

    python demo/does_it_work.py [--limit N] [--out demo/results.md]     # from the repo root

1. analyze the window (GRPO steps 1-20): backtest error by horizon, the verdict;
2. build RELEX predictions for steps 40, 60, 100, 200 at scales 1.0 and 0.5, from one read;
3. score with lm-eval on the demo task: the base, the last window checkpoint, every
   prediction, and the TRUE GRPO checkpoint at the same steps;
4. also measure each prediction against the true checkpoint in weight space:
   ||pred - true|| / ||true - base||.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGETS = [40, 60, 100, 200]
SCALES = [1.0, 0.5]
TASK = "relex_demo_addition"


def weight_error(pred: Path, true: Path, base: Path) -> float:
    from safetensors.torch import load_file

    p, t, b = (load_file(f / "model.safetensors") for f in (pred, true, base))
    err = sum(float(((p[k].double() - t[k].double()) ** 2).sum()) for k in t)
    disp = sum(float(((t[k].double() - b[k].double()) ** 2).sum()) for k in t)
    return (err / disp) ** 0.5


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="lm-eval documents per model (default: all 300)")
    parser.add_argument("--out", type=Path, default=REPO / "demo" / "results.md")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # the task YAML's data path is relative to the repository root
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from relex_merge.analyze import run_analysis
    from relex_merge.config import load_config
    from relex_merge.engine import EngineOptions
    from relex_merge.evaluate import evaluate, task_manager
    from relex_merge.merge import execute_merge
    from relex_merge.plan import plan_merge

    plan = plan_merge(load_config(REPO / "merge_configs" / "demo.yml"))
    options = EngineOptions(max_memory=1 << 30)
    analysis, _ = run_analysis(replace(plan, job=replace(plan.job, targets=TARGETS)), options)
    manager = task_manager(REPO / "demo" / "tasks")
    run = REPO / "demo" / "run"

    def score(folder: Path, results: Path) -> tuple[float, float]:
        r = evaluate(folder, [TASK], limit=args.limit, manager=manager, results_file=results)
        return r.scores[0].value, r.scores[0].stderr

    def backtest_at(horizon: float) -> str:
        """The backtest's whole-model error at the nearest tested horizon (fit on the first 2)."""
        shortest = min(p.fit_count for p in analysis.backtest)
        points = [p for p in analysis.backtest if p.fit_count == shortest]
        nearest = min(points, key=lambda p: abs(p.horizon - horizon))
        return f"{nearest.relative_error:.0%} at {nearest.horizon:.1f}x"

    steps = plan.job.steps
    span = steps[-1] - steps[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = [(t, s) for t in TARGETS for s in SCALES]
        job = replace(plan.job, targets=[t for t, _ in pairs], scales=[s for _, s in pairs],
                      spec=replace(plan.job.spec, scale=1.0))
        built = execute_merge(replace(plan, job=job), tmp / "pred", options)
        base_score = score(run / "base", tmp / "base.json")
        last_score = score(run / f"checkpoint-{steps[-1]}", tmp / "last.json")
        rows.append(("base (GRPO step 0)", "", base_score, None, "", ""))
        rows.append((f"last window checkpoint (step {steps[-1]})", "", last_score, None, "", ""))
        for target in TARGETS:
            horizon = (target - steps[-1]) / span
            true_score = score(run / f"checkpoint-{target}", tmp / f"true-{target}.json")
            rows.append((f"**true GRPO step {target}**", f"{horizon:.1f}x", true_score, None, "", ""))
            for t, s, folder in built.outputs:
                if t != target:
                    continue
                pred_score = score(folder, tmp / f"{folder.name}.json")
                werr = weight_error(folder, run / f"checkpoint-{target}", run / "base")
                supported = analysis.supported_horizon is not None and horizon <= analysis.supported_horizon
                rows.append((f"RELEX step {target}, scale {s:g}", f"{horizon:.1f}x", pred_score, werr,
                             backtest_at(horizon), "yes" if supported else "no"))

    limit = f"first {args.limit} of 300" if args.limit else "all 300"
    lines = [
        f"Demo: tiny Qwen2 (~80K parameters), 2-digit addition, GRPO (TRL) steps 1-{steps[-1]} observed; "
        f"lm-eval `{TASK}` exact match on {limit} held-out problems (greedy). Horizon = steps past the "
        f"window's end in units of the window span ({span} steps). Weight error = "
        "||prediction - true checkpoint|| / ||true checkpoint - base||.",
        "",
        "| model | horizon | exact match (± stderr) | weight error vs truth | analyze: backtest error near this horizon | analyze: supported? |",
        "|---|---|---|---|---|---|",
    ]
    for name, horizon, (value, stderr), werr, bt, ok in rows:
        w = f"{werr:.2f}" if werr is not None else ""
        lines.append(f"| {name} | {horizon} | {value:.3f} ± {stderr:.3f} | {w} | {bt} | {ok} |")
    from relex_merge.analyze import summary_rows

    lines += ["", "analyze on the window:", ""] + [f"- {k}: {v}" for k, v in summary_rows(analysis)]
    lines += ["", "analyze's verdict:", ""] + [f"- {v}" for v in analysis.verdict]
    lines += ["", "Rerun: `python demo/does_it_work.py`" + (f" --limit {args.limit}" if args.limit else "")]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

"""Does jumping ahead inside the training loop work? REAL GRPO runs with RelexCallback against plain
training at the same learning rate and at 2x / 4x it, at equal real steps, on held-out problems.

    pip install ".[demo]"
    python demo/in_loop.py --time-step             # measure one GRPO step and one evaluation first
    python demo/in_loop.py [--workers 2]           # every run (resumable: finished runs are kept)
    python demo/in_loop.py --report                # demo/in_loop.md and demo/in_loop.json from the results
    python demo/in_loop.py --list                  # the runs, in the order they are trained

Tasks and held-out sets are the calibration corpus' (demo/calibration/runs.py: 1000 held-out
problems per task, never trained on); the model, tokenizer and GRPO knobs are the demo's
(demo/make_demo_run.py: a tiny Qwen2, 512 completions a step = 64 prompts x 8, exact-match
reward, temperature 1, no KL, constant learning rate). One supervised warm start per task (seed
0) is the base of every run of that task; seeds change GRPO's sampling and data order.

Per setting (task, learning rate) and seed:
- plain training at the setting's lr for ``--plain-steps`` steps, scored every 25 steps (the
  "steps plain GRPO needs" curve) -- its score at ``--steps`` is the same-lr baseline;
- plain training at 2x and 4x the lr for ``--steps`` steps (the tuned-lr baseline: the best of
  1x / 2x / 4x, chosen per seed on the held-out score itself, so it is an optimistic baseline);
- RelexCallback at the setting's lr for ``--steps`` steps, for each (K, J) with the guard on
  (the backtest sets the jump's size; the reward guard undoes a jump whose next 5 steps' mean
  reward fell by more than 0.05) and off (every jump taken at full length, nothing undone).
Scores are greedy exact match on the 1000 held-out problems (stderr about 0.016 at 50%).

Results go to ROOT/results/<setting>/seed<N>/<variant>.json (ROOT: $RELEX_IN_LOOP_ROOT or
/work/runs/in_loop); a run whose file exists is not trained again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "calibration"))

import runs as calibration  # noqa: E402  (demo/calibration/runs.py: tasks, held-out sets, warm start)

ROOT = Path(os.environ.get("RELEX_IN_LOOP_ROOT", "/work/runs/in_loop"))
EVAL_EVERY = 25


@dataclass(frozen=True)
class Setting:
    name: str
    task: str
    lr: float
    warm_start: int  # supervised steps of the base (seed 0)
    extra_factors: tuple[float, ...] = ()  # more plain learning rates (x the setting's), looking for one that fails


@dataclass(frozen=True)
class Variant:
    name: str
    lr_factor: float = 1.0
    every: int | None = None  # K: None = plain training
    ahead: int | None = None  # J
    guard: bool = True

    @property
    def jumps(self) -> bool:
        return self.every is not None


# Warm starts chosen from a scan of held-out accuracy every 50 supervised steps (seed 0), so that
# GRPO starts from partial accuracy: see in_loop.md.
SETTINGS = [
    Setting("add-lr1e-5", "addition", 1e-5, 950),
    Setting("add-lr1e-4", "addition", 1e-4, 950, extra_factors=(10.0,)),
    Setting("mul-lr3e-5", "multiplication", 3e-5, 1100),
]
SEEDS = (0, 1, 2)
KJ = ((10, 10), (10, 30), (10, 60))
VARIANTS = (
    [Variant("plain-1x")]
    + [Variant(f"jumps-K{k}-J{j}-guard", every=k, ahead=j, guard=True) for k, j in KJ]
    + [Variant("plain-2x", lr_factor=2.0), Variant("plain-4x", lr_factor=4.0)]
    + [Variant(f"jumps-K{k}-J{j}-noguard", every=k, ahead=j, guard=False) for k, j in KJ]
)


def variants_for(setting: Setting) -> list[Variant]:
    """The compared runs of a setting: VARIANTS plus its extra plain learning rates."""
    return VARIANTS + [Variant(f"plain-{f:g}x", lr_factor=f) for f in setting.extra_factors]


def base_dir(setting: Setting) -> Path:
    return ROOT / "bases" / f"{setting.task}-ws{setting.warm_start}"


def result_file(setting: Setting, seed: int, variant: Variant) -> Path:
    return ROOT / "results" / setting.name / f"seed{seed}" / f"{variant.name}.json"


def make_base(setting: Setting) -> Path:
    folder = base_dir(setting)
    if not (folder / "model.safetensors").is_file():
        task = calibration.TASKS[setting.task]
        pool, _ = task.split()
        tmp = folder.with_name(folder.name + ".tmp")
        calibration.warm_start(tmp, pool, setting.warm_start, seed=0)
        tmp.rename(folder)
    return folder


def evaluate(model, task) -> float:
    import torch

    _, test = task.split()
    state = torch.get_rng_state()
    try:
        return calibration.accuracy(model, calibration.char_tokenizer(), test, task.max_tokens)
    finally:
        torch.set_rng_state(state)
        model.train()


def train(setting: Setting, seed: int, variant: Variant, steps: int, plain_steps: int) -> dict:
    """One GRPO run; returns its record (scores at the evaluated steps, rewards, jumps, timings)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from relex_merge.integrations.trl import RelexCallback

    task = calibration.TASKS[setting.task]
    pool, _ = task.split()
    base = make_base(setting)
    total = plain_steps if variant.name == "plain-1x" else steps
    eval_at = set(range(0, total + 1, EVAL_EVERY)) | {total} if variant.name == "plain-1x" else {steps // 2, steps}
    scores: dict[int, float] = {}
    step_times: list[float] = []

    class Evaluate(TrainerCallback):
        def __init__(self):
            self.t = time.perf_counter()

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if 0 in eval_at:
                scores[0] = evaluate(model, task)
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step_times.append(time.perf_counter() - self.t)
            if state.global_step in eval_at:
                scores[state.global_step] = evaluate(model, task)
            self.t = time.perf_counter()

    def exact_match(completions, answer, **kwargs):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

    rng = random.Random(seed)
    rows = [{"prompt": q, "answer": a} for q, a in rng.sample(pool, len(pool))]
    work = ROOT / "work" / f"{setting.name}-seed{seed}-{variant.name}"
    args = GRPOConfig(
        output_dir=str(work),
        learning_rate=setting.lr * variant.lr_factor,
        lr_scheduler_type="constant",
        per_device_train_batch_size=512,
        num_generations=8,
        max_completion_length=task.max_tokens,
        temperature=1.0,
        beta=0.0,
        max_steps=total,
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        seed=seed,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    tokenizer = calibration.char_tokenizer()
    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(
        model=str(base),
        reward_funcs=exact_match,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)  # logs every step: keep them in log_history, not on stdout
    relex = None
    if variant.jumps:
        relex = RelexCallback(
            every=variant.every,
            ahead=variant.ahead,
            guard=variant.guard,
            reward_guard=variant.guard,
            reward_window=5,
            reward_margin=0.05,
        ).attach(trainer)
    trainer.add_callback(Evaluate())  # after RelexCallback: scores the weights a jump left
    wall, cpu = time.time(), time.process_time()
    trainer.train()
    wall, cpu = time.time() - wall, time.process_time() - cpu
    rewards = [
        {"step": e["step"], "reward": e["reward"]} for e in trainer.state.log_history if "reward" in e and "step" in e
    ]
    record = {
        "setting": asdict(setting),
        "seed": seed,
        "variant": asdict(variant),
        "lr": setting.lr * variant.lr_factor,
        "steps": total,
        "scores": {str(k): v for k, v in sorted(scores.items())},
        "rewards": rewards,
        "jumps": relex.history if relex is not None else [],
        "overhead_seconds": relex.jumper.seconds if relex is not None else 0.0,
        "step_seconds": step_times,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return record


# ----------------------------------------------------------------------------- the queue


def queue(steps: int) -> list[tuple[Setting, int, Variant]]:
    """Every run, the most important first: the issue's lr 1e-5 / 1e-4 comparisons with the guard
    on, then the baselines at 2x / 4x, then the unguarded jumps."""
    out = []
    for variant in VARIANTS:
        for setting in SETTINGS:
            for seed in SEEDS:
                out.append((setting, seed, variant))
    for setting in SETTINGS:
        for variant in variants_for(setting)[len(VARIANTS) :]:
            for seed in SEEDS:
                out.append((setting, seed, variant))
    return out


def run_queue(args) -> None:
    import torch

    torch.set_num_threads(1)
    todo = queue(args.steps)
    if args.only:
        todo = [t for t in todo if t[0].name in args.only.split(",")]
    for setting, seed, variant in todo:
        out = result_file(setting, seed, variant)
        if out.is_file():
            continue
        lock = out.with_suffix(".lock")
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # another worker has it
        except FileExistsError:
            continue
        os.close(fd)
        try:
            t = time.time()
            record = train(setting, seed, variant, args.steps, args.plain_steps)
            out.write_text(json.dumps(record, indent=1) + "\n")
            s = record["scores"]
            print(
                f"{setting.name} seed {seed} {variant.name}: "
                + ", ".join(f"@{k} {v:.3f}" for k, v in s.items() if int(k) in (0, args.steps // 2, args.steps))
                + f" ({time.time() - t:.0f} s wall, {record['cpu_seconds']:.0f} s cpu)",
                flush=True,
            )
        finally:
            lock.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the report


def load_results() -> dict:
    out: dict = {}
    for file in sorted((ROOT / "results").glob("*/seed*/*.json")):
        record = json.loads(file.read_text())
        out.setdefault(record["setting"]["name"], {}).setdefault(record["seed"], {})[record["variant"]["name"]] = record
    return out


def steps_to_reach(curve: dict[int, float], target: float) -> float | None:
    """The first step at which the plain curve reaches ``target`` (linear between evaluations);
    None when it never does within the curve."""
    points = sorted(curve.items())
    for (s0, a0), (s1, a1) in zip(points, points[1:]):
        if a1 >= target:
            if a0 >= target:
                return float(s0)
            return s0 + (target - a0) / (a1 - a0) * (s1 - s0)
    return None


def stderr(p: float, n: int = calibration.TEST_SIZE) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def report(args) -> None:
    results = load_results()
    steps = args.steps
    lines = [
        "# In the training loop: jumps against plain GRPO and a tuned learning rate",
        "",
        "Written by `python demo/in_loop.py --report` from the runs of `python demo/in_loop.py` "
        "(see its docstring for the setup). Scores: greedy exact match on 1000 held-out problems "
        f"(stderr about {stderr(0.5):.3f} at 50%), after {steps} real GRPO steps unless said otherwise.",
        "",
    ]
    records = [r for by_seed in results.values() for recs in by_seed.values() for r in recs.values()]
    cpu = sum(r["cpu_seconds"] for r in records)
    lines += [
        f"{len(records)} runs, {sum(r['steps'] for r in records)} GRPO steps, {cpu / 3600:.1f} h of one core "
        "(training and evaluations; wall time was longer on the shared machine). Sized to about 3 hours of one "
        "core: one window length (K = 10 steps, a snapshot every step), three jump lengths (J = 10, 30, 60), one "
        "supervised base per task, the plain curve for 'steps needed' to 300 steps scored every 25 (finer or "
        "longer curves, other K, more seeds, a larger model and a KL term were cut).",
        "",
        "Guard on = the backtest guard (the jump's length: the requested J if the window's backtest supports it, "
        "else its longest supported halving, else none) and the reward guard (undo a jump when the mean logged "
        "reward of the 5 steps after it fell by more than 0.05 against the 5 steps up to it). With K = 10 the "
        "backtest can test horizons up to 18 steps, so guarded J = 30 and J = 60 both jump at most 15. Guard off = "
        "every jump at its full length, nothing undone.",
        "",
    ]
    summary: dict = {"steps": steps, "runs": len(records), "cpu_hours": round(cpu / 3600, 2), "settings": {}}
    for setting in SETTINGS:
        by_seed = results.get(setting.name, {})
        if not by_seed:
            continue
        lines += [
            f"## {setting.name} ({setting.task}, lr {setting.lr:g}, base: {setting.warm_start} supervised steps)",
            "",
        ]
        seeds = sorted(by_seed)
        header = "| training | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs plain 1x | vs best plain |"
        lines += [header, "|---" * (len(seeds) + 4) + "|"]
        table: dict[str, dict[int, float]] = {}
        for variant in variants_for(setting):
            for seed in seeds:
                rec = by_seed[seed].get(variant.name)
                if rec is not None and str(steps) in rec["scores"]:
                    table.setdefault(variant.name, {})[seed] = rec["scores"][str(steps)]
        plain = table.get("plain-1x", {})
        best = {}
        for seed in seeds:
            options = {f: table.get(f"plain-{f}", {}).get(seed) for f in ("1x", "2x", "4x")}
            options = {f: v for f, v in options.items() if v is not None}
            if len(options) == 3:
                best[seed] = max(options.values())
        base_score = next((r["plain-1x"]["scores"].get("0") for r in by_seed.values() if "plain-1x" in r), None)
        rows = {}
        for variant in variants_for(setting):
            row = table.get(variant.name, {})
            if not row:
                continue
            cells = [f"{row[s]:.3f}" if s in row else "" for s in seeds]
            mean = sum(row.values()) / len(row)
            d_plain = [row[s] - plain[s] for s in seeds if s in row and s in plain]
            d_best = [row[s] - best[s] for s in seeds if s in row and s in best]
            fmt = lambda d: f"{sum(d) / len(d):+.3f} ({sum(x > 0 for x in d)}/{len(d)} above)" if d else ""  # noqa: E731
            label = _label(variant, setting)
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean:.3f} | {fmt(d_plain)} | {fmt(d_best)} |")
            rows[variant.name] = {
                "scores": {str(s): row[s] for s in row},
                "mean": mean,
                "minus_plain_1x": d_plain,
                "minus_best_plain": d_best,
            }
        lines.append(
            "| best of plain 1x/2x/4x (chosen per seed on this score) | "
            + " | ".join(f"{best[s]:.3f}" if s in best else "" for s in seeds)
            + (f" | {sum(best.values()) / len(best):.3f} | | |" if best else " | | | |")
        )
        lines.append("")
        if base_score is not None:
            lines.append(f"Base (step 0): {base_score:.3f}.")
        # steps plain needs
        reach_lines = []
        reach = {}
        for variant in VARIANTS:
            if not variant.jumps:
                continue
            needed = []
            for seed in seeds:
                rec, pl = by_seed[seed].get(variant.name), by_seed[seed].get("plain-1x")
                if rec is None or pl is None or str(steps) not in rec["scores"]:
                    continue
                curve = {int(k): v for k, v in pl["scores"].items()}
                s = steps_to_reach(curve, rec["scores"][str(steps)])
                needed.append(s)
            if needed:
                reach[variant.name] = needed
                shown = ", ".join("never" if s is None else f"{s:.0f}" for s in needed)
                reach_lines.append(f"| {_label(variant, setting)} | {shown} |")
        if reach_lines:
            plain_steps = max(
                (int(k) for r in by_seed.values() if "plain-1x" in r for k in r["plain-1x"]["scores"]), default=0
            )
            lines += [
                "",
                f"Steps plain GRPO at lr {setting.lr:g} needs to reach the score the jumps reached in {steps} steps "
                f"(per seed; its curve is scored every {EVAL_EVERY} steps up to {plain_steps}, interpolated; "
                '"never": not within them):',
                "",
                "| training | plain steps needed |",
                "|---|---|",
                *reach_lines,
            ]
        jumps_lines = _jump_stats(by_seed, setting)
        lines += ["", *jumps_lines, ""]
        summary["settings"][setting.name] = {
            "setting": asdict(setting),
            "rows": rows,
            "best_plain": {str(s): v for s, v in best.items()},
            "plain_steps_needed": reach,
            "base": base_score,
        }
    overhead = _overhead(results)
    lines += overhead
    (HERE / "in_loop.md").write_text("\n".join(lines) + "\n")
    _readme_block(summary, overhead)
    (HERE / "in_loop.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))


README_BEGIN = "<!-- in_loop:begin (written by python demo/in_loop.py --report) -->"
README_END = "<!-- in_loop:end -->"


def _readme_block(summary: dict, overhead: list[str]) -> None:
    """README's compact table: per setting, plain training at its lr and at the best of 1x/2x/4x
    (chosen per seed), and the best jumps with the guard on and off (means over seeds; in
    parentheses: J, and the seeds above plain at the same lr); then what that says, per setting."""
    rows = [
        "| setting (K=10) | plain, same lr | best plain lr (1x/2x/4x, per seed) | best jumps, guard on | "
        "best jumps, guard off |",
        "|---|---|---|---|---|",
    ]
    verdicts = []
    for name, entry in summary["settings"].items():
        plain = entry["rows"].get("plain-1x")
        best = entry["best_plain"]
        best_mean = sum(best.values()) / len(best) if best else None
        cells = []
        tops = {}
        for guard in (True, False):
            suffix = "-guard" if guard else "-noguard"
            jumps = {n: r for n, r in entry["rows"].items() if n.startswith("jumps") and n.endswith(suffix)}
            if not jumps:
                cells.append("")
                continue
            top = max(jumps, key=lambda n: jumps[n]["mean"])
            tops[guard] = (top, jumps[top])
            wins = jumps[top]["minus_plain_1x"]
            j = top.split("-J", 1)[1].split("-", 1)[0]
            cells.append(f"{jumps[top]['mean']:.3f} (J={j}; {sum(d > 0 for d in wins)}/{len(wins)})")
        plain_cell = "" if plain is None else f"{plain['mean']:.3f}"
        best_cell = "" if best_mean is None else f"{best_mean:.3f}"
        rows.append(f"| {name} | {plain_cell} | {best_cell} | {cells[0]} | {cells[1]} |")
        if tops and best:
            top, row = max(tops.values(), key=lambda t: t[1]["mean"])
            d = row["minus_best_plain"]
            above = sum(x > 0 for x in d)
            verdicts.append(
                f"{name}: {'beat' if above == len(d) and d else 'did not beat'} the best plain lr "
                f"({above}/{len(d)} seeds, mean {sum(d) / len(d):+.3f})"
            )
    block = rows + ["", "Against the tuned learning rate, the best jumps of each setting: " + "; ".join(verdicts) + "."]
    if overhead:
        block += ["", overhead[2]]
    readme = HERE.parent / "README.md"
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        print(f"{readme}: no {README_BEGIN} ... {README_END} block; README not updated")
        return
    before, rest = text.split(README_BEGIN, 1)
    _, after = rest.split(README_END, 1)
    readme.write_text(before + README_BEGIN + "\n" + "\n".join(block) + "\n" + README_END + after)


def _label(variant: Variant, setting: Setting) -> str:
    if not variant.jumps:
        return f"plain, lr {setting.lr * variant.lr_factor:g}"
    guard = "guard on" if variant.guard else "guard off"
    return f"jumps K={variant.every} J={variant.ahead}, {guard}, lr {setting.lr:g}"


def _jump_stats(by_seed: dict, setting: Setting) -> list[str]:
    rows = ["| jumps | decisions | taken | mean length taken | reverted by the reward guard |", "|---|---|---|---|---|"]
    for variant in VARIANTS:
        if not variant.jumps:
            continue
        decisions = taken = reverted = 0
        lengths = []
        for recs in by_seed.values():
            rec = recs.get(variant.name)
            if rec is None:
                continue
            for event in rec["jumps"]:
                if "requested" in event:
                    decisions += 1
                    if event["ahead"] > 0:
                        taken += 1
                        lengths.append(event["ahead"])
                elif event.get("reverted"):
                    reverted += 1
        if decisions:
            mean = f"{sum(lengths) / len(lengths):.1f}" if lengths else "-"
            rows.append(f"| {_label(variant, setting)} | {decisions} | {taken} | {mean} | {reverted} |")
    return rows


def _overhead(results: dict) -> list[str]:
    fractions, per_step, steps_s = [], [], []
    for by_seed in results.values():
        for recs in by_seed.values():
            for rec in recs.values():
                times = rec["step_seconds"]
                if rec["variant"]["every"] is None:
                    steps_s += times
                    continue
                total = sum(times)
                if total > 0:
                    fractions.append(rec["overhead_seconds"] / total)
                    per_step.append(rec["overhead_seconds"] / max(1, len(times)))
    if not fractions:
        return []
    fractions.sort()
    median_step = sorted(steps_s)[len(steps_s) // 2] if steps_s else float("nan")
    return [
        "## Overhead of the callback",
        "",
        f"RelexCallback's own time (snapshots, Gram passes, backtests, moves; on the training thread) over "
        f"{len(fractions)} runs: median {fractions[len(fractions) // 2]:.2%} of the run's step time, "
        f"max {fractions[-1]:.2%}; {sum(per_step) / len(per_step) * 1000:.1f} ms per step on average, against a "
        f"median plain step of {median_step:.2f} s (wall time on a shared 2-core machine; evaluations excluded).",
        "",
    ]


def time_step() -> None:
    import torch

    torch.set_num_threads(1)
    setting = SETTINGS[0]
    for task_setting in {s.task: s for s in SETTINGS}.values():
        t = time.time()
        record = train(task_setting, 0, Variant("timing"), steps=10, plain_steps=10)
        times = record["step_seconds"]
        print(
            f"{task_setting.task}: {len(times)} steps, median {sorted(times)[len(times) // 2]:.2f} s wall a step, "
            f"{record['cpu_seconds'] / len(times):.2f} s cpu a step (incl. 2 evaluations); "
            f"total {time.time() - t:.0f} s"
        )
    del setting


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="real GRPO steps of every compared run")
    parser.add_argument("--plain-steps", type=int, default=300, help="steps of the plain 1x curve")
    parser.add_argument("--only", default="", help="comma-separated setting names")
    parser.add_argument("--workers", type=int, default=1, help="runs trained at once (processes)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--time-step", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.list:
        for setting, seed, variant in queue(args.steps):
            done = "done" if result_file(setting, seed, variant).is_file() else ""
            print(f"{setting.name:12s} seed {seed} {variant.name:24s} {done}")
        return
    if args.report:
        report(args)
        return
    if args.time_step:
        time_step()
        return
    for setting in SETTINGS:  # before any worker starts: every run of a task shares its base
        make_base(setting)
    if args.workers > 1:
        import subprocess

        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--steps", str(args.steps), "--plain-steps", str(args.plain_steps)]
                + (["--only", args.only] if args.only else [])
            )
            for _ in range(args.workers)
        ]
        sys.exit(max(p.wait() for p in procs))
    run_queue(args)


if __name__ == "__main__":
    main()

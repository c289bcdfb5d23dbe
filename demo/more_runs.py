"""More real GRPO runs with demo/make_demo_run.py's knobs, beyond the two shipped ones: does the
line (RELEX) or `fit: auto` beat stopping at the last window checkpoint?

    pip install ".[demo]"
    python demo/more_runs.py [--work runs/more] [--only NAME,...] [--out demo/more_runs.md]

Each run is trained once into --work (seeded; every step kept; minutes each on 2 CPU cores),
then for each target step: the last window checkpoint, the true checkpoint, the linear and the
`fit: auto` predictions are scored with the demo's greedy exact match on the 300 held-out
problems (make_demo_run.accuracy: the same generation and answer as the lm-eval task), and the
verdict the merge printed is recorded. Nothing here is tuned to a run: every run uses the same
configs, only the window and the targets scale with it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass(frozen=True)
class Run:
    name: str
    lr: float
    steps: int  # GRPO steps trained
    window: int  # steps 1..window observed
    targets: tuple[int, ...]
    seed: int = 0
    sft_steps: int = 1500
    batch: int = 512  # completions per GRPO step


RUNS = [
    Run("lr1e-4-seed1", 1e-4, 200, 20, (40, 60, 100, 200), seed=1),
    Run("lr3e-4", 3e-4, 200, 30, (60, 100, 200)),
    Run("lr5e-5", 5e-5, 400, 30, (60, 100, 200, 400), seed=2),
    Run("lr3e-5", 3e-5, 300, 30, (60, 100, 150, 300)),
    Run("lr1e-5", 1e-5, 400, 30, (60, 100, 200, 400)),
    Run("warm-start-750", 1e-4, 200, 20, (40, 60, 100, 200), sft_steps=750),
    Run("warm-start-3000-lr3e-5", 3e-5, 300, 30, (60, 100, 150, 300), sft_steps=3000),
]


def train(run: Run, folder: Path) -> None:
    import make_demo_run as demo

    train_pairs, _ = demo.split(0)
    work = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    base = work / "base"
    demo.warm_start(base, train_pairs, demo.split(0)[1], run.sft_steps, run.seed, lambda text: None)
    demo.grpo(base, work / "grpo", train_pairs, run.steps, run.lr, run.seed, batch=run.batch)
    for checkpoint in sorted((work / "grpo").glob("checkpoint-*")):
        dst = work / checkpoint.name
        dst.mkdir()
        for name in ("model.safetensors", "config.json", "generation_config.json", "trainer_state.json"):
            if (checkpoint / name).is_file():
                shutil.copy(checkpoint / name, dst / name)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(base / name, dst / name)
    shutil.rmtree(work / "grpo")
    work.rename(folder)


def evaluate(run: Run, folder: Path) -> list[str]:
    import make_demo_run as demo
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from relex_merge.config.schema import parse_config
    from relex_merge.engine import EngineOptions
    from relex_merge.testing.synthetic import char_tokenizer
    from relex_merge.workflows.merge import execute_merge
    from relex_merge.workflows.plan import plan_merge

    _, test = demo.split(0)
    tokenizer = char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder / "base")

    def score(weights: Path) -> float:
        model.load_state_dict(load_file(weights / "model.safetensors"), strict=False)
        return demo.accuracy(model, tokenizer, test)

    last = score(folder / f"checkpoint-{run.window}")
    rows = []
    predictions: dict[str, dict[int, tuple[float, str]]] = {}
    for fit in ("linear", "auto"):
        config = {
            "merge_method": "relex",
            "base_model": str(folder / "base"),
            "trajectory": {"run_dir": str(folder), "steps": f"1-{run.window}"},
            "parameters": {"target_step": list(run.targets), "fit": fit},
        }
        plan = plan_merge(parse_config(config, run.name))
        with tempfile.TemporaryDirectory() as tmp:
            built = execute_merge(plan, Path(tmp) / "out", EngineOptions(max_memory=1 << 30))
            for (target, _, out), chosen, verdict in zip(
                built.outputs, built.assessment.fits, built.assessment.verdicts
            ):
                said = (
                    "supported"
                    if verdict.supported
                    else ("stop" if verdict.error >= verdict.stop_error else "uncertain")
                )
                predictions.setdefault(fit, {})[target] = (score(out), f"{chosen.describe()}; {said}")
    for target in run.targets:
        horizon = (target - run.window) / (run.window - 1)
        linear, (auto, auto_said) = predictions["linear"][target], predictions["auto"][target]
        rows.append(
            f"| {run.name} | {target} | {horizon:.1f}x | {last:.3f} | {score(folder / f'checkpoint-{target}'):.3f} "
            f"| {linear[0]:.3f} ({linear[1].split('; ')[1]}) | {auto:.3f} ({auto_said}) |"
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "more")
    parser.add_argument("--only", default="", help="comma-separated run names")
    parser.add_argument("--out", type=Path, default=HERE / "more_runs.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    wanted = {n for n in args.only.split(",") if n}
    runs = [r for r in RUNS if not wanted or r.name in wanted]
    lines = [
        "| run | target | horizon | last window checkpoint | true checkpoint | linear (verdict) "
        "| fit: auto (its fit; verdict) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        folder = args.work / run.name
        if not (folder / "base").is_dir():
            print(f"training {run.name} into {folder}", file=sys.stderr)
            folder.parent.mkdir(parents=True, exist_ok=True)
            train(run, folder)
        print(f"evaluating {run.name}", file=sys.stderr)
        lines += evaluate(run, folder)
        # Written after every run so that an interrupted sweep keeps what it measured.
        text = (
            "Exact match (greedy) on the demo's 300 held-out problems; window = GRPO steps 1..W, every step; "
            "horizon in window spans past its end. Verdict: supported; uncertain (not supported, closer than "
            "stopping); stop (stopping is closer).\n\n" + "\n".join(lines) + "\n\nRerun: `python demo/more_runs.py`\n"
        )
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

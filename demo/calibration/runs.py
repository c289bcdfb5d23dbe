"""The calibration corpus (issue 19): REAL GRPO runs made with TRL, their definitions and training.

    pip install ".[demo]"
    python demo/calibration/runs.py --data                 # held-out test sets + lm-eval task YAMLs
    python demo/calibration/runs.py [--only NAME,...]       # train every run (resumable), ~1.5 h of one core
                                                            # (several such processes share the list)
    python demo/calibration/runs.py --list                  # the run table (task, lr, seed, beta, window, targets)

Two tasks with different dynamics, both scored by greedy exact match:
- ``addition``: a+b with 0 <= a, b <= 99 (the demo's task); 1000 of the 10,000 problems held out.
- ``multiplication``: b*a with 10 <= b <= 999 and 2 <= a <= 9 (answers up to 4 digits, carries);
  1000 of the 7,920 problems held out. The tiny model learns it far more slowly than addition.
  (String reversal was tried first and dropped: supervised training takes the tiny model from
  10% to 98% in 150 steps, so GRPO would have nothing left to learn.)

Each run: a tiny Qwen2 (character tokenizer, ~80K parameters, the demo's) warm-started by
supervised training on the task's training problems to partial accuracy (``base/``), then
TRL's GRPOTrainer with an exact-match reward (8 completions per prompt, 512 completions a
step, constant learning rate, ``beta`` = KL weight). Kept, under ROOT/<name>/: ``base``, the
window checkpoints and the true checkpoints at the targets (model.safetensors, configs,
trainer_state.json, tokenizer files); ``run.json`` holds the run's definition, its accuracies
(make_demo_run-style greedy accuracy on the held-out set, a quick sanity number; score.py's
lm-eval numbers are the reported ones) and how long each stage took.

The held-out problems are never trained on: the warm start and GRPO draw from the rest only.
Everything is seeded. Nothing here depends on relex-merge beyond its tokenizer/config helpers
(copied below, so that this file survives the package's reorganisation).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ROOT = Path(os.environ.get("RELEX_CALIBRATION_ROOT", "/work/runs/calibration"))
TEST_SIZE = 1000
SPLIT_SEED = 2605  # the held-out split; fixed for every run of a task


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    name: str
    lm_eval_task: str  # the task name in demo/calibration/tasks/
    max_tokens: int  # answer characters + end of sequence (GRPO's max_completion_length, lm-eval's max_gen_toks)
    problems: Callable[[], list[tuple[str, str]]]  # every (prompt, answer)

    def split(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(training pool, held-out test set): the same for every run."""
        problems = self.problems()
        random.Random(SPLIT_SEED).shuffle(problems)
        return problems[TEST_SIZE:], problems[:TEST_SIZE]

    @property
    def test_file(self) -> Path:
        return REPO / "demo" / "data" / f"calibration_{self.name}_test.jsonl"


def _addition() -> list[tuple[str, str]]:
    return [(f"{a}+{b}=", str(a + b)) for a in range(100) for b in range(100)]


def _multiplication() -> list[tuple[str, str]]:
    return [(f"{b}*{a}=", str(a * b)) for b in range(10, 1000) for a in range(2, 10)]


TASKS = {
    "addition": Task("addition", "relex_calibration_addition", 4, _addition),
    "multiplication": Task("multiplication", "relex_calibration_multiplication", 5, _multiplication),
}

YAML = """# lm-eval task over the calibration corpus' held-out {name} problems ({n}; never trained on).
# Paths are relative to the repository root: run lm_eval / relex-merge / score.py from there.
# Written by: python demo/calibration/runs.py --data
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["</s>", "\\n"]
  max_gen_toks: {max_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_data() -> None:
    """The held-out test sets (jsonl) and their lm-eval task YAMLs."""
    for task in TASKS.values():
        _, test = task.split()
        task.test_file.parent.mkdir(parents=True, exist_ok=True)
        with open(task.test_file, "w") as f:
            for question, answer in test:
                f.write(json.dumps({"question": question, "answer": answer}) + "\n")
        yaml = HERE / "tasks" / f"{task.lm_eval_task}.yaml"
        yaml.parent.mkdir(parents=True, exist_ok=True)
        yaml.write_text(
            YAML.format(
                name=task.name,
                n=len(test),
                task=task.lm_eval_task,
                data=task.test_file.relative_to(REPO),
                max_tokens=task.max_tokens,
            )
        )
        print(f"{task.test_file.relative_to(REPO)}: {len(test)} problems; {yaml.relative_to(REPO)}")


# ----------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    name: str
    task: str
    lr: float
    seed: int
    spacing: int  # steps between window checkpoints
    count: int  # window checkpoints
    horizons: tuple[float, ...]  # targets, in window spans past the window's end
    start: int | None = None  # first window step (default: spacing)
    beta: float = 0.0  # KL weight (0: no reference model)
    warm_start: int = 600  # supervised steps before GRPO (see the note above RUNS)
    batch: int = 512  # completions per GRPO step (64 prompts x 8)

    @property
    def window(self) -> list[int]:
        first = self.start if self.start is not None else self.spacing
        return [first + i * self.spacing for i in range(self.count)]

    @property
    def span(self) -> int:
        return self.window[-1] - self.window[0]

    @property
    def targets(self) -> list[int]:
        last = self.window[-1]
        return sorted({last + max(1, round(h * self.span)) for h in self.horizons})

    def horizon(self, target: int) -> float:
        return (target - self.window[-1]) / self.span

    @property
    def steps(self) -> int:
        return self.targets[-1]

    def describe(self) -> dict:
        d = asdict(self)
        d.update(
            window=self.window,
            span=self.span,
            targets=self.targets,
            target_horizons=[round(self.horizon(t), 3) for t in self.targets],
            grpo_steps=self.steps,
        )
        return d


A, M = "addition", "multiplication"
# Warm starts: measured before any GRPO run (held-out accuracy every 50 supervised steps, seeds 0
# and 3), addition jumps from ~10% to 50-90% between 600 and 1000 steps (seed-dependent), so its
# runs start at 350 / 600 / 800 steps; multiplication climbs slowly (~25-45% at 750 steps), so
# 500 / 750 / 1000. (make_demo_run.py's 1500 steps reach only ~20% because its training loop
# pads on the left after its first accuracy check, which misplaces the answer mask; this file
# keeps right padding throughout, and 1500 steps then reach ~95%.)
# Chosen before any run was trained, to spread the knobs: lr 3e-6..3e-4, seeds, windows of 10-40
# checkpoints, spacing 1-5, KL on (beta 0.04) and off, warm starts of different lengths, two
# windows that start mid-run, horizons 1x-20x overall. Far horizons go with short spans (cheap).
RUNS = [
    Run("add-lr1e-4-s0", A, 1e-4, 0, 1, 20, (1, 2, 4, 8, 12, 20)),
    Run("add-lr3e-4-s1-kl", A, 3e-4, 1, 2, 15, (1, 2, 3, 5, 10), beta=0.04),
    Run("add-lr3e-5-s2", A, 3e-5, 2, 5, 20, (1, 2, 3, 5)),
    Run("add-lr1e-5-s0-kl", A, 1e-5, 0, 3, 30, (1, 2, 4, 6), beta=0.04),
    Run("add-lr3e-6-s1", A, 3e-6, 1, 4, 25, (1, 2, 3, 5, 8)),
    Run("add-lr1e-4-s3-kl-ws350", A, 1e-4, 3, 1, 40, (1, 2, 5, 10, 15), beta=0.04, warm_start=350),
    Run("add-lr5e-5-s4-ws800", A, 5e-5, 4, 2, 10, (1, 3, 6, 10, 15, 20), warm_start=800),
    Run("add-lr1e-4-s5-late", A, 1e-4, 5, 5, 11, (1, 2, 4, 8), start=50),
    Run("mul-lr1e-4-s0", M, 1e-4, 0, 1, 20, (1, 2, 4, 8, 12, 20), warm_start=750),
    Run("mul-lr3e-4-s1-kl", M, 3e-4, 1, 1, 10, (1, 3, 6, 10, 15, 20), beta=0.04, warm_start=750),
    Run("mul-lr3e-5-s2", M, 3e-5, 2, 2, 20, (1, 2, 4, 8, 12), warm_start=750),
    Run("mul-lr1e-5-s0-kl", M, 1e-5, 0, 5, 12, (1, 2, 4, 7, 10), beta=0.04, warm_start=750),
    Run("mul-lr3e-6-s3", M, 3e-6, 3, 3, 15, (1, 2, 5, 10, 15), warm_start=750),
    Run("mul-lr5e-5-s1-ws500", M, 5e-5, 1, 4, 40, (1, 1.5, 2, 3), warm_start=500),
    Run("mul-lr1e-4-s2-kl-ws1000", M, 1e-4, 2, 2, 25, (1, 2, 4, 6, 8), beta=0.04, warm_start=1000),
    Run("mul-lr2e-4-s3-late", M, 2e-4, 3, 3, 11, (1, 2, 4, 8, 12), start=30, warm_start=750),
    # Added after the first runs were trained, as replacements: at lr 3e-6 neither task learns in
    # the steps this machine affords (add-lr3e-6-s1: 0.107 -> 0.115 in 868 steps). Chosen by the
    # same rules (warmer bases, mid learning rates), before they were trained or scored.
    Run("add-lr2e-4-s6-ws800", A, 2e-4, 6, 3, 15, (1, 2, 4, 8), warm_start=800),
    Run("mul-lr1e-4-s4-ws1000", M, 1e-4, 4, 1, 30, (1, 3, 6, 10), warm_start=1000),
]
BY_NAME = {r.name: r for r in RUNS}


# ----------------------------------------------------------------------------- training

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = string.digits + string.ascii_letters + " +-=*/.,:;?!()'\"\n"  # relex_merge.synthetic's vocabulary


def char_tokenizer():
    """The demo's character-level tokenizer (a copy of relex_merge.synthetic.char_tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_config():
    """The demo's model: Qwen2, hidden 64, 2 layers, MLP 128, tied embeddings."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(SPECIAL_TOKENS) + len(CHARS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def accuracy(model, tokenizer, problems: list[tuple[str, str]], max_tokens: int) -> float:
    """Greedy exact match (the same generation and answer as the lm-eval task): a quick check."""
    import torch

    tokenizer.padding_side = "left"
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(problems), 250):
            batch = problems[start : start + 250]
            enc = tokenizer([q for q, _ in batch], return_tensors="pt", padding=True)
            out = model.generate(
                **enc,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(t.strip() == a for t, (_, a) in zip(texts, batch))
    return correct / len(problems)


def warm_start(out: Path, train: list[tuple[str, str]], steps: int, seed: int) -> None:
    """Supervised training on the answers only, stopped early (make_demo_run.warm_start's recipe)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    tokenizer.padding_side = "right"
    model.train()
    for _ in range(steps):
        batch = [train[rng.randrange(len(train))] for _ in range(128)]
        enc = tokenizer([q + a + tokenizer.eos_token for q, a in batch], return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        for i, (q, _) in enumerate(batch):
            labels[i, : len(q)] = -100  # learn the answer, not the question
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def grpo(base: Path, work: Path, train: list[tuple[str, str]], run: Run, task: Task) -> None:
    """TRL's GRPOTrainer from ``base``, saving only the window and target steps."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    keep = set(run.window) | set(run.targets)

    class SaveOnly(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in keep:
                control.should_save = True
            return control

    def exact_match(completions, answer, **kwargs):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

    rng = random.Random(run.seed)
    rows = [{"prompt": q, "answer": a} for q, a in rng.sample(train, len(train))]
    args = GRPOConfig(
        output_dir=str(work),
        learning_rate=run.lr,
        lr_scheduler_type="constant",
        per_device_train_batch_size=run.batch,  # completions: batch / num_generations prompts a step
        num_generations=8,
        max_completion_length=task.max_tokens,
        temperature=1.0,
        beta=run.beta,
        max_steps=run.steps,
        save_strategy="steps",
        save_steps=10**9,  # SaveOnly decides
        save_only_model=True,
        logging_steps=10,
        report_to=[],
        seed=run.seed,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    tokenizer = char_tokenizer()
    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(
        model=str(base),
        reward_funcs=exact_match,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[SaveOnly()],
    )
    trainer.train()


KEPT = ("model.safetensors", "config.json", "generation_config.json", "trainer_state.json")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


def train(run: Run, root: Path = ROOT) -> dict:
    """Train one run into root/<name> (skipped when run.json is there); returns its record."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = root / run.name
    if (folder / "run.json").is_file():
        return json.loads((folder / "run.json").read_text())
    task = TASKS[run.task]
    pool, test = task.split()
    work = root / f".{run.name}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    times = {}
    t, c = time.time(), time.process_time()
    warm_start(work / "base", pool, run.warm_start, run.seed)
    times["warm_start_s"], times["warm_start_cpu_s"] = round(time.time() - t, 1), round(time.process_time() - c, 1)
    t, c = time.time(), time.process_time()
    grpo(work / "base", work / "grpo", pool, run, task)
    times["grpo_s"], times["grpo_cpu_s"] = round(time.time() - t, 1), round(time.process_time() - c, 1)
    for step in run.window + run.targets:
        src, dst = work / "grpo" / f"checkpoint-{step}", work / f"checkpoint-{step}"
        dst.mkdir()
        for name in KEPT:
            if (src / name).is_file():
                shutil.copy(src / name, dst / name)
        for name in TOKENIZER:
            shutil.copy(work / "base" / name, dst / name)
    last_state = json.loads((work / "grpo" / f"checkpoint-{run.targets[-1]}" / "trainer_state.json").read_text())
    shutil.rmtree(work / "grpo")
    t, c = time.time(), time.process_time()
    tokenizer = char_tokenizer()
    quick = {}
    for label, sub in [("base", "base"), ("last", f"checkpoint-{run.window[-1]}")] + [
        (str(s), f"checkpoint-{s}") for s in run.targets
    ]:
        model = AutoModelForCausalLM.from_pretrained(work / sub)
        quick[label] = accuracy(model, tokenizer, test, task.max_tokens)
    times["quick_accuracy_s"], times["quick_accuracy_cpu_s"] = (
        round(time.time() - t, 1),
        round(time.process_time() - c, 1),
    )
    record = {
        "run": run.describe(),
        "quick_accuracy": quick,  # greedy exact match on the 1000 held-out problems
        "train_reward": [
            {"step": e["step"], "reward": e.get("reward"), "kl": e.get("kl")}
            for e in last_state["log_history"]
            if "reward" in e
        ],
        "seconds": times,  # wall (_s) and this process' CPU time (_cpu_s; one thread)
        "torch_threads": torch.get_num_threads(),
    }
    (work / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)
    return record


def _lock(root: Path, name: str) -> bool:
    """Claim a run for this process (several trainers may share the list); False if a live one has it."""
    root.mkdir(parents=True, exist_ok=True)
    lock = root / f".{name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False  # its owner is alive
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # stale: its owner died
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help=f"where runs live (default {ROOT})")
    parser.add_argument("--only", default="", help="comma-separated run names")
    parser.add_argument("--data", action="store_true", help="write the held-out test sets and task YAMLs, then stop")
    parser.add_argument("--list", action="store_true", help="print the run table, then stop")
    args = parser.parse_args(argv)
    if args.data:
        write_data()
        return
    wanted = [n for n in args.only.split(",") if n]
    for name in wanted:
        if name not in BY_NAME:
            parser.error(f"unknown run {name!r}")
    runs = [BY_NAME[n] for n in wanted] if wanted else RUNS
    if args.list:
        for r in runs:
            print(
                f"{r.name:26s} {r.task:14s} lr {r.lr:<6g} seed {r.seed} beta {r.beta:<4g} warm {r.warm_start:<4d} "
                f"window {r.window[0]}..{r.window[-1]} every {r.spacing} ({r.count}) targets {r.targets} "
                f"horizons {[round(r.horizon(t), 1) for t in r.targets]}"
            )
        print(f"{len(runs)} runs, {sum(len(r.targets) for r in runs)} targets, {sum(r.steps for r in runs)} GRPO steps")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    for run in runs:
        t = time.time()
        if not (args.root / run.name / "run.json").is_file() and not _lock(args.root, run.name):
            print(f"{run.name}: being trained by another process, skipped", flush=True)
            continue
        try:
            record = train(run, args.root)
        finally:
            (args.root / f".{run.name}.lock").unlink(missing_ok=True)
        q = record["quick_accuracy"]
        print(
            f"{run.name}: base {q['base']:.3f}, last {q['last']:.3f}, "
            + ", ".join(f"@{s} {q[str(s)]:.3f}" for s in run.targets)
            + f" ({time.time() - t:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()

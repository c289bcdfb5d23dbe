"""Train the demo's REAL RL run: a tiny model learns 2-digit addition, then GRPO improves it.

    pip install ".[demo]"
    python demo/make_demo_run.py demo/run            # ~2 minutes on 2 CPU cores
    python demo/make_demo_run.py demo/run-slow --lr 1e-5 --window 30 --every 2 --later 60,100,200,400

1. Data: every a+b with 0 <= a, b <= 99; 300 pairs are held out as the test set
   (demo/data/addition_test.jsonl, scored by the lm-eval task in demo/tasks/).
2. Warm start: supervised training of a tiny Qwen2 (character tokenizer, ~80K parameters)
   to partial accuracy. This is the RL run's base: OUT/base.
3. GRPO (TRL's GRPOTrainer) with an exact-match reward, saving every step. Kept:
   OUT/checkpoint-1 .. checkpoint-WINDOW (the window RELEX observes; with --every N only every
   N-th step) and later true checkpoints (--later; default 2x, 3x, 5x and 10x the window), to
   compare predictions with truth.

Everything is seeded; weights are stored in float32 (RL updates at this learning rate are far
below one bf16 ulp).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path

import torch

from relex_merge.testing.synthetic import char_tokenizer, tiny_config

HERE = Path(__file__).resolve().parent
TEST_SIZE = 300


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(100) for b in range(100)]


def split(seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = all_pairs()
    random.Random(seed).shuffle(pairs)
    return pairs[TEST_SIZE:], pairs[:TEST_SIZE]


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def write_test_set(path: Path, test: list[tuple[int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for a, b in test:
            f.write(json.dumps({"question": prompt(a, b), "answer": str(a + b)}) + "\n")


def accuracy(model, tokenizer, pairs: list[tuple[int, int]]) -> float:
    tokenizer.padding_side = "left"
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(pairs), 100):
            batch = pairs[start : start + 100]
            enc = tokenizer([prompt(a, b) for a, b in batch], return_tensors="pt", padding=True)
            out = model.generate(
                **enc,
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(t.strip() == str(a + b) for t, (a, b) in zip(texts, batch))
    return correct / len(pairs)


def warm_start(out: Path, train, test, steps: int, seed: int, log) -> None:
    """Supervised training on the answers only, stopped early: the RL run's base."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    config = tiny_config("qwen2", tied=True, hidden=64, layers=2)
    config.intermediate_size = 128
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    tokenizer.padding_side = "right"
    for step in range(1, steps + 1):
        model.train()
        batch = [train[rng.randrange(len(train))] for _ in range(128)]
        texts = [prompt(a, b) + str(a + b) + tokenizer.eos_token for a, b in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        for i, (a, b) in enumerate(batch):
            labels[i, : len(prompt(a, b))] = -100  # learn the answer, not the question
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0:
            log(f"warm start step {step}: loss {loss.item():.3f}, test accuracy {accuracy(model, tokenizer, test):.3f}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def grpo(base: Path, work: Path, train, max_steps: int, lr: float, seed: int, batch: int = 512) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def exact_match(completions, answer, **kwargs):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

    rng = random.Random(seed)
    rows = [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in rng.sample(train, len(train))]
    args = GRPOConfig(
        output_dir=str(work),
        learning_rate=lr,
        lr_scheduler_type="constant",
        per_device_train_batch_size=batch,  # completions: batch / num_generations prompts a step
        num_generations=8,
        max_completion_length=4,
        temperature=1.0,
        beta=0.0,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=1,
        save_only_model=True,
        logging_steps=10,
        report_to=[],
        seed=seed,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
    )
    tokenizer = char_tokenizer()
    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(
        model=str(base),
        reward_funcs=exact_match,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()


def keep(work: Path, base: Path, out: Path, steps: list[int]) -> None:
    for step in steps:
        src = work / f"checkpoint-{step}"
        dst = out / f"checkpoint-{step}"
        dst.mkdir(parents=True)
        for name in ("model.safetensors", "config.json", "generation_config.json", "trainer_state.json"):
            if (src / name).is_file():
                shutil.copy(src / name, dst / name)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(base / name, dst / name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--window", type=int, default=20, help="consecutive GRPO steps kept (default 20)")
    parser.add_argument("--sft-steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-4, help="GRPO learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=1, help="keep every N-th window step (default: all)")
    parser.add_argument("--later", default=None, help="true checkpoints to keep past the window, e.g. 60,100,200")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty")
    train, test = split(args.seed)
    write_test_set(HERE / "data" / "addition_test.jsonl", test)
    later = [int(s) for s in args.later.split(",")] if args.later else [m * args.window for m in (2, 3, 5, 10)]
    window = list(range(args.every, args.window + 1, args.every))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = args.out / "base"
        warm_start(base, train, test, args.sft_steps, args.seed, print)
        grpo(base, work / "grpo", train, later[-1], args.lr, args.seed)
        keep(work / "grpo", base, args.out, window + later)
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()
    for folder in [base] + [args.out / f"checkpoint-{s}" for s in (args.window, *later)]:
        model = AutoModelForCausalLM.from_pretrained(folder)
        print(f"{folder.name}: test accuracy {accuracy(model, tokenizer, test):.3f}")


if __name__ == "__main__":
    main()

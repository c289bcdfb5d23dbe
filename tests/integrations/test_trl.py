"""RelexCallback in real transformers trainers: the jumps happen every K optimizer steps, their
diagnostics reach the logs (log_history, and the reporters that run after the callback), and in
TRL's GRPOTrainer the logged reward feeds the reward guard."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from relex_merge.integrations.trl import RelexCallback
from relex_merge.testing.synthetic import char_tokenizer, tiny_config


class Recorder(TrainerCallback):
    """A stand-in for a reporter (wandb, tensorboard): what on_log showed it."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, 40, (n, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(tmp_path, callbacks=None, max_steps=6, report_to=()):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(hidden=16, layers=1))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=100,  # only the callback's own log requests log at a jump's step
        save_strategy="no",
        report_to=list(report_to),
        use_cpu=True,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)


def test_plain_trainer_jumps_and_logs(tmp_path):
    trainer = _trainer(tmp_path)
    recorder = Recorder()
    trainer.add_callback(recorder)
    relex = RelexCallback(every=3, ahead=3, guard=False).attach(trainer)
    assert trainer.callback_handler.callbacks[0] is relex
    trainer.train()
    logged = {e["step"]: e for e in trainer.state.log_history if "relex/jump_taken" in e}
    assert sorted(logged) == [3, 6]
    assert all(e["relex/jump_taken"] == 3.0 and e["relex/jump_requested"] == 3.0 for e in logged.values())
    assert logged[6]["relex/jumps"] == 2.0 and logged[6]["relex/virtual_step"] == 12.0
    assert 0.0 < logged[3]["relex/explained_variance_1"] <= 1.0
    seen = [e for e in recorder.seen if "relex/jump_taken" in e]
    assert len(seen) == 2  # the reporter after the callback saw them
    assert [h["step"] for h in relex.history] == [3, 6]
    assert not relex.jumper.store.ram  # on_train_end dropped the snapshots


def test_callbacks_argument_still_logs_to_history(tmp_path):
    relex = RelexCallback(every=3, ahead=2, guard=False)
    trainer = _trainer(tmp_path, callbacks=[relex], max_steps=3)
    trainer.train()
    assert any(e.get("relex/jump_taken") == 2.0 for e in trainer.state.log_history)


def test_jump_moves_the_trainers_model(tmp_path):
    """The weights the trainer continues from are the jumped ones (the callback moved the
    trainer's own parameters, not a copy)."""
    plain = _trainer(tmp_path / "plain", max_steps=3)
    plain.train()
    jumped = _trainer(tmp_path / "jumped", max_steps=3)
    RelexCallback(every=3, ahead=3, guard=False).attach(jumped)
    jumped.train()
    differ = [
        n
        for (n, a), (_, b) in zip(plain.model.named_parameters(), jumped.model.named_parameters())
        if not torch.equal(a, b)
    ]
    assert differ  # the same 3 steps, then a jump


@pytest.mark.slow
def test_grpo_reward_feeds_the_guard(tmp_path):
    import trl  # in the test extra: CI runs it
    from datasets import Dataset

    GRPOConfig, GRPOTrainer = trl.GRPOConfig, trl.GRPOTrainer

    folder = tmp_path / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(hidden=16, layers=1)).save_pretrained(folder)
    tokenizer = char_tokenizer()
    tokenizer.padding_side = "left"

    def reward(completions, **kwargs):
        return [float(len(c.strip()) % 3) / 2 for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        learning_rate=1e-3,
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=4,
        max_steps=8,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        beta=0.0,
    )
    trainer = GRPOTrainer(
        model=str(folder),
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(64)]),
        processing_class=tokenizer,
    )
    relex = RelexCallback(every=4, ahead=4, guard=False, reward_guard=True, reward_window=2, reward_margin=10.0)
    relex.attach(trainer)
    trainer.train()
    assert len(relex.jumper.rewards) == 8  # every step's logged reward
    checks = [e for e in trainer.state.log_history if "relex/reverted" in e]
    assert checks and checks[0]["relex/reverted"] == 0.0  # a margin of 10 never reverts
    assert checks[0]["step"] == 7  # the jump at 4, its 2 steps after, decided at the step after

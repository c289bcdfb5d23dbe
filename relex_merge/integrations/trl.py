"""``RelexCallback``: jumps ahead while a transformers Trainer trains (TRL's GRPOTrainer, PPO/RLOO-style
trainers, plain Trainer), guarded by the window's own backtest and optionally by the reward.

    from relex_merge.integrations.trl import RelexCallback

    trainer = GRPOTrainer(model=..., args=GRPOConfig(..., logging_steps=1), ...)
    RelexCallback(every=10, ahead=30, reward_guard=True).attach(trainer)
    trainer.train()

Every ``every`` optimizer steps it fits the weights' window since the last jump and moves the live
weights ``ahead`` steps along it (relex_merge.integrations.jumps explains the moves, the guards,
sharded parameters and the memory budget); the optimizer and its state are left as they are.

Diagnostics go into the trainer's logs under ``relex/`` (explained variance, linear R^2, backtest
error and stopping's, the verdict, the jump requested and taken, reverts, the overhead): the
callback asks for a log at every jump and adds its metrics to the ``logs`` of the next ``on_log``
and to ``state.log_history``. Reporting callbacks (wandb, tensorboard) see them when they run after
this one: ``attach(trainer)`` puts it first (``callbacks=[...]`` puts it after the reporters, which
then miss them; log_history has them either way).

The reward guard reads ``reward_key`` (TRL's GRPO/RLOO log ``reward``) from the logs: log every
step (``logging_steps=1``), or at least once inside each ``reward_window``.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from relex_merge.integrations.jumps import JumpConfig, Jumper

__all__ = ["RelexCallback"]

log = logging.getLogger(__name__)


class RelexCallback(TrainerCallback):
    """Jump the live weights ahead every ``every`` steps (see the module docstring). Keyword
    arguments are JumpConfig's, plus ``reward_key`` (the logged reward the reward guard reads)."""

    def __init__(self, config: JumpConfig | None = None, *, reward_key: str = "reward", **kwargs):
        self.jumper = Jumper(config if config is not None else JumpConfig(**kwargs))
        self.reward_key = reward_key
        self._pending: dict[str, float] = {}
        self._attached = False
        self._begun = False

    @property
    def config(self) -> JumpConfig:
        return self.jumper.config

    @property
    def history(self) -> list[dict]:
        """One record per jump decision and per reward check (also on ranks that do not log)."""
        return self.jumper.history

    def attach(self, trainer) -> RelexCallback:
        """Add this callback to ``trainer`` ahead of every other (the reporters then log its metrics)."""
        handler = trainer.callback_handler
        handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]
        self._attached = True
        return self

    # -- TrainerCallback events

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("RelexCallback: the trainer passed no model to on_train_begin")
        self.jumper.begin(model, state.global_step, optimizer)
        self._begun = True
        reporters = [r for r in (getattr(args, "report_to", None) or []) if r not in ("none", None)]
        if reporters and not self._attached:
            log.warning(
                "RelexCallback: report_to=%s runs before this callback, so the relex/ metrics reach "
                "state.log_history but not those reporters; use RelexCallback(...).attach(trainer)",
                reporters,
            )
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if not self._begun:
            return control
        metrics = self.jumper.after_step(state.global_step)
        if metrics:
            self._pending.update(metrics)
            control.should_log = True  # the jump's diagnostics appear at its own step
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return control
        if self.reward_key in logs:
            self.jumper.record_reward(state.global_step, logs[self.reward_key])
        if self._pending:
            logs.update(self._pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)  # Trainer.log appended it before on_log
            self._pending = {}
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.jumper.close()
        self._begun = False
        return control

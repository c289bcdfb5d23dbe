"""Trainer integrations: RELEX inside a training loop.

    jumps.py   the trainer-agnostic jump controller (Jumper): snapshots of the live weights since
               the last jump, the window's Gram matrices through the streaming engine, the guard
               (the window's own backtest, and optionally the reward), the move of the live weights
    trl.py     RelexCallback: the Jumper as a transformers TrainerCallback (TRL's GRPOTrainer,
               PPO/RLOO-style trainers, plain Trainer)

The math is core's (relex_weights, Backtest, assess/judge) and the passes over the weights are the
engine's, so a jump is exactly what ``relex-merge merge`` would write for the same window.
"""

__all__: list[str] = []  # the integrations are imported from their modules (they need a trainer library)

"""Fixtures for tests and demos, not used by the tool itself: tiny models, a character tokenizer
and planted RL-like trajectories (``python -m relex_merge.testing.synthetic OUT``)."""

__all__: list[str] = []

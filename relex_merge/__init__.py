"""relex-merge: predict later RL checkpoints from a short window of earlier ones (RELEX)."""

__version__ = "0.1.0"

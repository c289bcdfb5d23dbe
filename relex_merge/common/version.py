"""The version of relex-merge (pyproject.toml reads the same number from here)."""

__all__ = ["__version__"]

__version__ = "0.2.0"

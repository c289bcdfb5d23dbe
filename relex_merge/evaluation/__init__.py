"""Scoring models: a thin layer over lm-eval's Python API, offline when every task's data is local.

lm_eval.py   evaluate(): scores, stderr, the results JSON
offline.py   keep lm-eval off the network when it needs nothing from it
"""

__all__: list[str] = []

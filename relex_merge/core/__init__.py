"""The RELEX math: pure torch, no IO, no configuration files, no processes.

    relex.py      FitSpec/RelexSpec and Gram matrix -> top directions -> fitted coefficients -> weights
    fits/         the curve families, one file each (registry in fits/__init__.py)
    kernels.py    per-span kernels: deltas, Gram products and weighted sums in cache-sized blocks
    backtest.py   fit on the first K checkpoints, predict the later ones: errors from Gram matrices alone
    verdict.py    what the backtest says about a target: the fit to use and whether to trust it
    analysis.py   everything ``analyze`` reports, as data, computed from Gram matrices
    summary.py    the window's explained variance and R^2 over every tensor (cards, summaries)

The streaming engine, the mergekit method and the training callback all call these functions.
"""

__all__: list[str] = []

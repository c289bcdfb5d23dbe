"""PNG plots of an analysis (needs matplotlib: pip install "relex-merge[plots]")."""

from __future__ import annotations

import math
from pathlib import Path

from relex_merge.core.analysis import Analysis

__all__ = ["available", "write_plots"]


def available() -> bool:
    """Whether matplotlib is installed (the ``plots`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(analysis: Analysis, out: Path) -> list[Path]:
    """Write coefficients.png, explained_variance.png and backtest.png (each when there is
    something to draw) into ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    # 1. the rank-1 coefficient against the step, with every family's fitted curve to the targets
    curves = analysis.coefficients
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.9), squeeze=False)
        for ax, (name, c) in zip(axes[0], curves.items()):
            ax.plot(c["steps"], c["coefficients"], "o", ms=3, color="black", label="window", zorder=3)
            for label, curve in c["curves"].items():
                ax.plot(curve["x"], curve["y"], "-", lw=1, label=label)
            for t in c["targets"]:
                ax.axvline(t, color="grey", ls=":", lw=1)
            short = name if len(name) < 40 else "…" + name[-38:]
            ax.set_title(f"{short}\n{c['why']}", fontsize=8)
            ax.set_xlabel("step (dotted: targets)")
            ax.set_ylabel("rank-1 coefficient")
            ax.legend(fontsize=6)
        fig.suptitle("Rank-1 coefficient of representative tensors, with each family's best fit", fontsize=9)
        fig.tight_layout()
        written.append(out / "coefficients.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    # 2. explained variance histogram
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.hist([t.explained_variance_1 for t in analysis.tensors], bins=30, range=(0, 1))
    ax.set_title("How rank-1 is each tensor's trajectory?", fontsize=9)
    ax.set_xlabel("rank-1 explained variance (per tensor)")
    ax.set_ylabel("tensors")
    fig.tight_layout()
    written.append(out / "explained_variance.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # 3. backtest error against the horizon: every family (binned), the analysed fit's points
    if analysis.backtest:
        fig, ax = plt.subplots(figsize=(6, 4))
        mids = [math.sqrt(max(lo, 0.05) * hi) if math.isfinite(hi) else 2 * lo for lo, hi in analysis.horizon_bins]
        for row in analysis.families:
            xs = [m for m, e in zip(mids, row.errors) if e is not None]
            ys = [100 * e for e in row.errors if e is not None]
            style = dict(color="black", ls="--") if row.family == "stop" else dict(ls="-")
            ax.plot(xs, ys, marker="o", ms=3, lw=1, label=row.fit if row.family != "stop" else "stopping", **style)
        ax.plot(
            [p.horizon for p in analysis.backtest],
            [100 * p.relative_error for p in analysis.backtest],
            ".",
            ms=2,
            color="grey",
            label=f"{analysis.fit}: every point",
        )
        ax.axhline(100 * analysis.tolerance, color="red", ls="--", lw=1, label="tolerance")
        for target, h in analysis.target_horizons.items():
            if h > 0:
                ax.axvline(h, color="purple", ls=":", lw=1)
                ax.annotate(f"step {target}", (h, ax.get_ylim()[1]), fontsize=6, rotation=90, va="top")
        ax.set_xscale("log")
        ax.set_xlabel("horizon (multiples of the fit span; dotted: targets)")
        ax.set_ylabel("relative error of the whole model (%)")
        ax.set_title("Backtest: fit on the first K checkpoints, predict the later ones", fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(out / "backtest.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written

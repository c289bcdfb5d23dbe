"""PNG plots of an analysis (needs matplotlib: pip install "relex-merge[plots]")."""

from __future__ import annotations

from pathlib import Path

from relex_merge.analyze import Analysis


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(analysis: Analysis, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    # 1. coefficient vs step, with the fitted line carried to the targets
    curves = analysis.coefficients
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
        for ax, (name, c) in zip(axes[0], curves.items()):
            if not c:
                continue
            last = max([c["steps"][-1], *c["targets"]])
            xs = [c["steps"][0], last]
            ax.plot(c["steps"], c["coefficients"], "o", ms=3, label="window")
            ax.plot(xs, [c["intercept"] + c["slope"] * x for x in xs], "-", lw=1, label="linear fit")
            for t in c["targets"]:
                ax.axvline(t, color="grey", ls=":", lw=1)
            ax.set_title(name if len(name) < 40 else "…" + name[-38:], fontsize=8)
            ax.set_xlabel("step")
            ax.set_ylabel("rank-1 coefficient")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "coefficients.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    # 2. explained variance histogram
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist([t.explained_variance_1 for t in analysis.tensors], bins=30, range=(0, 1))
    ax.set_xlabel("rank-1 explained variance (per tensor)")
    ax.set_ylabel("tensors")
    fig.tight_layout()
    written.append(out / "explained_variance.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # 3. backtest error vs horizon
    if analysis.backtest:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for k in sorted({p.fit_count for p in analysis.backtest}):
            pts = [p for p in analysis.backtest if p.fit_count == k]
            ax.plot([p.horizon for p in pts], [p.relative_error for p in pts], "o-", ms=3, label=f"fit on first {k}")
        ax.axhline(analysis.tolerance, color="red", ls="--", lw=1, label="tolerance")
        ax.set_xlabel("horizon (multiples of the fit span)")
        ax.set_ylabel("relative error of the whole model")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "backtest.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written

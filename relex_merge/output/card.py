"""The model card (README.md) every relex output carries: what it is, how it was made, how well
the window fits, and the verdict on its target."""

from __future__ import annotations

from collections.abc import Sequence

from relex_merge.config.schema import RelexConfig
from relex_merge.core.backtest import horizon, window_steps
from relex_merge.core.summary import Distribution, FitSummary
from relex_merge.core.verdict import TargetVerdict
from relex_merge.io.fingerprints import InputRecord

__all__ = ["model_card"]


def _row(label: str, d: Distribution | None) -> str:
    if d is None:
        return f"| {label} | n/a | n/a | n/a | n/a |"
    return f"| {label} | {d.weighted_mean:.4f} | {d.median:.4f} | {d.p05:.4f} | {d.minimum:.4f} (`{d.worst_tensor}`) |"


_TITLES = {"extrapolate": "extrapolation", "reconstruct": "reconstruction", "fit_reconstruct": "fitted reconstruction"}


def model_card(
    config: RelexConfig,
    target: int,
    steps: Sequence[int],
    summary: FitSummary,
    inputs: Sequence[InputRecord],
    warnings: Sequence[str],
    verdict: TargetVerdict | None = None,
    stopped_at: int | None = None,
) -> str:
    """The output's README.md. ``config`` is the output's own config (its fit resolved).
    ``stopped_at``: the folder holds the window's last checkpoint (that step) instead of the
    prediction, which its verdict did not support (--when-unsupported stop)."""
    p = config.parameters
    spec = p.spec()
    window = window_steps(steps, spec)
    fit = spec.fit.describe() + f": {spec.fit.curve_family.formula}"
    if verdict is not None and verdict.chosen_by_backtest:
        fit += " (chosen by the backtest)"
    if spec.refit_every is not None:
        fit += (
            f"; re-fitted every {spec.refit_every} predicted checkpoints on the last {spec.refit_window or len(window)}"
        )
    lines: list[str | None] = [
        "---",
        f"base_model: {config.base_path}",
        "library_name: transformers",
        "tags:",
        "- relex",
        "- merge",
        "- mergekit",
        "---",
        "",
        f"# RELEX {_TITLES[p.mode]} to step {target}"
        if stopped_at is None
        else f"# The last window checkpoint (step {stopped_at}), kept instead of a prediction for step {target}",
        "",
        "Made with [relex-merge](https://github.com/relex-merge/relex-merge) from a window of RL "
        "checkpoints (RELEX, arXiv 2605.21468): each tensor's displacement from the base was "
        "projected onto its top singular directions and the coefficients were fitted against the "
        "training step. This model was not trained; it is a prediction."
        if stopped_at is None
        else f"relex-merge was asked for step {target} with `--when-unsupported stop`, and the backtest did not "
        f"support that prediction (verdict below), so this folder holds the window's last checkpoint, step "
        f"{stopped_at}, unchanged (in the output dtype): stopping is the safe choice. The settings below describe "
        "the prediction that was not written; `relex_config.yml` reproduces it.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{config.base_path}` (step {p.base_step}) |",
        f"| window steps | {_steps_text(window)} ({len(window)} checkpoints) |",
        f"| mode | {p.mode} |",
        f"| target step | {target} |",
        f"| horizon past the window | {horizon(window, target):.2f} x the window span |"
        if p.mode == "extrapolate"
        else None,
        f"| rank | {p.rank} |",
        f"| fit | {fit} |",
        f"| scale | {p.scale} |",
        f"| output dtype | {config.out_dtype or 'as the base model'} |",
        *_verdict_section(verdict),
        "",
        "## How well the window fits the picture",
        "",
        f"{summary.extrapolated} tensors fitted, {summary.zero_delta} unchanged in the window "
        f"(copied from the base), {summary.copied} non-float tensors copied.",
        "",
        "| statistic | size-weighted mean | median | 5th percentile | minimum (tensor) |",
        "|---|---|---|---|---|",
        _row("rank-1 explained variance", summary.explained_variance_1),
        _row(f"rank-{p.rank} explained variance", summary.explained_variance_r) if p.rank > 1 else None,
        _row("linear R² of the rank-1 coefficient", summary.linear_r2),
        "",
        "A good fit inside the window does not guarantee one beyond it: on small GRPO runs "
        "the coefficient decelerates later, and far horizons overshoot. Evaluate before use.",
    ]
    if summary.nonfinite:
        warnings = [
            *warnings,
            f"{len(summary.nonfinite)} tensor(s) had NaN or Inf values in the window and were copied "
            f"from the base: {', '.join(summary.nonfinite[:5])}",
        ]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    steps_by_path = {config.base_path: f"{p.base_step} (base)"}
    steps_by_path.update({m.model: str(m.parameters.step) for m in config.models or []})
    lines += [
        "",
        "## Inputs",
        "",
        "Fingerprints: `fast` hashes each file's size and three 1 MiB samples; `sha256` (`--hash`) every byte.",
        "",
        "| checkpoint | step | weight bytes | fingerprint |",
        "|---|---|---|---|",
    ]
    for record in inputs:
        lines.append(
            f"| `{record.path}` | {steps_by_path.get(record.path, '')} | {record.bytes} | `{record.fingerprint}` |"
        )
    return "\n".join(line for line in lines if line is not None) + "\n"


def _verdict_section(verdict: TargetVerdict | None) -> list[str]:
    if verdict is None:
        return []
    stop = "n/a" if verdict.stop_error != verdict.stop_error else f"{verdict.stop_error:.1%}"
    error = "n/a" if verdict.error != verdict.error else f"{verdict.error:.1%}"
    supported = "none" if verdict.supported_horizon is None else f"{verdict.supported_horizon:.2f} x"
    return [
        "",
        "## Verdict of the backtest",
        "",
        f"**{verdict.line()}**",
        "",
        "The backtest fits on the first part of the window and predicts its later checkpoints "
        "(whole-model relative error of the displacement from the base); a fit holds up to the "
        f"horizon where that error stays at most {verdict.tolerance:.0%}, and a target is supported "
        "when it lies within that horizon and, near the target's horizon, the fit's error is below that "
        "of stopping at the last fitted checkpoint.",
        "",
        "| backtest | value |",
        "|---|---|",
        f"| target horizon | {verdict.horizon:.2f} x the window span |",
        f"| supported up to | {supported} |",
        f"| longest horizon the window can test | {verdict.tested_horizon:.2f} x |",
        f"| error of this fit near the target's horizon | {error} |",
        f"| error of stopping (step {verdict.last_step}) there | {stop} |",
    ]


def _steps_text(steps: Sequence[int]) -> str:
    if len(steps) > 6:
        return f"{steps[0]}, {steps[1]}, …, {steps[-1]}"
    return ", ".join(str(s) for s in steps)

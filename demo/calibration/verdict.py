"""The verdict as a classifier, measured on the scored calibration corpus (issue 19).

    python demo/calibration/verdict.py [--results demo/calibration/results.json] [--out demo/calibration/verdict.md]

Every (run, target, candidate) scored by demo/calibration/score.py is one case: the verdict the
rule gives before any evaluation, against what lm-eval then said:
- better: the prediction scored more than 1 stderr above the last window checkpoint (stopping);
- same: within 1 stderr of it;
- worse: more than 1 stderr below it.
(stderr: lm-eval's stderr of the prediction's score on the held-out problems.)

A "go" (the rule says *supported*) is right when the prediction is at least as good as stopping
within 1 stderr (better or same). The rule's three numbers (``VerdictRule``: tolerance, margin,
reach) are chosen by leave-one-run-out cross-validation: for each run, the rule that lets the
most big wins through (> 2 stderr above stopping), then the most right go's, among the rules
whose go's are right on >= 90 % of the OTHER runs' cases, is applied to the held-out run; the
tables below pool those held-out decisions. No rule sees the run it is judged on. The rule
chosen the same way on every run is the one relex-merge ships (core/rule.py, DEFAULT_RULE);
this script says whether the two agree.

Verdict features are recomputed here from each run's fit cache (every tensor's Gram matrix of
the window, saved before any scoring), with the same code a merge runs (core.backtest,
core.verdict): nothing is read from the checkpoints again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

TOLERANCES = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, math.inf)
MARGINS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)  # 0: never "go"
REACHES = (0.25, 0.5, 1.0, 2.0, 4.0, math.inf)
PRECISION = 0.9  # a rule qualifies when >= 90 % of its go's are right


@dataclass(frozen=True)
class Case:
    """One scored prediction and what the backtest knew about it before scoring."""

    run: str
    task: str
    target: int
    horizon: float
    candidate: str  # the score.py label: linear, auto, expo, ...
    fit: str  # the fit that made it (auto: the one chosen)
    accuracy: float
    last: float
    true: float
    stderr: float
    error: float  # backtest error near the target's horizon
    stop_error: float
    tested_horizon: float
    supported_horizons: tuple[float | None, ...]  # per TOLERANCES

    @property
    def diff(self) -> float:
        return self.accuracy - self.last

    @property
    def outcome(self) -> str:
        if self.diff > self.stderr:
            return "better"
        if self.diff < -self.stderr:
            return "worse"
        return "same"

    @property
    def right_to_go(self) -> bool:
        return self.diff >= -self.stderr

    @property
    def big_win(self) -> bool:
        return self.diff > 2 * self.stderr

    @property
    def captured(self) -> float | None:
        """The share of the future gain captured: (prediction - last) / (true - last)."""
        gain = self.true - self.last
        return None if abs(gain) < 1e-12 else self.diff / gain


def parse_fit(text: str):
    """``log (tau=1.25)`` -> FitSpec("log", 1.25)."""
    from relex_merge.core.relex import FitSpec

    if "(" not in text:
        return FitSpec(text.strip())
    family, rest = text.split("(", 1)
    value = float(rest.split("=", 1)[1].rstrip(") "))
    return FitSpec(family.strip(), value)


def cases_of_run(name: str, entry: dict, data: Path) -> list[Case]:
    """Every scored relex prediction of one run, with its backtest features from the fit cache."""
    from safetensors import safe_open

    from relex_merge.core.backtest import STOP, Backtest, horizon
    from relex_merge.core.relex import FitSpec, RelexSpec

    cache = data / name / "fit_cache.safetensors"
    with safe_open(str(cache), framework="pt") as f:
        steps = json.loads(f.metadata()["steps"])
        grams = [f.get_tensor(k) for k in f.keys()]
    meta = entry["meta"]
    spec = RelexSpec(fit=FitSpec("auto"))
    scored = [
        (int(t), label, rec)
        for t, row in entry["targets"].items()
        for label, rec in row.items()
        if isinstance(rec, dict) and "verdict" in rec
    ]
    fits = {parse_fit(rec["fit"]) for _, _, rec in scored}
    backtest = Backtest.for_fits(steps, spec, [FitSpec("auto"), *fits])
    for gram in grams:
        if float(gram.trace()) > 0:
            backtest.add(gram)
    out = []
    for target, label, rec in scored:
        row = entry["targets"][str(target)]
        fit = parse_fit(rec["fit"])
        h = horizon(backtest.steps, target)
        ids = backtest.matched(h)
        out.append(
            Case(
                run=name,
                task=meta["task"],
                target=target,
                horizon=h,
                candidate=label,
                fit=rec["fit"],
                accuracy=rec["accuracy"],
                last=entry["reference"]["last"]["accuracy"],
                true=row["true"]["accuracy"],
                stderr=rec["stderr"],
                error=backtest.error(fit, ids),
                stop_error=backtest.error(STOP, ids),
                tested_horizon=backtest.tested_horizon,
                supported_horizons=tuple(backtest.supported_horizon(fit, t) for t in TOLERANCES),
            )
        )
    return out


def word(case: Case, tolerance: float, margin: float, reach: float) -> str:
    """The verdict of VerdictRule(tolerance, margin, reach) on this case (core.verdict's logic,
    on the precomputed backtest numbers)."""
    from relex_merge.core.verdict import TargetVerdict

    supported = case.supported_horizons[TOLERANCES.index(tolerance)]
    verdict = TargetVerdict(
        target=case.target,
        horizon=case.horizon,
        fit=parse_fit(case.fit),
        chosen_by_backtest=False,
        error=case.error,
        stop_error=case.stop_error,
        at_horizon=math.nan,
        supported_horizon=supported,
        tested_horizon=case.tested_horizon,
        tolerance=tolerance,
        last_step=0,
        margin=margin,
        reach=reach,
    )
    return verdict.word


RULES = list(itertools.product(TOLERANCES, MARGINS, REACHES))


def score_rule(cases: list[Case], rule) -> tuple[int, int, int, float]:
    """(big wins let through, right go's, go's, precision) of a rule on cases."""
    go = [c for c in cases if word(c, *rule) == "supported"]
    right = sum(c.right_to_go for c in go)
    big = sum(c.big_win for c in go)
    return big, right, len(go), (right / len(go) if go else 1.0)


NEVER = (TOLERANCES[0], 0.0, REACHES[0])  # margin 0: nothing is ever supported


def choose(cases: list[Case]) -> tuple:
    """The qualifying rule (precision >= PRECISION) that lets the most big wins through, then
    the most right go's; ties to the stricter (lower tolerance, then lower margin, lower reach).
    When no qualifying rule says go even once, rightly: never go."""
    best, key = NEVER, (0, 0)
    for rule in RULES:
        big, right, n, precision = score_rule(cases, rule)
        if precision < PRECISION or right == 0:
            continue
        k = (big, right, -rule[0], -rule[1], -rule[2])
        if k > key:
            best, key = rule, k
    return best


def confusion(rows: list[tuple[Case, str]]) -> dict:
    table = {w: {o: 0 for o in ("better", "same", "worse")} for w in ("supported", "not supported", "untested")}
    for case, verdict in rows:
        table[verdict][case.outcome] += 1
    return table


def render(cases: list[Case], held_out: list[tuple[Case, str]], per_run: dict, pooled_rule, rule_now) -> str:
    go = [c for c, v in held_out if v == "supported"]
    right = sum(c.right_to_go for c in go)
    bigs = [c for c in cases if c.big_win]
    let = [c for c, v in held_out if v == "supported" and c.big_win]
    lines = [
        "# The verdict as a classifier",
        "",
        "Generated by `python demo/calibration/verdict.py` from demo/calibration/results.json and the runs' fit "
        "caches (see its docstring for the method). Outcome of a prediction: better / same / worse than the last "
        "window checkpoint by more than 1 stderr (lm-eval's, of the prediction's score); a go (supported) is right "
        "when the outcome is better or same.",
        "",
        f"Corpus: {len({c.run for c in cases})} runs, {len({(c.run, c.target) for c in cases})} (run, target) pairs, "
        f"{len(cases)} scored predictions ({', '.join(sorted({c.candidate for c in cases}))}), tasks "
        f"{', '.join(sorted({c.task for c in cases}))}.",
        "",
        "## Held-out runs (leave one run out)",
        "",
        f"- go's: {len(go)}, right: {right}" + (f" (precision {right / len(go):.0%})" if go else " (no go at all)"),
        f"- predictions that beat stopping by more than 2 stderr: {len(bigs)}; let through: {len(let)}",
        "",
        "| verdict (held out) | better | same | worse |",
        "|---|---|---|---|",
    ]
    for verdict, row in confusion(held_out).items():
        lines.append(f"| {verdict} | {row['better']} | {row['same']} | {row['worse']} |")
    lines += [
        "",
        "| held-out run | rule chosen on the other runs (tolerance, margin, reach) | go's | right |",
        "|---|---|---|---|",
    ]
    for run, (rule, n, r) in per_run.items():
        lines.append(f"| {run} | {_rule(rule)} | {n} | {r} |")
    lines += [
        "",
        "## The rule relex-merge ships",
        "",
        f"Chosen the same way on every run: {_rule(pooled_rule)}; core/rule.py's DEFAULT_RULE is "
        f"{_rule(rule_now)}"
        + (
            " (the same)." if tuple(pooled_rule) == tuple(rule_now) else " (DIFFERENT: update core/rule.py or say why)."
        ),
        "",
        "| verdict (shipped rule, all runs) | better | same | worse |",
        "|---|---|---|---|",
    ]
    for verdict, row in confusion([(c, word(c, *rule_now)) for c in cases]).items():
        lines.append(f"| {verdict} | {row['better']} | {row['same']} | {row['worse']} |")
    lines += [
        "",
        "## Share of the future gain captured",
        "",
        "(prediction - last) / (true - last), by candidate and horizon (window spans); median [10th, 90th "
        "percentile] over the (run, target) pairs where the true checkpoint moved.",
        "",
        "| candidate | " + " | ".join(f"{a:g}-{b:g}x" for a, b in BUCKETS) + " |",
        "|---" * (len(BUCKETS) + 1) + "|",
    ]
    for cand in sorted({c.candidate for c in cases}):
        cells = []
        for a, b in BUCKETS:
            shares = sorted(
                s for c in cases if c.candidate == cand and a <= c.horizon < b and (s := c.captured) is not None
            )
            cells.append(_spread(shares))
        lines.append(f"| {cand} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


BUCKETS = ((0, 1.5), (1.5, 3), (3, 6), (6, 12), (12, 25))


def _spread(values: list[float]) -> str:
    if not values:
        return ""
    q = lambda p: values[min(len(values) - 1, int(p * (len(values) - 1) + 0.5))]  # noqa: E731
    return f"{statistics.median(values):.2f} [{q(0.1):.2f}, {q(0.9):.2f}] (n={len(values)})"


def _rule(rule) -> str:
    t, m, r = (rule.tolerance, rule.margin, rule.reach) if hasattr(rule, "tolerance") else rule
    return f"tolerance {t:g}, margin {m:g}, reach {r:g}" if m > 0 else "never go"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--out", type=Path, default=HERE / "verdict.md")
    args = parser.parse_args(argv)
    from relex_merge.core.rule import DEFAULT_RULE

    results = json.loads(args.results.read_text())
    cases = [c for name, entry in results["runs"].items() for c in cases_of_run(name, entry, args.data)]
    runs = sorted({c.run for c in cases})
    held_out, per_run = [], {}
    for run in runs:
        rule = choose([c for c in cases if c.run != run])
        mine = [(c, word(c, *rule)) for c in cases if c.run == run]
        held_out += mine
        go = [c for c, v in mine if v == "supported"]
        per_run[run] = (rule, len(go), sum(c.right_to_go for c in go))
    pooled = choose(cases)
    rule_now = (DEFAULT_RULE.tolerance, DEFAULT_RULE.margin, DEFAULT_RULE.reach)
    text = render(cases, held_out, per_run, pooled, rule_now)
    args.out.write_text(text)
    (args.out.with_suffix(".json")).write_text(
        json.dumps(
            {
                "cases": [{**asdict(c), "outcome": c.outcome, "held_out_verdict": v} for c, v in held_out],
                "pooled_rule": pooled,
                "default_rule": rule_now,
            },
            indent=1,
            default=lambda x: None,
        )
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
tables below pool those held-out decisions. No rule sees the run it is judged on. A fourth knob,
the fit families a go is allowed for (every family; no averages; no averages and no two-point
line; averages only), is tuned the same way. When no rule reaches 90 % on the other runs, the
rule is "never go" (nothing is supported). The rule
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
AVERAGES = ("average", "ema")  # families that do not extrapolate
# the families a go is allowed for: (label, families excluded, or the only ones allowed)
FAMILY_SETS = (
    ("every family", None),
    ("no averages", ("not", *AVERAGES)),
    ("no averages, no expo", ("not", *AVERAGES, "expo")),
    ("averages only", AVERAGES),
)
PRECISION = 0.9  # a rule qualifies when >= 90 % of its go's are right


def allowed(families, family: str) -> bool:
    if families is None:
        return True
    if families[0] == "not":
        return family not in families[1:]
    return family in families


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
    def family(self) -> str:
        return self.fit.split("(", 1)[0].strip()

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
    def true_gain(self) -> float:
        """The true checkpoint minus the last, in units of the prediction's stderr."""
        return (self.true - self.last) / self.stderr if self.stderr else 0.0

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
        if "true" in row
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


def word(case: Case, rule: tuple) -> str:
    """The verdict of the rule (tolerance, margin, reach, family set) on this case: core.verdict's
    TargetVerdict.word on the precomputed backtest numbers (checked against it in main), plus
    the family set (a go only for a family the set allows)."""
    tolerance, margin, reach, families = rule
    if math.isnan(case.error) or case.horizon > reach * case.tested_horizon + 1e-9:
        return "untested"
    needed = min(case.horizon, case.tested_horizon)
    held_to = case.supported_horizons[TOLERANCES.index(tolerance)]
    held = held_to is not None and held_to >= needed - 1e-9
    go = held and case.error < margin * case.stop_error and allowed(dict(FAMILY_SETS)[families], case.family)
    return "supported" if go else "not supported"


def engine_word(case: Case, tolerance: float, margin: float, reach: float) -> str:
    """core.verdict's own verdict on this case (every family allowed)."""
    from relex_merge.core.verdict import TargetVerdict

    return TargetVerdict(
        target=case.target,
        horizon=case.horizon,
        fit=parse_fit(case.fit),
        chosen_by_backtest=False,
        error=case.error,
        stop_error=case.stop_error,
        at_horizon=math.nan,
        supported_horizon=case.supported_horizons[TOLERANCES.index(tolerance)],
        tested_horizon=case.tested_horizon,
        tolerance=tolerance,
        last_step=0,
        margin=margin,
        reach=reach,
    ).word


RULES = list(itertools.product(TOLERANCES, MARGINS, REACHES, [label for label, _ in FAMILY_SETS]))
NEVER = (TOLERANCES[0], 0.0, REACHES[0], FAMILY_SETS[0][0])  # margin 0: nothing is ever supported


class Table:
    """Each rule's go's on each run, computed once: (big wins let through, right go's, go's) per
    run, so that choosing on "every run but one" is a subtraction."""

    def __init__(self, cases: list[Case]):
        self.runs = sorted({c.run for c in cases})
        self.counts: dict[tuple, dict[str, tuple[int, int, int]]] = {}
        for rule in RULES:
            per = {r: [0, 0, 0] for r in self.runs}
            if rule[1] > 0:
                for c in cases:
                    if word(c, rule) == "supported":
                        n = per[c.run]
                        n[0] += c.big_win
                        n[1] += c.right_to_go
                        n[2] += 1
            self.counts[rule] = {r: tuple(n) for r, n in per.items()}

    def score(self, rule: tuple, runs: list[str]) -> tuple[int, int, int]:
        per = self.counts[rule]
        return tuple(sum(per[r][i] for r in runs) for i in range(3))

    def choose(self, runs: list[str]) -> tuple:
        """The qualifying rule (precision >= PRECISION on ``runs``) that lets the most big wins
        through, then the most right go's; ties to the stricter (lower tolerance, margin, reach,
        then the family sets in FAMILY_SETS's order). When no qualifying rule says go even once,
        rightly: never go."""
        order = [label for label, _ in FAMILY_SETS]
        best, key = NEVER, (0, 0)
        for rule in RULES:
            big, right, n = self.score(rule, runs)
            if not n or right / n < PRECISION or right == 0:
                continue
            k = (big, right, -rule[0], -rule[1], -rule[2], -order.index(rule[3]))
            if k > key:
                best, key = rule, k
        return best


OUTCOMES = ("better", "same", "worse")


def confusion(rows: list[tuple[Case, str]]) -> dict:
    table = {w: dict.fromkeys(OUTCOMES, 0) for w in ("supported", "not supported", "untested")}
    for case, verdict in rows:
        table[verdict][case.outcome] += 1
    return table


def _confusion_lines(title: str, rows: list[tuple[Case, str]]) -> list[str]:
    lines = [f"| {title} | better | same | worse | total |", "|---|---|---|---|---|"]
    for verdict, row in confusion(rows).items():
        lines.append(f"| {verdict} | {row['better']} | {row['same']} | {row['worse']} | {sum(row.values())} |")
    return lines


def _precision(rows: list[tuple[Case, str]]) -> str:
    go = [c for c, v in rows if v == "supported"]
    if not go:
        return "no go at all"
    right = sum(c.right_to_go for c in go)
    return f"{right} of {len(go)} right ({right / len(go):.0%})"


def render(cases: list[Case], held_out: list[tuple[Case, str]], per_run: dict, pooled_rule, rule_now) -> str:
    go = [c for c, v in held_out if v == "supported"]
    bigs = [c for c in cases if c.big_win]
    let = [c for c, v in held_out if v == "supported" and c.big_win]
    pairs = sorted({(c.run, c.target) for c in cases})
    go_pairs = sorted({(c.run, c.target) for c in go})
    never = [r for r, (rule, _, _) in per_run.items() if rule[1] == 0]
    candidates = sorted({c.candidate for c in cases})
    lines = [
        "# The verdict as a classifier",
        "",
        "Generated by `python demo/calibration/verdict.py` from demo/calibration/results.json and the runs' fit "
        "caches (see its docstring for the method). Outcome of a prediction: better / same / worse than the last "
        "window checkpoint (stopping) by more than 1 stderr (lm-eval's, of the prediction's score); a go "
        "(supported) is right when the outcome is better or same. A rule is (tolerance, margin, reach, families): "
        "core/rule.py's VerdictRule, plus the fit families a go is allowed for.",
        "",
        f"Corpus: {len({c.run for c in cases})} runs, {len(pairs)} (run, target) pairs, "
        f"{len(cases)} scored predictions ({', '.join(candidates)}), tasks "
        f"{', '.join(sorted({c.task for c in cases}))}.",
        "",
        "## Held-out runs (leave one run out)",
        "",
        f"- go's: {len(go)}, {_precision(held_out)}; target for a go: >= {PRECISION:.0%} right",
        f"- (run, target) pairs with at least one go: {len(go_pairs)} of {len(pairs)}",
        f"- predictions that beat stopping by more than 2 stderr: {len(bigs)}; let through: {len(let)}"
        + (" (every one)" if bigs and len(let) == len(bigs) else ""),
        f"- runs whose rule (chosen on the other runs) is never go: {len(never)} of {len(per_run)}",
        "",
    ]
    lines += [_conclusion(go, bigs, let, held_out), ""]
    lines += _confusion_lines("verdict (held out)", held_out)
    lines += ["", "What each held-out word predicted:", ""] + _shares_lines(held_out)
    lines += [
        "",
        "By candidate (held out):",
        "",
        "| candidate | predictions | go's | right | beat stopping by > 2 stderr | let through |",
        "|---|---|---|---|---|---|",
    ]
    for cand in candidates:
        mine = [(c, v) for c, v in held_out if c.candidate == cand]
        g = [c for c, v in mine if v == "supported"]
        lines.append(
            f"| {cand} | {len(mine)} | {len(g)} | {sum(c.right_to_go for c in g)} | "
            f"{sum(c.big_win for c, _ in mine)} | {sum(c.big_win for c in g)} |"
        )
    lines += [
        "",
        "| held-out run | rule chosen on the other runs | go's | right |",
        "|---|---|---|---|",
    ]
    for run, (rule, n, r) in per_run.items():
        lines.append(f"| {run} | {_rule(rule)} | {n} | {r} |")
    lines += [
        "",
        "## The rule relex-merge ships",
        "",
        f"Chosen the same way on every run: {_rule(pooled_rule)}; core/rule.py's DEFAULT_RULE is "
        f"{_rule(rule_now)}" + _agreement(pooled_rule, rule_now, go),
        "Figures on the runs a rule was chosen on are optimistic; the held-out figures above are the ones to quote.",
        "",
        f"The rule chosen on every run, on every run: {_precision([(c, word(c, pooled_rule)) for c in cases])}.",
        "",
    ]
    shipped = [(c, word(c, rule_now)) for c in cases]
    lines += _confusion_lines("verdict (DEFAULT_RULE, all runs)", shipped)
    lines += [
        "",
        "What each word predicted (DEFAULT_RULE, all runs): share of its predictions that were better / same / "
        "worse than stopping.",
        "",
    ]
    lines += _shares_lines(shipped)
    lines += [
        "",
        "## Share of the future gain captured",
        "",
        "(prediction - last) / (true - last), by candidate and horizon (window spans): median [10th, 90th "
        "percentile] (n). First over every (run, target) pair where the true checkpoint moved at all (where it "
        "barely moved the share divides by noise), then over the pairs where the true checkpoint beats the last "
        "by more than 2 stderr (a real future gain).",
        "",
        "| candidate | pairs | " + " | ".join(f"{a:g}-{b:g}x" for a, b in BUCKETS) + " | all |",
        "|---" * (len(BUCKETS) + 3) + "|",
    ]
    for real in (False, True):
        for cand in candidates:
            cells = []
            sel = [c for c in cases if c.candidate == cand and (not real or c.true_gain > 2)]
            for a, b in BUCKETS:
                cells.append(_spread(sorted(s for c in sel if a <= c.horizon < b and (s := c.captured) is not None)))
            cells.append(_spread(sorted(s for c in sel if (s := c.captured) is not None)))
            lines.append(f"| {cand} | {'true gains > 2 stderr' if real else 'all'} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per run and horizon (captured share; in brackets the true checkpoint minus the last, in stderr):",
        "",
        "| run | target (horizon) [true - last] | " + " | ".join(candidates) + " |",
        "|---|---" + "|---" * len(candidates) + "|",
    ]
    by_pair: dict[tuple[str, int], dict[str, Case]] = {}
    for c in cases:
        by_pair.setdefault((c.run, c.target), {})[c.candidate] = c
    for (run, target), row in sorted(by_pair.items()):
        any_case = next(iter(row.values()))
        cells = ["" if cand not in row or (s := row[cand].captured) is None else f"{s:+.2f}" for cand in candidates]
        lines.append(
            f"| {run} | {target} ({any_case.horizon:.1f}x) [{any_case.true_gain:+.1f}] | " + " | ".join(cells) + " |"
        )
    lines += ["", "Median per run (every target of the run; spread: min, max):", ""]
    lines += ["| run | " + " | ".join(candidates) + " |", "|---" * (len(candidates) + 1) + "|"]
    for run in sorted({c.run for c in cases}):
        cells = []
        for cand in candidates:
            shares = sorted(s for c in cases if c.run == run and c.candidate == cand and (s := c.captured) is not None)
            cells.append(f"{statistics.median(shares):+.2f} [{shares[0]:+.2f}, {shares[-1]:+.2f}]" if shares else "")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


BUCKETS = ((0, 1.5), (1.5, 3), (3, 6), (6, 12), (12, 25))


def _agreement(pooled_rule: tuple, rule_now: tuple, held_out_go: list[Case]) -> str:
    if tuple(pooled_rule) == tuple(rule_now):
        return " (the same)."
    right = sum(c.right_to_go for c in held_out_go)
    if held_out_go and right / len(held_out_go) >= PRECISION:
        return " (DIFFERENT: the held-out figures support shipping the chosen rule; update core/rule.py)."
    return (
        " (different, but the procedure that chose it misses the target on held-out runs, so that is no "
        "evidence for changing DEFAULT_RULE; see below what DEFAULT_RULE says on this corpus)."
    )


def _shares_lines(rows: list[tuple[Case, str]]) -> list[str]:
    lines = ["| verdict | predictions | better | same | worse |", "|---|---|---|---|---|"]
    for verdict, row in confusion(rows).items():
        n = sum(row.values())
        cells = " | ".join(f"{row[o] / n:.0%}" if n else "" for o in OUTCOMES)
        lines.append(f"| {verdict} | {n} | {cells} |")
    return lines


def _conclusion(go: list[Case], bigs: list[Case], let: list[Case], held_out: list[tuple[Case, str]]) -> str:
    """The held-out result in one sentence, from the numbers alone."""
    right = sum(c.right_to_go for c in go)
    better = sum(c.outcome == "better" for c, _ in held_out)
    if go and right / len(go) >= PRECISION:
        head = f"The held-out precision of go meets the target: {right} of {len(go)} go's were right."
    elif go:
        head = (
            f"The held-out precision of go misses the {PRECISION:.0%} target: {right} of {len(go)} go's were right. "
            "Rules tuned on the other runs do not carry to the run left out, so no rule on these grids says go "
            "reliably: by this evidence the best rule is never go."
        )
    else:
        head = "No held-out go at all: by this evidence the best rule is never go."
    if not bigs:
        head += (
            f" No prediction beat stopping by more than 2 stderr ({better} of {len(held_out)} by more than 1), "
            "so there was no win for a go to let through."
        )
    else:
        head += f" Of the {len(bigs)} predictions that beat stopping by more than 2 stderr, {len(let)} got a go."
    return head


def _spread(values: list[float]) -> str:
    if not values:
        return ""
    q = lambda p: values[min(len(values) - 1, int(p * (len(values) - 1) + 0.5))]  # noqa: E731
    return f"{statistics.median(values):+.2f} [{q(0.1):+.2f}, {q(0.9):+.2f}] ({len(values)})"


def _rule(rule) -> str:
    t, m, r, fams = rule
    if m <= 0:
        return "never go"
    return f"tolerance {t:g}, margin {m:g}, reach {r:g}, {fams}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--out", type=Path, default=HERE / "verdict.md")
    args = parser.parse_args(argv)
    from relex_merge.core.rule import DEFAULT_RULE

    results = json.loads(args.results.read_text())
    scored = {name: e for name, e in results["runs"].items() if "meta" in e and "reference" in e}
    cases = [c for name, entry in scored.items() for c in cases_of_run(name, entry, args.data)]
    rule_now = (DEFAULT_RULE.tolerance, DEFAULT_RULE.margin, DEFAULT_RULE.reach, FAMILY_SETS[0][0])
    if rule_now[0] not in TOLERANCES:
        raise SystemExit(f"DEFAULT_RULE's tolerance {rule_now[0]} is not on the grid {TOLERANCES}")
    table = Table(cases)
    held_out, per_run = [], {}
    for run in table.runs:
        rule = table.choose([r for r in table.runs if r != run])
        mine = [(c, word(c, rule)) for c in cases if c.run == run]
        held_out += mine
        go = [c for c, v in mine if v == "supported"]
        per_run[run] = (rule, len(go), sum(c.right_to_go for c in go))
    pooled = table.choose(table.runs)
    # this script's verdict is the engine's (every family allowed)
    for rule in {pooled, rule_now, *(r for r, _, _ in per_run.values())}:
        if rule[3] == FAMILY_SETS[0][0]:
            for c in cases:
                if word(c, rule) != engine_word(c, *rule[:3]):
                    raise SystemExit(f"verdict.py's word differs from core.verdict's on {c} under {rule}")
    text = render(cases, held_out, per_run, pooled, rule_now)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "cases": [{**asdict(c), "outcome": c.outcome, "held_out_verdict": v} for c, v in held_out],
                "held_out_rules": {run: rule for run, (rule, _, _) in per_run.items()},
                "pooled_rule": pooled,
                "default_rule": rule_now,
            },
            indent=1,
            default=lambda x: None,
        )
        + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

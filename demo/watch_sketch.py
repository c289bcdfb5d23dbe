"""What ``watch`` costs per new checkpoint, exact and sketched, and how far a sketched Gram matrix is
from the exact one on REAL GRPO windows (the calibration corpus' runs).

    python demo/watch_sketch.py            # writes demo/watch_sketch.md and demo/watch_sketch.json

1. Cost: a planted run of a larger tiny model (hidden 256, 4 layers) lands one checkpoint at a
   time; each update is timed (exact: the engine reads the base and the whole window and adds the
   new row; sketched: one read of the new checkpoint).
2. Error: for each calibration run found under $RELEX_CALIBRATION_ROOT (default
   /work/runs/calibration; made by demo/calibration/runs.py), its window's exact Gram matrices
   against sketches of width 256 / 1024 / 4096: the entries' errors relative to
   sqrt(G_jj G_kk) (the bound on their standard deviation is sqrt(2 / width)), and what reaches
   the user: rank-1 explained variance, the backtest errors and the verdicts at the run's targets.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
CALIBRATION = Path(os.environ.get("RELEX_CALIBRATION_ROOT", "/work/runs/calibration"))
WIDTHS = (256, 1024, 4096)


def _config(path: Path, run: Path, base: Path, steps=None, targets=None) -> Path:
    trajectory = {"run_dir": str(run)}
    if steps is not None:
        trajectory["steps"] = list(steps)
    doc = {"merge_method": "relex", "base_model": str(base), "trajectory": trajectory}
    doc["parameters"] = {"target_step": list(targets)} if targets else {}
    path.write_text(yaml.safe_dump(doc))
    return path


def cost(work: Path, landings: int = 16) -> list[dict]:
    from relex_merge.testing.synthetic import make_planted_run
    from relex_merge.workflows.watch import Watcher

    source = make_planted_run(work / "source", steps=range(1, landings + 1), model_kwargs={"hidden": 256, "layers": 4})
    params = sum(t.numel() for t in _load(source / "checkpoint-1").values())
    rows = []
    for mode, width in (("exact", None), ("sketch", 4096)):
        run = work / f"run-{mode}"
        run.mkdir()
        watcher = Watcher(_config(work / f"{mode}.yml", run, source / "base"), None, settle=0, sketch=width)
        for step in range(1, landings + 1):
            shutil.copytree(source / f"checkpoint-{step}", run / f"checkpoint-{step}")
            start = time.perf_counter()
            update = watcher.poll()
            wall = time.perf_counter() - start
            if step >= 2:
                rows.append(
                    {
                        "mode": mode,
                        "window": step,
                        "gram_seconds": round(update.seconds, 4),
                        "update_seconds": round(wall, 4),
                        "bytes_read": update.bytes_read,
                        "parameters": params,
                    }
                )
        watcher.close()
    return rows


def _load(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def error(work: Path) -> list[dict]:
    from relex_merge.workflows.watch import Watcher

    rows = []
    work.mkdir(parents=True, exist_ok=True)
    for record_file in sorted(CALIBRATION.glob("*/run.json")):
        record = json.loads(record_file.read_text())["run"]
        folder = record_file.parent
        config = _config(work / f"{folder.name}.yml", folder, folder / "base", record["window"], record["targets"])
        exact = Watcher(config, None, settle=0)
        exact.poll()
        truth = exact.analysis
        for width in WIDTHS:
            sketched = Watcher(config, None, settle=0, sketch=width)
            sketched.poll()
            a = sketched.analysis
            errors = []
            for name, g in exact.grams.items():
                if exact.numels[name] <= width:
                    continue  # kept exactly
                scale = torch.outer(g.diagonal(), g.diagonal()).sqrt().clamp_min(1e-300)
                errors.append(((sketched.grams[name] - g).abs() / scale).flatten())
            errors = torch.cat(errors) if errors else torch.zeros(1)
            verdicts = zip(truth.target_verdicts, a.target_verdicts)
            bt = [(v["backtest_error"], w["backtest_error"]) for v, w in zip(truth.target_verdicts, a.target_verdicts)]
            rows.append(
                {
                    "run": folder.name,
                    "width": width,
                    "window": len(record["window"]),
                    "entry_error_median": float(errors.median()),
                    "entry_error_max": float(errors.max()),
                    "bound_sd": (2 / width) ** 0.5,
                    "ev1_exact": _mean_ev(truth),
                    "ev1_sketch": _mean_ev(a),
                    "backtest_error_max_diff": max(abs(x - y) for x, y in bt) if bt else None,
                    "verdicts_agree": sum(v["supported"] == w["supported"] for v, w in verdicts),
                    "targets": len(truth.target_verdicts),
                }
            )
            sketched.close()
        exact.close()
    return rows


def _mean_ev(analysis) -> float:
    values = [
        (t.numel, t.explained_variance_1) for t in analysis.tensors if t.explained_variance_1 == t.explained_variance_1
    ]
    return sum(n * v for n, v in values) / sum(n for n, _ in values)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        costs = cost(work / "cost")
        errors = error(work / "error")
    lines = [
        "# watch: cost per new checkpoint, and the sketched Gram matrix's error",
        "",
        "Written by `python demo/watch_sketch.py` (one thread, a shared 2-core machine: timings are indicative).",
        "",
        f"## Cost per new checkpoint (planted run, {costs[0]['parameters']:,} parameters, fp32)",
        "",
        "| window (checkpoints) | exact: Gram update s | exact: read | sketch 4096: s | sketch: read |",
        "|---|---|---|---|---|",
    ]
    by = {(r["mode"], r["window"]): r for r in costs}
    for t in sorted({r["window"] for r in costs}):
        e, s = by[("exact", t)], by[("sketch", t)]
        lines.append(
            f"| {t} | {e['gram_seconds']:.3f} | {e['bytes_read'] / 1e6:.1f} MB | {s['gram_seconds']:.3f} | "
            f"{s['bytes_read'] / 1e6:.1f} MB |"
        )
    lines += [
        "",
        "Exact: the base and every window checkpoint are read again for each new one ((T + 1) model sizes, "
        "growing with T; O(T P) multiply-adds). Sketched: one read of the new checkpoint (the first update also "
        "reads the base), whatever T; O(P) hashing; T x width floats per tensor kept.",
        "",
        "## Sketched against exact Gram matrices on real GRPO windows",
        "",
        "| run | window | width | entry error median / max (x sqrt(G_jj G_kk)) | bound on its s.d. | "
        "rank-1 EV exact / sketch | largest backtest-error change at a target | verdicts agreeing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in errors:
        bt = "" if r["backtest_error_max_diff"] is None else f"{r['backtest_error_max_diff']:.4f}"
        lines.append(
            f"| {r['run']} | {r['window']} | {r['width']} | "
            f"{r['entry_error_median']:.4f} / {r['entry_error_max']:.4f} | "
            f"{r['bound_sd']:.4f} | {r['ev1_exact']:.4f} / {r['ev1_sketch']:.4f} | {bt} | "
            f"{r['verdicts_agree']} of {r['targets']} |"
        )
    if not errors:
        lines.append(f"(no calibration runs under {CALIBRATION}: python demo/calibration/runs.py makes them)")
    (HERE / "watch_sketch.md").write_text("\n".join(lines) + "\n")
    (HERE / "watch_sketch.json").write_text(json.dumps({"cost": costs, "error": errors}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

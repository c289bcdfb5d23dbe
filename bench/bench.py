"""Benchmark relex-merge against mergekit, a dense in-memory RELEX and the I/O floor.

    python bench/bench.py --size 130m --dtype float32 --window 8 --reps 3 --work /tmp/relex-bench

Makes a synthetic RL trajectory for a Qwen2-shaped model (random weights; each tensor moves
along one direction linearly in the step, plus noise), then measures, interleaved over
--reps repetitions with the page cache warm:

  relex (1 target)      relex-merge CONFIG OUT
  relex (3 targets)     the same with target_step: [t, 2t, 3t]
  relex (small budget)  --max-memory 256MB: smaller spans per worker
  relex analyze         `relex-merge analyze --out`: the Gram pass, backtests, JSON, PNG plots
  relex --fit-cache     the output pass alone: a merge that reuses analyze's fit cache
  mergekit              mergekit-yaml, task_arithmetic over the same base + T checkpoints
  dense reference       bench/dense_reference.py: load everything, torch.linalg.svd per tensor
  read floor            read every input file once
  write floor           write one output's bytes once
  start-up              python -c 'import torch': the part of every torch-based run above that
                        is interpreter and library loading, not merging
  relex (1 thread)      --threads 1: one process, one worker (the base of the scaling rows)
  relex (torchrun xN)   torchrun --nproc-per-node N -m relex_merge ... --threads 1 (--processes N)
  baseline: ...         with --baseline DIR: the relex rows above run from another checkout
                        (PYTHONPATH=DIR), interleaved: what a change costs

With --zero WORK (a DeepSpeed ZeRO-3 window that bench/make_zero_window.py wrote; DeepSpeed is
needed to write it, not here), it measures instead a merge of that window read straight from
DeepSpeed's files, within --max-memory, against the same merge of DeepSpeed's own
consolidations of the same saves (zero_to_fp32, as safetensors), checks that both write the
same bytes, and quotes what consolidating one save in memory costs DeepSpeed.

With --cold (root only: `sync; echo 3 > /proc/sys/vm/drop_caches` before each command; the
table says so when the machine refuses), the page cache is emptied before every command of the
cold rows, so the disk, not memory, is the floor: cold read floor, cold relex-merge.

Each command runs in its own process, writing to a fresh path after os.sync(); wall time and
peak RSS come from that process (resource.getrusage of the child), start-up (Python, `import
torch`) included. Prints a markdown table (and writes it to --table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

SIZES = {
    # name: (hidden, layers, intermediate, vocab, heads, kv_heads, tied)
    "tiny": (128, 2, 512, 4096, 4, 2, False),
    "130m": (768, 12, 2048, 32000, 12, 4, False),  # ~130M parameters
    "0.5b": (896, 24, 4864, 151936, 14, 2, True),  # Qwen2.5-0.5B's shapes
}
HERE = Path(__file__).resolve().parent


def make_config(size: str):
    from transformers import Qwen2Config

    hidden, layers, inter, vocab, heads, kv, tied = SIZES[size]
    return Qwen2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=inter,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tied,
        max_position_embeddings=2048,
    )


def make_trajectory(work: Path, size: str, dtype: torch.dtype, window: int) -> Path:
    """work/run/{base,checkpoint-1..T}; reused when already there."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    run = work / "run"
    marker = run / f"done-{size}-{dtype}-{window}"
    if marker.exists():
        return run
    shutil.rmtree(run, ignore_errors=True)
    config = make_config(size)
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = ["Qwen2ForCausalLM"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(0)
    base = {n: (0.02 * torch.randn(s, generator=gen)).to(dtype) for n, s in shapes.items()}
    direction = {n: 1e-3 * torch.randn(s, generator=gen) for n, s in shapes.items()}
    folders = [("base", 0)] + [(f"checkpoint-{k}", k) for k in range(1, window + 1)]
    for folder, step in folders:
        (run / folder).mkdir(parents=True)
        state = {
            n: (base[n].float() + step * direction[n] + 1e-5 * torch.randn(shapes[n], generator=gen)).to(dtype)
            if step
            else base[n]
            for n in shapes
        }
        save_file(state, run / folder / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(run / folder)
    marker.write_text("ok")
    return run


def write_configs(work: Path, run: Path, window: int) -> dict[str, Path]:
    import yaml

    models = [{"model": str(run / f"checkpoint-{k}"), "parameters": {"step": k}} for k in range(1, window + 1)]
    t = 4 * window
    relex = {
        "merge_method": "relex",
        "base_model": str(run / "base"),
        "models": models,
        "parameters": {"target_step": t},
    }
    relex3 = {**relex, "parameters": {"target_step": [t, 2 * t, 3 * t]}}
    mergekit = {
        "merge_method": "task_arithmetic",
        "base_model": str(run / "base"),
        "models": [{"model": m["model"], "parameters": {"weight": 1.0 / window}} for m in models],
        "dtype": "float32",
    }
    configs = {"relex": relex, "relex3": relex3, "mergekit": mergekit}
    paths = {}
    for name, config in configs.items():
        paths[name] = work / f"{name}.yml"
        paths[name].write_text(yaml.safe_dump(config))
    return paths


def measure(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command run in a fresh wrapper process."""
    wrapper = (
        "import resource,subprocess,sys,time;t=time.perf_counter();"
        "r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.PIPE,text=True);"
        "w=time.perf_counter()-t;"
        "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024);"
        "sys.exit(r.returncode) if r.returncode==0 else sys.exit(print(r.stderr[-2000:],file=sys.stderr) or 1)"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    wall, rss = proc.stdout.split()
    return float(wall), int(rss)


def _fresh_start(outs: Path) -> None:
    """Every command writes to a path that does not exist yet, and starts with no dirty pages
    left by the one before (removing or flushing them is not part of its time)."""
    for path in outs.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.sync()


def _drop_page_cache() -> bool:
    """Empty the page cache (root only); False when the machine does not allow it."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def input_files(run: Path, window: int) -> list[Path]:
    return [run / "base" / "model.safetensors"] + [
        run / f"checkpoint-{k}" / "model.safetensors" for k in range(1, window + 1)
    ]


def _zero_steps(work: Path) -> list[int]:
    steps = sorted(int(p.name[len("global_step") :]) for p in (work / "ckpt").glob("global_step*") if p.is_dir())
    if len(steps) < 2:
        raise SystemExit(f"{work}/ckpt: no DeepSpeed window (make one with bench/make_zero_window.py)")
    return steps


def _state(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def zero_bench(args) -> str:
    """The ZeRO rows: a merge of a DeepSpeed window, and of DeepSpeed's consolidations of it."""
    import yaml

    work = args.zero
    steps = _zero_steps(work)
    target = 4 * steps[-1]
    configs = {}
    for name, folder in (
        ("zero", lambda s: work / "ckpt" / f"global_step{s}"),
        ("consolidated", lambda s: work / "consolidated" / f"step_{s}"),
    ):
        configs[name] = work / f"{name}.yml"
        models = [{"model": str(folder(s)), "parameters": {"step": s}} for s in steps]
        relex = {
            "merge_method": "relex",
            "base_model": str(work / "base"),
            "models": models,
            "parameters": {"target_step": target},
        }
        configs[name].write_text(yaml.safe_dump(relex))
    relex = str(Path(sys.executable).parent / "relex-merge")
    outs = work / "out"
    outs.mkdir(exist_ok=True)
    window = f"T={len(steps)}"
    candidates = {
        f"relex-merge, ZeRO-3 window read from DeepSpeed's files ({window}, --max-memory {args.max_memory})": [
            relex,
            str(configs["zero"]),
            str(outs / "zero"),
            "--overwrite",
            "-q",
            "--max-memory",
            args.max_memory,
        ],
        f"relex-merge, DeepSpeed's consolidations of the same saves ({window}, safetensors, "
        f"--max-memory {args.max_memory})": [
            relex,
            str(configs["consolidated"]),
            str(outs / "consolidated"),
            "--overwrite",
            "-q",
            "--max-memory",
            args.max_memory,
        ],
        "start-up (python -c 'import torch')": [sys.executable, "-c", "import torch"],
    }
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in candidates}
    load = os.getloadavg()[0]  # the machine may be shared: said in the header
    for rep in range(args.reps):
        for name, cmd in candidates.items():
            for path in outs.iterdir():  # each merge writes to a path that does not exist yet
                if path.name in cmd or str(path) in cmd:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.sync()
            results[name].append(measure(cmd))
            print(f"rep {rep + 1}/{args.reps} {name}: {results[name][-1][0]:.2f} s", file=sys.stderr)
        if rep == 0:  # the two merges wrote the same bytes?
            a, b = _state(outs / "zero"), _state(outs / "consolidated")
            same = bool(a) and sorted(a) == sorted(b)
            same = same and all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in a)
            if not same:
                raise SystemExit("the merge of the ZeRO window differs from the merge of DeepSpeed's consolidations")
            tensors, params = len(a), sum(t.numel() for t in a.values())
    median = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    peak = {k: max(r for _, r in v) for k, v in results.items()}
    fp32 = params * 4
    rows = [
        "| run | median wall (s) | peak RSS (GB) | fp32 weights read (GB) |",
        "|---|---|---|---|",
    ]
    for name in candidates:
        reads = 0 if name.startswith("start-up") else fp32 * (len(steps) + 1) * 2  # base + T inputs, two passes
        rows.append(f"| {name} | {median[name]:.2f} | {peak[name] / 1e9:.2f} | {reads / 1e9:.2f} |")
    ds = json.loads((work / "deepspeed.json").read_text()) if (work / "deepspeed.json").is_file() else None
    if ds:
        one = ds["consolidate_one_save"]
        rows.append(
            f"| DeepSpeed `get_fp32_state_dict_from_zero_checkpoint` of one save, in memory (DeepSpeed "
            f"{ds['deepspeed']}) | {one['wall_s']:.2f} | {one['peak_rss'] / 1e9:.2f} | {fp32 / 1e9:.2f} |"
        )
    on_disk = sum(f.stat().st_size for f in (work / "ckpt").rglob("*.pt"))
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, torch {torch.__version__}"
    )
    ranks = len(list((work / "ckpt" / f"global_step{steps[0]}").glob("*_optim_states.pt")))
    header = (
        f"DeepSpeed ZeRO-3 window: {len(steps)} saves (steps {steps[0]}..{steps[-1]}) of a "
        f"{params / 1e6:.0f}M-parameter model ({tensors} tensors), {ranks} ranks, {on_disk / 1e9:.1f} GB of "
        f"DeepSpeed files (fp32 master weights and Adam moments); target step {target}; "
        f"{args.reps} interleaved repetitions, page cache warm; {machine}; load average {load:.1f} when it "
        f"started (1-minute, the machine's other jobs included). The two merges wrote the same bytes "
        f"({tensors} tensors, checked). "
        + (
            f"Before relex-merge read ZeRO files itself, each ZeRO input was consolidated in memory like the last row "
            f"and held for the whole merge: {len(steps)} inputs held {len(steps) * fp32 / 1e9:.1f} GB of fp32 weights."
            if ds
            else ""
        )
        + f"\n\nCommand: `python bench/bench.py --zero WORK --max-memory {args.max_memory} --reps {args.reps}` "
        f"(WORK made by `bench/make_zero_window.py`)\n"
    )
    return header + "\n" + "\n".join(rows) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/relex-bench"))
    parser.add_argument("--max-memory", default="8GB", help="relex-merge's budget in the main runs")
    parser.add_argument("--small-budget", default="256MB")
    parser.add_argument("--skip", default="", help="comma-separated candidates to leave out")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    parser.add_argument("--processes", type=int, default=2, help="ranks of the torchrun row (0: no such row)")
    parser.add_argument("--cold", action="store_true", help="also cold-page-cache rows (drops the page cache: root)")
    parser.add_argument(
        "--zero", type=Path, help="measure merging the DeepSpeed window bench/make_zero_window.py wrote"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of relex-merge: its merge, small-budget and analyze rows too (PYTHONPATH=DIR), "
        "interleaved, to measure a change (e.g. the deterministic kernels against the commit before them)",
    )
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.zero is not None:
        table = zero_bench(args)
        print(table)
        if args.table:
            args.table.write_text(table)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    run = make_trajectory(args.work, args.size, dtype, args.window)
    configs = write_configs(args.work, run, args.window)
    files = input_files(run, args.window)
    input_bytes = sum(f.stat().st_size for f in files)
    out_bytes = files[0].stat().st_size
    bin_dir = Path(sys.executable).parent
    outs = args.work / "out"
    relex = str(bin_dir / "relex-merge")
    fit_cache = args.work / "fit-cache" / "fit_cache.safetensors"
    candidates = {
        "relex-merge (1 target)": [
            relex,
            str(configs["relex"]),
            str(outs / "relex"),
            "--overwrite",
            "-q",
            "--max-memory",
            args.max_memory,
        ],
        "relex-merge (3 targets)": [
            relex,
            str(configs["relex3"]),
            str(outs / "relex3"),
            "--overwrite",
            "-q",
            "--max-memory",
            args.max_memory,
        ],
        f"relex-merge (--max-memory {args.small_budget})": [
            relex,
            str(configs["relex"]),
            str(outs / "relex-small"),
            "--overwrite",
            "-q",
            "--max-memory",
            args.small_budget,
        ],
        "relex-merge analyze --out (Gram pass, report, plots)": [
            relex,
            "analyze",
            str(configs["relex"]),
            "--out",
            str(outs / "analysis"),
            "-q",
            "--max-memory",
            args.max_memory,
        ],
        "relex-merge --fit-cache (output pass only)": [
            relex,
            str(configs["relex"]),
            str(outs / "relex-cached"),
            "--overwrite",
            "-q",
            "--max-memory",
            args.max_memory,
            "--fit-cache",
            str(fit_cache),
        ],
        "mergekit task_arithmetic": [
            str(bin_dir / "mergekit-yaml"),
            str(configs["mergekit"]),
            str(outs / "mergekit"),
            "--copy-tokenizer",
            "--no-write-model-card",
        ],
        "dense reference (SVD in RAM)": [
            sys.executable,
            str(HERE / "dense_reference.py"),
            str(run),
            str(args.window),
            str(4 * args.window),
            str(outs / "dense"),
        ],
        "read floor": [sys.executable, str(HERE / "io_floor.py"), "read", *map(str, files)],
        "write floor": [sys.executable, str(HERE / "io_floor.py"), "write", str(out_bytes), str(outs / "floor.bin")],
        "start-up (python -c 'import torch')": [sys.executable, "-c", "import torch"],
        "relex-merge (1 process, --threads 1)": [
            relex,
            str(configs["relex"]),
            str(outs / "relex-1"),
            "--overwrite",
            "-q",
            "--max-memory",
            args.max_memory,
            "--threads",
            "1",
        ],
    }
    if args.processes > 1:
        candidates[f"relex-merge (torchrun, {args.processes} processes x 1 thread)"] = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.processes}",
            "-m",
            "relex_merge",
            str(configs["relex"]),
            str(outs / "relex-ranks"),
            "--overwrite",
            "-q",
            "--max-memory",
            args.max_memory,
            "--threads",
            "1",
        ]
    if args.baseline:
        for name in list(candidates):
            if (
                name.startswith("relex-merge (1 target)")
                or name.startswith("relex-merge (--max-memory")
                or (name.startswith("relex-merge analyze"))
            ):
                cmd = [a.replace(f"{outs}/", f"{outs}/baseline-") for a in candidates[name]]
                cmd = [sys.executable, "-m", "relex_merge", *cmd[1:]]
                candidates[f"baseline: {name}"] = ["env", f"PYTHONPATH={args.baseline.resolve()}", *cmd]
    cold = {}
    if args.cold:
        cold = {f"cold cache: {name}": candidates[name] for name in ("read floor", "relex-merge (1 target)")}
        candidates.update(cold)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    candidates = {k: v for k, v in candidates.items() if not any(s in k for s in skip)}
    outs.mkdir(exist_ok=True)
    subprocess.run(candidates["read floor"], check=True)  # warm the page cache
    if any("--fit-cache" in name for name in candidates):  # what `analyze --out` leaves behind (not timed)
        subprocess.run(
            [relex, "analyze", str(configs["relex"]), "--out", str(fit_cache.parent), "--overwrite", "-q"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in candidates}
    cold_note = ""
    for rep in range(args.reps):
        for name, cmd in candidates.items():
            _fresh_start(outs)
            if name in cold and not _drop_page_cache():
                cold_note = " The machine refused to drop the page cache: the cold rows ran warm."
            results[name].append(measure(cmd))
            if name in cold:  # leave the next warm row a warm cache
                subprocess.run(candidates["read floor"], check=True)
            print(f"rep {rep + 1}/{args.reps} {name}: {results[name][-1][0]:.2f} s", file=sys.stderr)

    median = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    peak = {k: max(r for _, r in v) for k, v in results.items()}
    floor = median.get("read floor", 0) + median.get("write floor", 0)
    cold_floor = median.get("cold cache: read floor", 0) + median.get("write floor", 0)
    mk = median.get("mergekit task_arithmetic")
    rows = [
        "| run | median wall (s) | peak RSS (GB) | input read (GB) | throughput (GB/s) | vs mergekit | vs I/O floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in candidates:
        reads = 0 if name == "write floor" or name.startswith("start-up") else input_bytes
        vs_mergekit = f"{median[name] / mk:.2f}x" if mk else "n/a"
        base = cold_floor if name.startswith("cold cache") else floor
        vs_floor = f"{median[name] / base:.2f}x" if base else "n/a"
        rows.append(
            f"| {name} | {median[name]:.2f} | {peak[name] / 1e9:.2f} | {reads / 1e9:.2f} | "
            f"{reads / 1e9 / median[name]:.2f} | {vs_mergekit} | {vs_floor} |"
        )
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
        f"torch {torch.__version__}"
    )
    params = sum(
        t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(files[0]).values()
    )
    header = (
        f"Qwen2-shaped {args.size} ({params / 1e6:.0f}M parameters), {args.dtype}, window T={args.window}, "
        f"{args.reps} interleaved repetitions, page cache warm (cold rows: emptied before each command); {machine}. "
        f"I/O floor = read floor + write floor = {floor:.2f} s"
        + (f"; cold rows against the cold read floor + write floor = {cold_floor:.2f} s" if cold_floor else "")
        + f".{cold_note}\n\n"
        f"Command: `python bench/bench.py --size {args.size} --dtype {args.dtype} --window {args.window} "
        f"--reps {args.reps}"
        + (f" --skip {args.skip}" if args.skip else "")
        + (" --cold" if args.cold else "")
        + (f" --processes {args.processes}" if args.processes != 2 else "")
        + (f" --baseline {args.baseline}" if args.baseline else "")
        + "`\n"
    )
    table = header + "\n" + "\n".join(rows) + "\n"
    print(table)
    if args.table:
        args.table.write_text(table)
    (args.work / "results.json").write_text(json.dumps({"median": median, "peak_rss": peak}, indent=2))


if __name__ == "__main__":
    main()

"""One merge across processes: real gloo process groups started by torchrun (2 and 3 ranks) must
write the bytes a single process writes, and any rank's failure must stop every rank with one
line from rank 0 and nothing left behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from relex_merge.common import errors
from relex_merge.engine import process_group
from relex_merge.engine.sharding import assign
from tests.helpers import run_cli, write_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)  # this checkout's relex_merge in every rank
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def torchrun(nproc: int, *args: str, timeout: float = 240, patches: str = "") -> subprocess.CompletedProcess:
    """``python -m relex_merge ARGS`` on ``nproc`` ranks; with ``patches``, tests/patched_cli.py's
    patches of those names are applied in every rank first."""
    threads = [] if args[0] == "convert" else ["--threads", "1"]
    program = [str(REPO / "tests" / "patched_cli.py")] if patches else ["-m", "relex_merge"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *program,
        *args,
        *threads,
    ]
    env = {**_env(), "RELEX_TEST_PATCHES": patches}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_assignment_is_balanced_by_bytes_and_deterministic():
    names = [f"t{i}" for i in range(7)]
    sizes = [50, 10, 40, 10, 30, 5, 5]
    shares = assign(names, sizes, 3)
    # largest first, each to the least-loaded rank (ties: the lower rank); shares in the model's order
    assert shares == [["t0"], ["t2", "t3"], ["t1", "t4", "t5", "t6"]]
    assert [sum(sizes[names.index(n)] for n in s) for s in shares] == [50, 50, 50]
    assert assign(names, sizes, 1) == [names]


class _FakeRanks(process_group.Group):
    """Rank ``rank`` of two, whose all_gather returns what the test planted for the other rank."""

    world_size = 2

    def __init__(self, rank: int, other=None):
        self.rank, self.other, self.sent = rank, other, None

    def all_gather(self, obj):
        self.sent = obj
        return [obj, self.other] if self.rank == 0 else [self.other, obj]


def test_a_rank_failure_reads_like_the_single_process_line():
    """One formatting for the CLI and the ranks: a full disk on rank 1 keeps the advice and
    exit code 2 in rank 0's line."""
    full = OSError(errno.ENOSPC, "No space left on device", "/out/model-00001-of-00002.safetensors")
    line = errors.one_line(full)
    assert (
        line == "/out/model-00001-of-00002.safetensors: no space left on the device; free space or choose "
        "another output folder"
    )
    rank1 = _FakeRanks(1, other=process_group._Status(0, "node0", None))  # rank 0 succeeded
    with pytest.raises(OSError):
        with rank1.step("writing"):
            raise full
    rank0 = _FakeRanks(0, other=rank1.sent)
    with pytest.raises(process_group.RankFailure) as failure:
        with rank0.step("writing"):
            pass
    assert str(failure.value) == f"rank 1 of 2 ({socket.gethostname()}): {line}"
    assert failure.value.exit_code == 2
    assert rank0.describe_failure(full) == f"rank 0 of 2 ({socket.gethostname()}): {line}"


_BATCH_SCRIPT = {
    "SLURM_JOB_ID": "7",
    "SLURM_NTASKS": "8",
    "SLURM_NPROCS": "8",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
}  # what sbatch --ntasks=8 exports to its script


@pytest.mark.parametrize(
    "env,found",
    [
        ({}, None),
        (_BATCH_SCRIPT, None),  # a plain relex-merge in the job script: one process, no peers to wait for
        ({**_BATCH_SCRIPT, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"}, None),  # srun -n 1
        (
            {
                **_BATCH_SCRIPT,
                "SLURM_STEP_ID": "0",
                "SLURM_STEP_NUM_TASKS": "8",
                "SLURM_PROCID": "5",
                "SLURM_LOCALID": "1",
            },
            (5, 8, 1),
        ),  # a task of srun's step
        (
            {
                **_BATCH_SCRIPT,
                "SLURM_STEP_ID": "1",
                "SLURM_STEP_NUM_TASKS": "4",
                "SLURM_PROCID": "3",
                "SLURM_LOCALID": "3",
            },
            (3, 4, 3),
        ),  # srun -n 4 inside an 8-task job: the step's size counts
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, (1, 2, 1)),  # torchrun
    ],
    ids=["alone", "sbatch-script", "srun-one-task", "srun-task", "srun-smaller-step", "torchrun"],
)
def test_only_launched_tasks_join_a_group(monkeypatch, env, found):
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert process_group.launcher_environment() == found


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_writes_the_single_process_bytes(qwen_run, tmp_path, nproc):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 5, 6], [12, 20])
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert run_cli(str(cfg), str(single), "-q", "--threads", "1", "--shard-size", "40KB").exit_code == 0
    result = torchrun(nproc, str(cfg), str(multi), "--shard-size", "40KB")
    assert result.returncode == 0, result.stderr[-3000:]
    got, want = files(multi), files(single)
    assert len([n for n in want if n.endswith(".safetensors")]) > 2  # several shards, each written by several ranks
    assert got.keys() == want.keys()
    assert got == want
    assert not list(tmp_path.glob(".multi*"))


def test_torchrun_auto_fit_and_analyze_match_a_single_process(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 4, 5, 6], 10, parameters={"fit": "auto"})
    assert run_cli(str(cfg), str(tmp_path / "single"), "-q", "--threads", "1").exit_code == 0
    result = torchrun(2, str(cfg), str(tmp_path / "multi"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert files(tmp_path / "multi") == files(tmp_path / "single")
    # --require-supported refuses the same target the same way, with nothing written
    alone = run_cli(str(cfg), str(tmp_path / "refused1"), "--threads", "1", "--require-supported")
    result = torchrun(2, str(cfg), str(tmp_path / "refused2"), "--require-supported")
    assert alone.exit_code == 3 and result.returncode != 0
    assert error_lines(result) == [
        alone.stderr.strip().replace("error: ", "error: rank 0 of 2 (" + socket.gethostname() + "): ", 1)
    ]
    assert not (tmp_path / "refused1").exists() and not (tmp_path / "refused2").exists()
    assert run_cli("analyze", str(cfg), "--out", str(tmp_path / "a1"), "-q", "--threads", "1").exit_code == 0
    result = torchrun(2, "analyze", str(cfg), "--out", str(tmp_path / "a2"), "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = files(tmp_path / "a1"), files(tmp_path / "a2")
    assert one["fit_cache.safetensors"] == two["fit_cache.safetensors"]
    assert json.loads(one["analysis.json"]) == json.loads(two["analysis.json"])


def test_a_later_stage_waits_for_the_earlier_stage_in_place(qwen_run, tmp_path):
    """Two relex stages; rank 0 renames each output into place 3 s late: rank 1 must not plan
    the final stage (which reads the first stage's output) before it is there."""
    import yaml

    stage = {"name": "rl", **yaml.safe_load(write_config(tmp_path / "s.yml", qwen_run, [1, 2, 3], 9).read_text())}
    final = yaml.safe_load(write_config(tmp_path / "f.yml", qwen_run, [2, 3], 12).read_text())
    final["models"].append({"model": "rl", "parameters": {"step": 9}})
    cfg = tmp_path / "stages.yml"
    cfg.write_text(yaml.safe_dump_all([stage, final]))
    stages = ("--intermediate-dir", str(tmp_path / "stages"))  # the cards name the stage's folder: the same one
    result = torchrun(2, str(cfg), str(tmp_path / "multi"), "-q", *stages, patches="slow_rename")  # stages/ empty
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_cli(str(cfg), str(tmp_path / "single"), "-q", "--threads", "1", *stages).exit_code == 0
    assert files(tmp_path / "multi") == files(tmp_path / "single")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_planning_failure_on_one_rank_stops_every_rank(qwen_run, tmp_path):
    """analyze: only rank 1 fails to plan; rank 0 prints the one line naming it, every rank
    exits non-zero (2, the planning error's code), nothing is written."""
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    procs, results = two_ranks(
        ["analyze", str(cfg), "--out", str(tmp_path / "a"), "-q", "--threads", "1"],
        [REPO, REPO],
        patches="fail_planning_on_rank_1",
    )
    assert [p.returncode for p in procs] == [2, 2], results[0][1][-3000:]
    assert results[0][1].strip() == f"error: rank 1 of 2 ({socket.gethostname()}): checkpoint-3: not found on this node"
    assert results[1][1].strip() == ""  # only rank 0 talks
    assert not (tmp_path / "a").exists()


def test_torchrun_sweep_converts_a_last_checkpoint_that_is_not_an_hf_folder(qwen_run, tmp_path):
    """The last window checkpoint is a bare .safetensors file: every rank converts it for scoring
    (lm-eval replaced by tests/patched_cli.py's fake); the same files as a single process."""
    import yaml

    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    config = yaml.safe_load(cfg.read_text())
    config["models"][-1]["model"] += "/model.safetensors"
    cfg.write_text(yaml.safe_dump(config))
    args = ["--targets", "9,12", "--tasks", "fake_task", "-q", "--timeout", "60"]
    single = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "patched_cli.py"),
            "sweep",
            str(cfg),
            str(tmp_path / "single"),
            *args,
            "--threads",
            "1",
        ],
        cwd=REPO,
        env={**_env(), "RELEX_TEST_PATCHES": "fake_lm_eval"},
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    result = torchrun(2, "sweep", str(cfg), str(tmp_path / "multi"), *args, patches="fake_lm_eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert files(tmp_path / "multi") == files(tmp_path / "single")
    assert "baseline_lm_eval_results.json" in files(tmp_path / "multi")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_torchrun_convert_matches_a_single_process(qwen_run, tmp_path):
    assert (
        run_cli("convert", str(qwen_run / "checkpoint-2"), str(tmp_path / "c1"), "-q", "--shard-size", "40KB").exit_code
        == 0
    )
    result = torchrun(2, "convert", str(qwen_run / "checkpoint-2"), str(tmp_path / "c2"), "-q", "--shard-size", "40KB")
    assert result.returncode == 0, result.stderr[-3000:]
    assert files(tmp_path / "c1") == files(tmp_path / "c2")


def _copy_run(src: Path, dst: Path, steps) -> Path:
    import shutil

    shutil.copytree(src / "base", dst / "base")
    for s in steps:
        shutil.copytree(src / f"checkpoint-{s}", dst / f"checkpoint-{s}")
    return dst


def test_a_failure_on_one_rank_stops_every_rank(qwen_run, tmp_path):
    """NaN in a tensor that rank 1 reads: rank 1 fails in the middle of the merge; every rank
    exits non-zero, rank 0 prints one line naming rank 1, and no output is left."""
    from relex_merge.config.schema import load_config
    from relex_merge.engine.executors.distributed import share
    from relex_merge.workflows.plan import plan_merge

    run = _copy_run(qwen_run, tmp_path / "run", [1, 2, 3])
    cfg = write_config(tmp_path / "c.yml", run, [1, 2, 3], 9)
    job = plan_merge(load_config(cfg)).job
    victim = next(n for n in share(job, _Rank(1, 2)) if job.base.meta(n).dtype.is_floating_point)
    state = load_file(run / "checkpoint-2" / "model.safetensors")
    state[victim] = state[victim].clone()
    state[victim].view(-1)[0] = float("nan")
    save_file(state, run / "checkpoint-2" / "model.safetensors")
    out = tmp_path / "out"
    result = torchrun(2, str(cfg), str(out), timeout=180)
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: rank 1 of 2 (")
    assert f"checkpoint-2: tensor {victim} has NaN or Inf values" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_truncated_checkpoint_stops_every_rank(qwen_run, tmp_path):
    run = _copy_run(qwen_run, tmp_path / "run", [1, 2, 3])
    weights = run / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    cfg = write_config(tmp_path / "c.yml", run, [1, 2, 3], 9)
    out = tmp_path / "out"
    result = torchrun(2, str(cfg), str(out), timeout=180)
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: rank 0 of 2 (") and "the file is truncated" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


class _Rank:
    def __init__(self, rank, world):
        self.rank, self.world_size = rank, world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(args: list[str], cwds: list[Path], patches: str = "", timeout: float = 180, env: dict | None = None):
    """Ranks 0 and 1 (one rank per folder in ``cwds``) started by hand, each in its cwd, so
    that each rank's exit code is seen (torchrun stops the others when one exits), and rank 0
    hosts the store as under srun: (processes, [(stdout, stderr)])."""
    port = str(_free_port())
    program = [str(REPO / "tests" / "patched_cli.py")] if patches else ["-m", "relex_merge"]
    procs = []
    for rank, cwd in enumerate(cwds):
        env = {
            **_env(),
            **(env or {}),
            "RANK": str(rank),
            "WORLD_SIZE": str(len(cwds)),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RELEX_TEST_PATCHES": patches,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, *program, *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs, [p.communicate(timeout=timeout) for p in procs]


def test_an_output_folder_that_not_every_rank_sees_is_refused(qwen_run, tmp_path):
    """Two 'nodes' that resolve the output path differently (a relative OUT from different
    working directories) do not share it: refused, naming the rank, before any tensor is read."""
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
    procs, results = two_ranks([str(cfg), "out/model", "--threads", "1"], cwds)
    assert [p.returncode for p in procs] == [2, 2]
    rank0 = [line for line in results[0][1].splitlines() if line.startswith("error:")]
    assert results[1][1].strip() == ""  # only rank 0 talks
    assert len(rank0) == 1 and rank0[0].startswith("error: rank 1 of 2 (")
    assert "this node does not see the output folder rank 0 created" in rank0[0]
    for rank in (0, 1):
        assert not (tmp_path / f"node{rank}" / "out" / "model").exists()
        assert not [p for p in (tmp_path / f"node{rank}").rglob("*") if p.is_file()]


def _started(path: Path, within: float) -> float:
    """Wait until ``path`` exists (a patched rank wrote its pid there); the time it appeared."""
    end = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < end, f"{path.name} never appeared"
        time.sleep(0.1)
    return time.monotonic()


SILENT = r"error: rank {rank} of 3 \({host}\) stopped answering (\d+) s ago \(killed or hung\); stopping every rank"


def test_a_frozen_rank_is_named_within_the_silence_limit(qwen_run, tmp_path):
    """torchrun, 3 ranks: rank 2 freezes mid-merge (SIGSTOP, so torchrun sees nothing wrong). The
    others, blocked waiting for it, stop within the 5 s limit (not --timeout's 1800 s): one line
    naming rank 2, a non-zero exit, no partial output."""
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 5, 6], [12, 20])
    out, pid_file, log = tmp_path / "out", tmp_path / "frozen.pid", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]
    cmd += [str(REPO / "tests" / "patched_cli.py"), str(cfg), str(out), "-q", "--threads", "1"]
    env = {**_env(), "RELEX_TEST_PATCHES": "freeze_rank_2", "RELEX_TEST_PID_FILE": str(pid_file)}
    env["RELEX_RANK_SILENCE_LIMIT"] = "5"
    with log.open("w") as stderr:
        launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            frozen = _started(pid_file, within=120)
            while not error_lines(subprocess.CompletedProcess([], 0, "", log.read_text())):
                assert time.monotonic() - frozen < 40, log.read_text()[-3000:]
                assert launcher.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            waited = time.monotonic() - frozen
        finally:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)  # else torchrun waits 30 s for it
            launcher.wait(timeout=120)
    assert launcher.returncode != 0
    lines = error_lines(subprocess.CompletedProcess([], 0, "", log.read_text()))
    assert len(lines) == 1, log.read_text()[-3000:]
    assert re.fullmatch(SILENT.format(rank=2, host=re.escape(socket.gethostname())), lines[0]), lines
    assert 5 <= int(re.search(r"(\d+) s ago", lines[0])[1]) <= 10
    assert waited < 20, waited  # the limit and a few beats, on a loaded 2-core machine
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # rank 0 removed its partial output


def test_a_killed_rank_0_that_hosts_the_store_is_named_by_rank_1(qwen_run, tmp_path):
    """Three ranks started as srun starts them (rank 0 hosts the store); rank 0 is killed
    mid-merge. Rank 1 names it within the limit, ranks 1 and 2 exit non-zero, rank 2 silently."""
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 5, 6], [12, 20])
    pid_file = tmp_path / "killed.pid"
    env = {"RELEX_RANK_SILENCE_LIMIT": "5", "RELEX_TEST_PID_FILE": str(pid_file)}
    started = time.monotonic()
    procs, results = two_ranks(
        [str(cfg), str(tmp_path / "out"), "-q", "--threads", "1"], [REPO] * 3, patches="kill_rank_0", env=env
    )
    took = time.monotonic() - started
    assert procs[0].returncode == -signal.SIGKILL
    assert procs[1].returncode != 0 and procs[2].returncode != 0, results
    lines = [line for line in results[1][1].splitlines() if line.startswith("error:")]
    assert len(lines) == 1, results[1][1][-3000:]
    assert re.fullmatch(SILENT.format(rank=0, host=".+"), lines[0]), lines
    assert not [line for line in results[2][1].splitlines() if line.startswith("error:")]  # one line in all
    assert took < 90, took  # not --timeout's 1800 s


def test_warnings_are_printed_once_and_debug_lines_name_the_rank(qwen_run, tmp_path):
    """torchrun, 2 ranks: the plan's warning comes from rank 0 only; -v's log lines say whose."""
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 5, 6], [3, 12])  # 3: inside the window
    result = torchrun(2, str(cfg), str(tmp_path / "out"), "-q", "-v")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "lie inside the window" in warnings[0], result.stderr[-3000:]
    debug = [line for line in result.stderr.splitlines() if "relex_merge." in line and ": " in line]
    for rank in (0, 1):
        assert any(line.startswith(f"rank {rank}/2 relex_merge.") for line in debug), result.stderr[-3000:]
    assert not [line for line in debug if line.startswith("relex_merge.")]  # none unnamed

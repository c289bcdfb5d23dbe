"""Every validation error: one line naming the file or key, exit 2, nothing written."""

from __future__ import annotations

import errno
import fractions
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from relex_merge.config.schema import load_config
from relex_merge.interop.mergekit_runner import known_methods
from tests.helpers import assert_relex_output, run_cli, snapshot


def base_config(run: Path, steps=(1, 2, 3), target=9, **params) -> dict:
    return {
        "merge_method": "relex",
        "base_model": str(run / "base"),
        "models": [{"model": str(run / f"checkpoint-{s}"), "parameters": {"step": s}} for s in steps],
        "parameters": {"target_step": target, **params},
    }


def variant(run: Path, tmp: Path, edit) -> Path:
    """A copy of checkpoint-2 whose state dict (or config) is changed by ``edit``."""
    folder = tmp / "variant"
    shutil.copytree(run / "checkpoint-2", folder)
    state = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    edit(state, config)
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def with_model(config: dict, index: int, path: Path) -> dict:
    config["models"][index]["model"] = str(path)
    return config


def _drop(name):
    def edit(state, config):
        del state[name]

    return edit


def _add(state, config):
    state["extra.weight"] = torch.zeros(2)


def _reshape(state, config):
    state["model.norm.weight"] = torch.zeros(3)


def _arch(state, config):
    config["architectures"] = ["LlamaForCausalLM"]


@dataclass
class Case:
    config: dict
    out: Path | None = None
    args: tuple = ()


def _damaged_safetensors(run: Path, tmp: Path, how: str) -> Path:
    folder = tmp / "damaged"
    shutil.copytree(run / "checkpoint-2", folder)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    if how == "header":
        file.write_bytes(data[: 8 + header_len // 2])  # cut inside the JSON header
    else:
        file.write_bytes(data[: len(data) - 100])  # the last tensor's bytes are short
    return folder


def _nan(state, config):
    state["model.norm.weight"][3] = float("nan")


def _unsafe_pickle(run: Path, tmp: Path) -> Path:
    folder = tmp / "pickled"
    shutil.copytree(run / "checkpoint-2", folder)
    (folder / "model.safetensors").unlink()
    state = load_file(run / "checkpoint-2" / "model.safetensors")
    torch.save({**state, "note": fractions.Fraction(1, 3)}, folder / "pytorch_model.bin")
    return folder


def _disk_full(run, tmp, mp):
    """Writes fail as on a full disk once 1 kB has been written."""
    from relex_merge.io.writers import safetensors as writer

    written = 0
    real = writer._pwrite_all

    def pwrite_all(fd, data, position):
        nonlocal written
        written += len(data)
        if written > 1024:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, position)

    mp.setattr(writer, "_pwrite_all", pwrite_all)
    return base_config(run)


def _read_only_fs(run, tmp, mp):
    """``tmp`` as on a file system mounted read-only: statvfs says so, and access() says no to
    everyone, root included (a real read-only mount needs privileges a test does not have)."""
    import os

    statvfs, access = os.statvfs, os.access

    class ReadOnly:
        def __init__(self, real):
            self.real = real
            self.f_flag = real.f_flag | os.ST_RDONLY

    def fake_statvfs(path):
        real = statvfs(path)
        return ReadOnly(real) if Path(path).resolve().is_relative_to(tmp.resolve()) else real

    def fake_access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve().is_relative_to(tmp.resolve()):
            return False
        return access(path, mode, *args, **kwargs)

    mp.setattr(os, "statvfs", fake_statvfs)
    mp.setattr(os, "access", fake_access)
    return Case(base_config(run), out=tmp / "new" / "out")


def _read_only_while_writing(run, tmp, mp):
    """The file system turns read-only under a running merge (a remount after a disk error)."""
    from relex_merge.io.writers import safetensors as writer

    def pwrite_all(fd, data, position):
        raise OSError(errno.EROFS, "Read-only file system")

    mp.setattr(writer, "_pwrite_all", pwrite_all)
    return base_config(run)


def _no_permission(run, tmp, mp):
    mp.setattr("relex_merge.output.folders._writable", lambda folder: False)  # root ignores chmod
    return base_config(run)


CASES = {
    "unknown key with hint": (
        lambda run, tmp: {**base_config(run), "parameterz": {}},
        "{cfg}: unknown key 'parameterz' (did you mean 'parameters'?)",
    ),
    "unknown nested key": (
        lambda run, tmp: base_config(run, rnak=2),
        "{cfg}: unknown key 'parameters.rnak' (did you mean 'rank'?)",
    ),
    "wrong merge method": (
        lambda run, tmp: {**base_config(run), "merge_method": "relexx"},
        "{cfg}: merge_method: unknown method 'relexx' (known: {known})",
    ),
    "non-integer step": (
        lambda run, tmp: _set_step(base_config(run), 1, 2.5),
        "{cfg}: models.1.parameters.step: expected an integer, got 2.5",
    ),
    "negative step": (
        lambda run, tmp: _set_step(base_config(run), 0, -1),
        "{cfg}: models.0.parameters.step: expected a value greater than or equal to 0, got -1",
    ),
    "missing base": (
        lambda run, tmp: {**base_config(run), "base_model": str(tmp / "nope")},
        "{cfg}: base_model: {tmp}/nope does not exist",
    ),
    "missing checkpoint": (
        lambda run, tmp: with_model(base_config(run), 1, tmp / "gone"),
        "{cfg}: models[1].model: {tmp}/gone does not exist",
    ),
    "duplicate steps": (
        lambda run, tmp: _set_step(base_config(run), 2, 2),
        "{cfg}: models[2].parameters.step: step 2 is listed twice",
    ),
    "unsorted steps": (
        lambda run, tmp: _set_step(base_config(run), 1, 5),
        "{cfg}: models[2].parameters.step: steps must increase (5 then 3); list the checkpoints in training order",
    ),
    "one checkpoint": (
        lambda run, tmp: base_config(run, steps=(1,)),
        "{cfg}: models: need at least 2 window checkpoints, got 1",
    ),
    "rank above T": (
        lambda run, tmp: base_config(run, rank=4),
        "{cfg}: parameters.rank: 4 exceeds the 3 checkpoints in the window",
    ),
    "rank zero": (
        lambda run, tmp: base_config(run, rank=0),
        "{cfg}: parameters.rank: expected a value greater than or equal to 1, got 0",
    ),
    "rank above window": (
        lambda run, tmp: base_config(run, rank=3, window=2),
        "{cfg}: parameters.rank: 3 exceeds the 2 checkpoints in the window",
    ),
    "window above T": (
        lambda run, tmp: base_config(run, window=5),
        "{cfg}: parameters.window: 5 is more than the 3 checkpoints given",
    ),
    "window one": (
        lambda run, tmp: base_config(run, window=1),
        "{cfg}: parameters.window: expected a value greater than or equal to 2, got 1",
    ),
    "size with a bare i": (  # was KeyError: 'i', exit 1
        lambda run, tmp: Case(base_config(run), args=("--max-memory", "8i")),
        "--max-memory: cannot read size '8i' (examples: 8GB, 512MiB, 1000000)",
    ),
    "scale inf": (  # was exit 0 and an all-NaN model
        lambda run, tmp: base_config(run, scale=float("inf")),
        "{cfg}: parameters.scale: expected a finite number, got inf",
    ),
    "scale nan": (
        lambda run, tmp: base_config(run, scale=float("nan")),
        "{cfg}: parameters.scale: expected a finite number, got nan",
    ),
    "tau inf": (  # was _LinAlgError, exit 1
        lambda run, tmp: base_config(run, fit="saturating", tau=float("inf")),
        "{cfg}: parameters.tau: expected a finite number, got inf",
    ),
    "p nan": (
        lambda run, tmp: base_config(run, fit="power", p=float("nan")),
        "{cfg}: parameters.p: expected a finite number, got nan",
    ),
    "degree inf": (
        lambda run, tmp: base_config(run, fit="polynomial", degree=float("inf")),
        "{cfg}: parameters.degree: expected an integer, got inf",
    ),
    "tolerance inf": (
        lambda run, tmp: Case(base_config(run), args=("--tolerance", "inf")),
        "--tolerance: expected a finite number, got inf",
    ),
    "timeout nan": (
        lambda run, tmp: Case(base_config(run), args=("--timeout", "nan")),
        "--timeout: expected a finite number, got nan",
    ),
    "scale zero": (
        lambda run, tmp: base_config(run, scale=0),
        "{cfg}: parameters.scale: expected a value greater than 0, got 0",
    ),
    "degree too high": (
        lambda run, tmp: base_config(run, fit="polynomial", degree=3),
        "{cfg}: parameters.degree: a degree-3 polynomial needs more than 3 checkpoints",
    ),
    "unknown fit": (
        lambda run, tmp: base_config(run, fit="cubic"),
        "{cfg}: parameters.fit: unknown fit 'cubic'; choose linear_origin, linear, average, ema, expo, log, "
        "polynomial, power, saturating, sine or auto",
    ),
    "no target": (
        lambda run, tmp: base_config(run, target=None),
        "{cfg}: parameters.target_step: required in extrapolate mode (e.g. target_step: 500)",
    ),
    "reconstruct unobserved": (
        lambda run, tmp: base_config(run, target=7, mode="reconstruct"),
        "{cfg}: parameters.target_step: reconstruct mode works on observed checkpoints; step(s) [7] are not in the "
        "window 1..3",
    ),
    "missing tensor": (
        lambda run, tmp: with_model(base_config(run), 1, variant(run, tmp, _drop("model.norm.weight"))),
        "{tmp}/variant: tensor model.norm.weight of the base model is missing",
    ),
    "extra tensor": (
        lambda run, tmp: with_model(base_config(run), 1, variant(run, tmp, _add)),
        "{tmp}/variant: tensor extra.weight is not in the base model {run}/base",
    ),
    "shape mismatch": (
        lambda run, tmp: with_model(base_config(run), 1, variant(run, tmp, _reshape)),
        "{tmp}/variant: tensor model.norm.weight has shape [3], base has [32]",
    ),
    "architecture mismatch": (
        lambda run, tmp: with_model(base_config(run), 1, variant(run, tmp, _arch)),
        "{tmp}/variant: architecture ['LlamaForCausalLM'] differs from the base model's ['Qwen2ForCausalLM']",
    ),
    "models and trajectory": (
        lambda run, tmp: {**base_config(run), "trajectory": {"run_dir": str(run)}},
        "{cfg}: config: give either 'models' or 'trajectory', not both",
    ),
    "bad step range": (
        lambda run, tmp: _trajectory(run, steps="1..3"),
        "{cfg}: trajectory.steps: expected 'FIRST-LAST' (e.g. '1-75') or a list, got '1..3'",
    ),
    "trajectory step not found": (
        lambda run, tmp: _trajectory(run, steps=[1, 40]),
        "{cfg}: trajectory.steps: no checkpoint for step(s) [40] in {run}",
    ),
    "empty run dir": (
        lambda run, tmp: _trajectory(_mkdir(tmp / "empty")),
        "{cfg}: trajectory.run_dir: no step folders in {tmp}/empty; looked for checkpoint-N (HF Trainer, TRL; "
        "checkpoint-N/global_stepN with DeepSpeed); global_step_N/actor (verl); global_stepN (DeepSpeed; "
        "OpenRLHF: _actor/global_stepN, before global_stepN_hf); checkpoint/step-N (torchtitan); step_N, "
        "step_N/pytorch_model_fsdp_0 (accelerate, DCP)",
    ),
    "target with a unit": (
        lambda run, tmp: base_config(run, target="10k"),
        "{cfg}: parameters.target_step: expected an integer or a list of integers, got '10k'",
    ),
    "one discovered checkpoint": (
        lambda run, tmp: _trajectory(run, steps="2-2"),
        "{cfg}: trajectory: need at least 2 window checkpoints, found 1 (step 2); widen trajectory.steps or save "
        "checkpoints more often",
    ),
    "misspelt fit": (
        lambda run, tmp: base_config(run, fit="sqrt"),
        "{cfg}: parameters.fit: unknown fit 'sqrt'; choose linear_origin, linear, average, ema, expo, log, "
        "polynomial, power, saturating, sine or auto",
    ),
    "shape of another family": (
        lambda run, tmp: base_config(run, fit="log", p=0.5),
        "{cfg}: parameters.p: only used by fit: power (fit is log)",
    ),
    "shape with auto": (
        lambda run, tmp: base_config(run, fit="auto", tau=3),
        "{cfg}: parameters.tau: with fit: auto the backtest chooses every shape; remove tau",
    ),
    "power out of range": (
        lambda run, tmp: base_config(run, fit="power", p=2),
        "{cfg}: parameters.p: expected a value in (0, 1.5], got 2",
    ),
    "negative tau": (
        lambda run, tmp: base_config(run, fit="saturating", tau=-1),
        "{cfg}: parameters.tau: expected a value in (0, inf), got -1",
    ),
    "sine on three checkpoints": (
        lambda run, tmp: base_config(run, fit="sine"),
        "{cfg}: parameters.fit: sine needs at least 4 checkpoints in the window, got 3",
    ),
    "auto on a window too short to backtest": (
        lambda run, tmp: base_config(run, fit="auto"),
        "{cfg}: parameters.fit: auto: the backtest needs at least 5 checkpoints in the window to choose (got 3); "
        "name a family (e.g. fit: linear) or observe more checkpoints",
    ),
    "open shape on a window too short to backtest": (
        lambda run, tmp: base_config(run, fit="log"),
        "{cfg}: parameters.tau: log's tau is chosen by the backtest when not given, and the backtest needs at least 5 "
        "checkpoints in the window to choose (got 3); give tau: or observe more checkpoints",
    ),
    "target before the window": (
        lambda run, tmp: base_config(run, steps=(4, 5, 6), target=2),
        "{cfg}: parameters.target_step: 2 is before the window (4..6); extrapolate mode predicts steps after its first "
        "checkpoint: give a later step or a window that starts earlier",
    ),
    "refit window alone": (
        lambda run, tmp: base_config(run, refit_window=3),
        "{cfg}: parameters.refit_window: only used with refit_every",
    ),
    "refit window too long": (
        lambda run, tmp: base_config(run, refit_every=1, refit_window=5),
        "{cfg}: parameters.refit_window: 5 is more than the 3 checkpoints in the window",
    ),
    "refit in reconstruct mode": (
        lambda run, tmp: base_config(run, target=2, mode="reconstruct", refit_every=2),
        "{cfg}: parameters.refit_every: only used in extrapolate mode (mode is reconstruct)",
    ),
    "fit_reconstruct unobserved": (
        lambda run, tmp: base_config(run, target=7, mode="fit_reconstruct"),
        "{cfg}: parameters.target_step: fit_reconstruct mode works on observed checkpoints; step(s) [7] are not in the "
        "window 1..3",
    ),
    "target before the base": (
        lambda run, tmp: base_config(run, steps=(4, 5, 6), target=2, base_step=3),
        "{cfg}: parameters.target_step: 2 is not after the base model's step (parameters.base_step = 3)",
    ),
    "wrong type": (
        lambda run, tmp: base_config(run, rank="two"),
        "{cfg}: parameters.rank: expected an integer, got 'two'",
    ),
    "truncated safetensors header": (
        lambda run, tmp: with_model(base_config(run), 1, _damaged_safetensors(run, tmp, "header")),
        "{tmp}/damaged/model.safetensors: truncated safetensors header ({size} bytes, header says {header}); "
        "re-copy or re-save it",
    ),
    "data shorter than header": (
        lambda run, tmp: with_model(base_config(run), 1, _damaged_safetensors(run, tmp, "data")),
        "{tmp}/damaged/model.safetensors: data is shorter than the header says ({short} of {full} bytes); "
        "the file is truncated: re-copy or re-save it",
    ),
    "nan in checkpoint": (
        lambda run, tmp: with_model(base_config(run), 1, variant(run, tmp, _nan)),
        "{tmp}/variant: tensor model.norm.weight has NaN or Inf values; "
        "pass --allow-nonfinite to merge anyway (such tensors are copied from the base)",
    ),
    "unsafe pickle": (
        lambda run, tmp: with_model(base_config(run), 1, _unsafe_pickle(run, tmp)),
        "{tmp}/pickled/pytorch_model.bin: refusing to unpickle fractions.Fraction, which this format never holds "
        "(it could run code); pass --allow-unsafe-pickle only if you trust where it came from",
    ),
    "output is a file": (
        lambda run, tmp: Case(base_config(run), out=_touch(tmp / "file")),
        "{tmp}/file: output path is a file; give a folder",
    ),
    "output under a file": (
        lambda run, tmp: Case(base_config(run), out=_touch(tmp / "file") / "sub" / "out"),
        "{tmp}/file: is a file, so the output folder {tmp}/file/sub/out cannot be made",
    ),
    "output inside an input": (
        lambda run, tmp: Case(base_config(run), out=run / "checkpoint-2" / "merged"),
        "{run}/checkpoint-2/merged: output overlaps the input {run}/checkpoint-2; choose another output folder",
    ),
    "output equals an input": (
        lambda run, tmp: Case(base_config(run), out=run / "checkpoint-3", args=("--overwrite",)),
        "{run}/checkpoint-3: output overlaps the input {run}/checkpoint-3; choose another output folder",
    ),
    "output contains an input": (
        lambda run, tmp: Case(base_config(run), out=run, args=("--overwrite",)),
        "{run}: output overlaps the input {run}/base; choose another output folder",
    ),
    "disk full": (
        _disk_full,
        "{tmp}/out: no space left on the device; free space or choose another output folder",
    ),
    "read-only file system": (
        _read_only_fs,
        "{tmp}: read-only file system; choose an output folder on a writable one",
    ),
    "read-only while writing": (
        _read_only_while_writing,
        "{tmp}/out: read-only file system; choose another output folder",
    ),
    "relative run dir": (
        lambda run, tmp: {**_trajectory(run), "trajectory": {"run_dir": "runs/nowhere"}},
        "{cfg}: trajectory.run_dir: runs/nowhere is not a directory (relative paths are resolved against the "
        "current directory, {cwd}; run from the directory the config expects, or give absolute paths)",
    ),
    "relative checkpoint": (
        lambda run, tmp: with_model(base_config(run), 1, Path("runs/gone")),
        "{cfg}: models[1].model: runs/gone does not exist (relative paths are resolved against the current "
        "directory, {cwd}; run from the directory the config expects, or give absolute paths)",
    ),
    "permission denied": (
        _no_permission,
        "{tmp}: permission denied; choose an output folder you can write to",
    ),
    "no weights": (
        lambda run, tmp: with_model(base_config(run), 0, _mkdir(tmp / "hollow")),
        "{tmp}/hollow: no model weights found (safetensors, pytorch_model*.bin, verl FSDP shards, "
        "torch.distributed.checkpoint or DeepSpeed ZeRO)",
    ),
}


def _damage_facts(run: Path, tmp: Path) -> dict:
    """Sizes the truncation messages quote."""
    original = (run / "checkpoint-2" / "model.safetensors").read_bytes()
    (header,) = struct.unpack("<Q", original[:8])
    data = len(original) - 8 - header
    damaged = tmp / "damaged" / "model.safetensors"
    size = damaged.stat().st_size if damaged.exists() else 0
    return {"size": size, "header": header, "full": data, "short": data - 100}


def _touch(path: Path) -> Path:
    path.write_text("x")
    return path


def _set_step(config, index, step):
    config["models"][index]["parameters"]["step"] = step
    return config


def _trajectory(run, **kw):
    config = base_config(run)
    del config["models"]
    config["trajectory"] = {"run_dir": str(run), **kw}
    return config


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_every_case_expects_its_own_message():
    """Two cases expecting the same line would test one check twice and another not at all."""
    messages = [expected for _, expected in CASES.values()]
    assert len(set(messages)) == len(messages)


@pytest.mark.parametrize("case", list(CASES))
def test_validation_error(case, qwen_run, tmp_path, monkeypatch):
    make, expected = CASES[case]
    patched = (_disk_full, _no_permission, _read_only_fs, _read_only_while_writing)
    made = make(qwen_run, tmp_path, monkeypatch) if make in patched else make(qwen_run, tmp_path)
    made = made if isinstance(made, Case) else Case(made)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(made.config))
    before = snapshot(qwen_run)
    out = made.out or tmp_path / "out"
    existed = out.exists()
    result = run_cli(str(cfg), str(out), *made.args)
    known = ", ".join(sorted(known_methods()))
    facts = _damage_facts(qwen_run, tmp_path)
    message = expected.format(tmp=tmp_path, run=qwen_run, cfg=cfg, known=known, cwd=Path.cwd(), **facts)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines == [f"error: {message}"]
    assert "Traceback" not in result.output
    assert out.exists() == existed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not [p for p in qwen_run.iterdir() if p.name.startswith(".")]
    assert snapshot(qwen_run) == before


def test_yaml_syntax_error(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("merge_method: relex\nmodels: [\n")
    result = run_cli(str(cfg), str(tmp_path / "out"))
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith(f"error: {cfg}: line ") and "YAML syntax error" in line
    assert not (tmp_path / "out").exists()


def test_trainer_state_must_agree_with_folder_name(qwen_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2, 3):
        shutil.copytree(qwen_run / f"checkpoint-{step}", run / f"checkpoint-{step}")
    (run / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    cfg = tmp_path / "c.yml"
    config = _trajectory(run)
    config["base_model"] = str(qwen_run / "base")
    cfg.write_text(yaml.safe_dump(config))
    result = run_cli(str(cfg), str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {run}/checkpoint-2/trainer_state.json: global_step is 7 but the folder name says 2; "
        "rename the folder or list the checkpoint explicitly under models:"
    )


def test_target_inside_window_warns_but_merges(qwen_run, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(base_config(qwen_run, target=2)))
    result = run_cli(str(cfg), str(tmp_path / "out"), "-q")
    assert result.exit_code == 0
    assert "warning: target step(s) [2] lie inside the window (last step 3)" in result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert_relex_output(tmp_path / "out", qwen_run, [1, 2, 3], 2)  # read off the line between steps 1 and 3


def test_verbose_shows_the_trace(tmp_path):
    result = run_cli(str(tmp_path / "missing.yml"), str(tmp_path / "o"), "-v")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "config file not found" in result.stderr


def test_verbose_shows_the_library_debug_log(qwen_run, tmp_path, caplog):
    """-v turns on the library's debug log (here the plan's window and the fit per output);
    without it the library emits nothing below WARNING."""
    import logging

    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(base_config(qwen_run)))
    package = logging.getLogger("relex_merge")
    level = package.level
    package.setLevel(logging.NOTSET)  # an earlier -v in this process leaves it at DEBUG
    try:
        quiet = run_cli(str(cfg), str(tmp_path / "quiet"), "-q")
        assert quiet.exit_code == 0, quiet.stderr
        assert not [r for r in caplog.records if r.name.startswith("relex_merge")]
        loud = run_cli(str(cfg), str(tmp_path / "loud"), "-q", "-v")
        assert loud.exit_code == 0, loud.stderr
    finally:
        package.setLevel(level)
    debug = {r.name: [] for r in caplog.records}
    for record in caplog.records:
        assert record.levelno == logging.DEBUG, record.getMessage()
        debug[record.name].append(record.getMessage())
    assert debug["relex_merge.workflows.plan"] == [
        "window: 3 checkpoints, steps 1..3; the fit uses 3 (steps 1..3); targets [9]; fit linear, rank 1, "
        "mode extrapolate"
    ]
    assert debug["relex_merge.workflows.merge"] == [
        "step 9: fit linear (as configured); NOT SUPPORTED"
    ]  # 3 points: no backtest


@pytest.mark.parametrize("state", [[7], {"global_step": "seven"}])
def test_a_trainer_state_that_is_not_one_is_one_line(qwen_run, tmp_path, state):
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2, 3):
        shutil.copytree(qwen_run / f"checkpoint-{step}", run / f"checkpoint-{step}")
    (run / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    config = _trajectory(run)
    config["base_model"] = str(qwen_run / "base")
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(config))
    result = run_cli(str(cfg), str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {run}/checkpoint-2/trainer_state.json: not a trainer state (expected a JSON object with an "
        "integer global_step)"
    )


def test_an_index_whose_weight_map_is_not_a_mapping_is_one_line(qwen_run, tmp_path):
    model = tmp_path / "sharded"
    shutil.copytree(qwen_run / "checkpoint-1", model)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    config = base_config(qwen_run)
    config["models"][0]["model"] = str(model)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(config))
    result = run_cli(str(cfg), str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {model}/model.safetensors.index.json: not a valid index (weight_map must map tensor names to "
        "file names)"
    )


def test_sizes_read_decimal_and_binary_units():
    from relex_merge.common.errors import RelexError
    from relex_merge.common.units import parse_size

    assert [parse_size(t, "x") for t in ("8", "8b", "8k", "8KB", "8ki", "8KiB", "1.5g", "2TiB")] == [
        8,
        8,
        8000,
        8000,
        8192,
        8192,
        1_500_000_000,
        2 * 1024**4,
    ]
    for bad in ("8i", "8ib", "8bb", "GB", "8 x"):
        with pytest.raises(RelexError, match="cannot read size"):
            parse_size(bad, "x")


def test_non_finite_shapes_and_scales_are_refused_outside_the_config_too():
    """The library and mergekit's relex method build specs without the config schema."""
    import math

    from relex_merge.core.fits import family
    from relex_merge.core.relex import spec_from_parameters

    assert family("saturating").shape.problem(math.inf) == "expected a finite number, got inf"
    assert family("power").shape.problem(math.nan) == "expected a finite number, got nan"
    for bad in (dict(scale=math.inf), dict(fit="log", tau=math.inf), dict(fit="power", p=math.nan)):
        with pytest.raises(ValueError, match="expected a finite number"):
            spec_from_parameters(**bad)


@pytest.mark.parametrize("scales", ["inf", "1.0,nan"])
def test_sweep_refuses_non_finite_scales(scales, qwen_run, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(base_config(qwen_run)))
    tasks = Path(__file__).resolve().parents[2] / "demo" / "tasks"
    result = run_cli(
        "sweep",
        str(cfg),
        str(tmp_path / "out"),
        "--targets",
        "9",
        "--scales",
        scales,
        "--tasks",
        "relex_demo_addition",
        "--include-path",
        str(tasks),
        "-q",
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --scales: every scale must be a finite number > 0"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "steps,said",
    [
        (
            "1-9",
            "'1-9' asks for steps 1-9, but {run} has no checkpoint for steps 7-9; using the checkpoints found in "
            "steps 1-6",
        ),
        (
            "0-4",
            "'0-4' asks for steps 0-4, but {run} has no checkpoint for step 0; using the checkpoints found in "
            "steps 1-4",
        ),
    ],
)
def test_a_step_range_past_the_checkpoints_found_says_which_are_missing(qwen_run, tmp_path, steps, said):
    """A range is every checkpoint found in it; reaching past the first or last one found is a
    warning naming the missing steps (docs/configuration.md), and the merge goes on."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_trajectory(qwen_run, steps=steps)))
    result = run_cli(str(cfg), str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if not line.startswith("verdict: ")]
    assert warned == [f"warning: trajectory.steps: {said.format(run=qwen_run)}"]
    window = load_config(tmp_path / "out" / "relex_config.yml").models
    assert [m.parameters.step for m in window] == list(range(1, 7) if steps == "1-9" else range(1, 5))
    # inside the checkpoints found, a range says nothing
    cfg.write_text(yaml.safe_dump(_trajectory(qwen_run, steps="2-5")))
    quiet = run_cli(str(cfg), str(tmp_path / "out2"), "-q")
    assert (
        quiet.exit_code == 0 and [line for line in quiet.stderr.splitlines() if not line.startswith("verdict: ")] == []
    )


def test_a_misspelt_command_is_named_not_taken_for_a_config(tmp_path):
    """`relex-merge analyse C` said "analyse: config file not found"."""
    result = run_cli("analyse", "c.yml", cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: analyse: neither a command nor a config file (did you mean 'analyze'?)"
    ]
    (tmp_path / "analyse").write_text("merge_method: relex\n")  # a config that happens to be named so
    assert "did you mean" not in run_cli("analyse", "out", cwd=tmp_path).stderr

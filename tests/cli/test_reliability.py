"""Nothing lost, nothing half-written: signals, determinism, fuzzed configs, provenance."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from relex_merge.testing.synthetic import make_planted_run
from tests.helpers import (
    assert_relex_output,
    assert_state_matches,
    generate,
    load_state,
    relex_expectation,
    run_cli,
    snapshot,
    write_config,
)


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    """Big enough (~9 MB a checkpoint) that a merge with a tiny budget takes seconds."""
    return make_planted_run(
        tmp_path_factory.mktemp("slow") / "run", steps=range(1, 7), model_kwargs=dict(hidden=256, layers=4)
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_write_removes_partial_output(sig, code, slow_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", slow_run, range(1, 7), 20)
    out = tmp_path / "out"
    before = snapshot(slow_run)
    exe = Path(sys.executable).parent / "relex-merge"
    proc = subprocess.Popen(
        [str(exe), str(cfg), str(out), "--max-memory", "16KB", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a shell's background job (nohup, `&`) starts with SIGINT ignored,
        # and then Python rightly never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until shard data is being written
        shards = list(tmp_path.glob(".out.relex-tmp-*/*.safetensors"))
        if shards and shards[0].stat().st_size > 100_000:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    else:
        pytest.fail("the merge never started writing")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "partial output removed, inputs untouched" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert snapshot(slow_run) == before


def test_same_config_twice_is_byte_identical(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 4, 5], [10, 30], parameters={"rank": 2})
    for name in ("a", "b"):
        assert run_cli(str(cfg), str(tmp_path / name), "-q", "--shard-size", "40KB").exit_code == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.safetensors"))
    assert files_a == files_b and len(files_a) > 2
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    for target in (10, 30):  # rank 2: the second direction is noise, from a float32 Gram matrix
        assert_relex_output(tmp_path / "a" / f"step-{target}", qwen_run, [1, 2, 3, 4, 5], target, rank=2, rel=2e-3)


def test_model_card_fingerprints_inputs(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    assert run_cli(str(cfg), str(tmp_path / "fast"), "-q").exit_code == 0
    assert run_cli(str(cfg), str(tmp_path / "full"), "-q", "--hash").exit_code == 0
    assert_relex_output(tmp_path / "fast", qwen_run, [1, 2, 3], 9)
    fast = (tmp_path / "fast" / "README.md").read_text()
    full = (tmp_path / "full" / "README.md").read_text()
    size = (qwen_run / "checkpoint-2" / "model.safetensors").stat().st_size
    row = next(line for line in fast.splitlines() if line.startswith(f"| `{qwen_run / 'checkpoint-2'}` |"))
    assert f"| 2 | {size} | `fast:" in row
    assert sum(1 for line in full.splitlines() if "`sha256:" in line) == 4  # base + 3 checkpoints
    # a changed checkpoint changes its fingerprint
    copy = tmp_path / "ck2"
    copy.mkdir()
    state = load_file(qwen_run / "checkpoint-2" / "model.safetensors")
    state["model.norm.weight"][0] += 1.0
    save_file(state, copy / "model.safetensors")
    (copy / "config.json").write_text((qwen_run / "checkpoint-2" / "config.json").read_text())
    config = yaml.safe_load(cfg.read_text())
    config["models"][1]["model"] = str(copy)
    cfg.write_text(yaml.safe_dump(config))
    assert run_cli(str(cfg), str(tmp_path / "changed"), "-q").exit_code == 0
    changed = (tmp_path / "changed" / "README.md").read_text()
    fingerprint = row.split("`")[-2]
    assert fingerprint not in changed


def _config_with_a_nonfinite_value(qwen_run: Path, tmp_path: Path, value: float) -> tuple[Path, Path, dict]:
    """A config over checkpoints 1-3 whose second is a copy (tmp_path/ck2) with ``value`` in
    model.norm.weight: (the config file, the copy, its state)."""
    copy = tmp_path / "ck2"
    shutil.copytree(qwen_run / "checkpoint-2", copy)
    state = load_file(copy / "model.safetensors")
    state["model.norm.weight"][5] = value
    save_file(state, copy / "model.safetensors")
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    config = yaml.safe_load(cfg.read_text())
    config["models"][1]["model"] = str(copy)
    cfg.write_text(yaml.safe_dump(config))
    return cfg, copy, state


def test_allow_nonfinite_copies_the_tensor_from_the_base(qwen_run, tmp_path):
    cfg, _, state = _config_with_a_nonfinite_value(qwen_run, tmp_path, float("inf"))
    result = run_cli(str(cfg), str(tmp_path / "out"), "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    merged = load_state(tmp_path / "out")
    base = load_state(qwen_run / "base")
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    # every other tensor is merged as usual, over the same checkpoints
    checkpoints = [load_state(qwen_run / "checkpoint-1"), state, load_state(qwen_run / "checkpoint-3")]
    finite = {name: tensor for name, tensor in base.items() if name != "model.norm.weight"}
    del merged["model.norm.weight"]
    assert_state_matches(merged, relex_expectation(finite, checkpoints, [1, 2, 3], 9), base)
    assert (
        "had NaN or Inf values in the window and were copied from the base: model.norm.weight"
        in (tmp_path / "out" / "README.md").read_text()
    )


def test_a_fit_cache_made_with_allow_nonfinite_does_not_carry_the_consent(qwen_run, tmp_path):
    """A later merge given that cache copied the non-finite tensor without the flag."""
    cfg, _, _ = _config_with_a_nonfinite_value(qwen_run, tmp_path, float("nan"))
    analysis = tmp_path / "analysis"
    assert run_cli("analyze", str(cfg), "--out", str(analysis), "--allow-nonfinite", "-q").exit_code == 0
    cache = str(analysis / "fit_cache.safetensors")
    refused = run_cli(str(cfg), str(tmp_path / "out"), "--fit-cache", cache, "-q")
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.strip() == (
        "error: tensor model.norm.weight: the fit cache's Gram matrix has NaN or Inf (made with --allow-nonfinite); "
        "pass --allow-nonfinite to merge anyway (such tensors are copied from the base)"
    )
    assert not (tmp_path / "out").exists()
    allowed = run_cli(str(cfg), str(tmp_path / "out"), "--fit-cache", cache, "--allow-nonfinite", "-q")
    assert allowed.exit_code == 0, allowed.output
    plain = run_cli(str(cfg), str(tmp_path / "plain"), "--allow-nonfinite", "-q")
    assert plain.exit_code == 0, plain.output
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "plain" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("command", ["analyze", "sweep"])
def test_the_nonfinite_error_names_a_flag_the_command_has(command, qwen_run, tmp_path):
    """The engine's NaN error says "pass --allow-nonfinite"; analyze and sweep had no such flag."""
    cfg, copy, state = _config_with_a_nonfinite_value(qwen_run, tmp_path, float("nan"))
    assert "--allow-nonfinite" in run_cli(command, "--help").output
    if command == "sweep":  # scoring needs lm-eval; the merge step fails before it
        tasks = Path(__file__).resolve().parents[2] / "demo" / "tasks"
        args = [
            "sweep",
            str(cfg),
            str(tmp_path / "out"),
            "--targets",
            "9",
            "--tasks",
            "relex_demo_addition",
            "--include-path",
            str(tasks),
            "-q",
        ]
    else:
        args = ["analyze", str(cfg), "--out", str(tmp_path / "out"), "-q"]
    result = run_cli(*args)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {copy}: tensor model.norm.weight has NaN or Inf values; pass "
        "--allow-nonfinite to merge anyway (such tensors are copied from the base)"
    )
    assert not (tmp_path / "out").exists()
    if command == "analyze":  # with the flag the tensor is left out of the analysis
        result = run_cli(*args, "--allow-nonfinite")
        assert result.exit_code == 0, result.output
        names = [t["name"] for t in json.loads((tmp_path / "out" / "analysis.json").read_text())["tensors"]]
        assert "model.norm.weight" not in names and len(names) == len(state) - 1


# Fuzzing: random documents built from real and mistyped keys and odd values.
KEYS = [
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "trajectory",
    "dtype",
    "out_dtype",
    "name",
    "model",
    "step",
    "target_step",
    "rank",
    "fit",
    "window",
    "scale",
    "mode",
    "degree",
    "run_dir",
    "steps",
    "every",
    "tokenizer_source",
    "weight",
    "parametrs",
    "x",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 1000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["relex", "ties", "linear", "reconstruct", "1-8", "bfloat16", "", "runs/x", "polynomial"]),
    st.text(max_size=8),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=6)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(documents, min_size=1, max_size=3), raw=st.one_of(st.none(), st.text(max_size=40)))
def test_fuzzed_configs_never_trace(docs, raw, tmp_path):
    cfg = tmp_path / "fuzz.yml"
    cfg.write_text(raw if raw is not None else yaml.safe_dump_all(docs))
    out = tmp_path / "fuzz-out"
    merged = run_cli(str(cfg), str(out), "-q")
    for result in (merged, run_cli(str(cfg), "--print-config")):
        assert result.exit_code in (0, 2), (result.exit_code, result.output)
        assert "Traceback" not in result.output
        if result.exit_code == 2:
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if merged.exit_code == 2:  # a refused config writes nothing
        assert not out.exists()
    else:  # a config that merged wrote a model
        assert any(out.rglob("*.safetensors")), sorted(out.rglob("*"))
        shutil.rmtree(out)  # hypothesis reuses tmp_path: the next example starts clean


def test_fingerprint_of_identical_files_is_stable(tmp_path):
    from relex_merge.io.fingerprints import input_record

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 3_000_000)
    a = input_record("p", [f], False)
    b = input_record("p", [f], False)
    full = input_record("p", [f], True)
    assert a == b and a.fingerprint.startswith("fast:") and full.fingerprint.startswith("sha256:")
    f.write_bytes(b"x" * 1_500_000 + b"y" + b"x" * 1_499_999)  # same size, changed middle
    assert input_record("p", [f], False) != a


def _without(folder: Path, names) -> Path:
    for name in names:
        (folder / name).unlink()
    return folder


@pytest.mark.parametrize("missing", ["config", "tokenizer", "tokenizer everywhere", "both everywhere"])
def test_a_base_without_config_or_tokenizer(missing, qwen_run, tmp_path):
    """A weights-only base used to give an output transformers could not load (exit 0)."""
    from relex_merge.output.folders import TOKENIZER_FILES

    run = tmp_path / "run"
    shutil.copytree(qwen_run, run)
    tokenizer = [p.name for p in (run / "base").iterdir() if p.name in TOKENIZER_FILES]
    assert "tokenizer.json" in tokenizer
    for name in tokenizer if missing == "tokenizer" else []:  # a trainer's checkpoint holds one
        shutil.copy2(run / "base" / name, run / "checkpoint-4" / name)
    _without(run / "base", ["config.json"] if missing == "config" else tokenizer)
    if missing == "both everywhere":
        for folder in run.iterdir():
            _without(folder, [n for n in ["config.json"] if (folder / n).exists()])
    cfg = write_config(tmp_path / "c.yml", run, [1, 2, 3, 4], 8)
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out), "-q")
    if missing == "both everywhere":
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [
            f"error: {run / 'base'}: the base model has no config.json, nor has the last window checkpoint "
            f"{run / 'checkpoint-4'}: the output would not load; use as base_model the model folder the run "
            "started from"
        ]
        assert not out.exists()
        analysis = run_cli("analyze", str(cfg), "--out", str(tmp_path / "analysis"), "-q")  # writes no model
        assert analysis.exit_code == 0, analysis.output
        # an earlier checkpoint's config.json alone: nothing to compare it with (was a TypeError)
        shutil.copy2(qwen_run / "checkpoint-1" / "config.json", run / "checkpoint-1" / "config.json")
        analysis = run_cli("analyze", str(cfg), "--out", str(tmp_path / "analysis2"), "-q")
        assert analysis.exit_code == 0, analysis.output
        return
    assert result.exit_code == 0, result.output
    taken = run / "checkpoint-4"
    if missing == "tokenizer everywhere":  # transformers loads the model; a tokenizer is the user's to give
        assert result.stderr.splitlines()[0] == (
            f"warning: neither the base model {run / 'base'} nor the last window checkpoint has tokenizer files: "
            "the outputs have none (set tokenizer_source to load them with a tokenizer, e.g. for relex-merge eval)"
        )
        assert not (out / "tokenizer.json").exists()
        return
    if missing == "config":
        line = f"warning: the base model {run / 'base'} has no config.json: the outputs take {taken / 'config.json'}"
        assert json.loads((out / "config.json").read_text()) == json.loads((taken / "config.json").read_text())
    else:
        line = f"warning: the base model {run / 'base'} has no tokenizer files: the outputs take those of {taken}"
        for name in tokenizer:
            assert (out / name).read_bytes() == (taken / name).read_bytes(), name
        assert f"tokenizer_source: {taken}" in (out / "relex_config.yml").read_text()
    assert line in result.stderr.splitlines()
    generate(out)  # config and tokenizer are enough for transformers


def test_eval_of_a_folder_without_tokenizer_says_so(qwen_run, tmp_path):
    from relex_merge.output.folders import TOKENIZER_FILES

    model = tmp_path / "model"
    shutil.copytree(qwen_run / "base", model)
    _without(model, [p.name for p in model.iterdir() if p.name in TOKENIZER_FILES])
    result = run_cli("eval", str(model), "--tasks", "arithmetic_tiny", "--include-path", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: {model}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...); copy the base model's "
        "into it, or merge again with tokenizer_source"
    ]


@pytest.mark.parametrize("odd", ["dtype", "config"])
def test_a_window_that_is_not_one_model_gets_a_warning(odd, qwen_run, tmp_path):
    """A bf16 save in an fp32 window, or a config.json describing another model, merged silently."""
    run = tmp_path / "run"
    shutil.copytree(qwen_run, run)
    ckpt = run / "checkpoint-2"
    if odd == "dtype":
        state = load_file(ckpt / "model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, ckpt / "model.safetensors", {"format": "pt"})
        line = (
            f"warning: {ckpt}: stored in bfloat16, the rest of the window in float32: the rounding enters the fit "
            "as movement; convert the window to one precision (relex-merge convert)"
        )
    else:
        config = json.loads((ckpt / "config.json").read_text())
        heads = config["num_attention_heads"]
        config["num_attention_heads"] = heads * 2
        (ckpt / "config.json").write_text(json.dumps(config))
        # what a re-save by another transformers, or a trainer, changes: no warning for these
        resaved = json.loads((run / "checkpoint-5" / "config.json").read_text())
        resaved.update(transformers_version="4.43.0", pad_token_id=0, layer_types=None, _attn_implementation="sdpa")
        resaved.pop("head_dim", None)
        (run / "checkpoint-5" / "config.json").write_text(json.dumps(resaved))
        line = (
            f"warning: {ckpt}: its config.json differs from the base model's in num_attention_heads ({heads * 2} vs "
            f"{heads}): the outputs take the base's; check that the window is this model's run"
        )
    cfg = write_config(tmp_path / "c.yml", run, [1, 2, 3, 4], 8)
    result = run_cli(str(cfg), str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    assert [x for x in result.stderr.splitlines() if x.startswith("warning: ")] == [line]
    clean = run_cli(str(write_config(tmp_path / "d.yml", run, [3, 4, 5, 6], 8)), str(tmp_path / "out2"), "-q")
    assert clean.exit_code == 0 and "warning: " not in clean.stderr, clean.output


def test_a_tokenizer_beside_a_deepspeed_tag_base_is_copied(qwen_run, tmp_path):
    """A base whose tokenizer sits in a folder its reader names (a DeepSpeed tag's parent) was
    neither copied nor warned about."""
    from types import SimpleNamespace

    from relex_merge.config.schema import parse_config
    from relex_merge.workflows.plan import _model_files

    step = tmp_path / "checkpoint-2"
    tag = step / "global_step2"
    tag.mkdir(parents=True)
    shutil.copy2(qwen_run / "base" / "tokenizer.json", step / "tokenizer.json")
    config = parse_config(yaml.safe_load(write_config(tmp_path / "c.yml", qwen_run, [1, 2], 4).read_text()), "c.yml")
    config = config.model_copy(update={"base_model": str(tag)})
    base = SimpleNamespace(path=str(tag), config_folders=[step])
    last = SimpleNamespace(path=str(qwen_run / "checkpoint-2"), config_folders=[])
    warnings: list[str] = []
    planned, _ = _model_files(config, {"model_type": "qwen2"}, base, last, warnings, True)
    assert planned.tokenizer_source == str(step) and warnings == []

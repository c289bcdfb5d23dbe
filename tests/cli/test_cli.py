"""End to end through the CLI on tiny real transformers models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from relex_merge.config.schema import load_config
from tests.helpers import (
    assert_relex_output,
    assert_state_matches,
    dense_relex,
    generate,
    load_state,
    relex_expectation,
    run_cli,
    write_config,
)

REPO = Path(__file__).resolve().parents[2]


def test_qwen2_merge_loads_generates_and_matches_reference(qwen_run, tmp_path):
    steps = [1, 2, 3, 4, 5, 6]
    cfg = write_config(tmp_path / "c.yml", qwen_run, steps, 18)
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out))
    assert result.exit_code == 0, result.output
    assert "rank-1 explained variance" in result.stdout
    generate(out)

    merged = load_state(out)
    base = load_state(qwen_run / "base")
    checkpoints = [load_state(qwen_run / f"checkpoint-{s}") for s in steps]
    assert_state_matches(merged, relex_expectation(base, checkpoints, steps, 18), base)
    name = "model.embed_tokens.weight"  # and, as the helper measures it, against the whole tensor
    expected = dense_relex(base[name], [c[name] for c in checkpoints], steps, 18)
    assert (merged[name].double() - expected).norm() / expected.norm() < 1e-6

    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    assert "- relex" in card and "- merge" in card
    assert "| target step | 18 |" in card and "rank-1 explained variance" in card
    reread = load_config(out / "relex_config.yml")
    assert [m.parameters.step for m in reread.models] == steps
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".out.relex-*"))


def test_several_targets_make_one_model_each(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [2, 4, 6], [12, 24], out_dtype="bfloat16")
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["step-12", "step-24"]
    for folder in out.iterdir():
        config = json.loads((folder / "config.json").read_text())
        assert config["dtype"] == "bfloat16"
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    a = load_state(out / "step-12")["model.norm.weight"].float()
    b = load_state(out / "step-24")["model.norm.weight"].float()
    base = load_state(qwen_run / "base")["model.norm.weight"]
    # planted linear trajectory: twice the horizon, twice the displacement
    assert torch.allclose(b - base, 2 * (a - base), atol=2e-2, rtol=2e-2)
    # and each target's every tensor is the reference's, rounded to bfloat16
    base_state = load_state(qwen_run / "base")
    checkpoints = [load_state(qwen_run / f"checkpoint-{s}") for s in (2, 4, 6)]
    for target in (12, 24):
        expected = relex_expectation(base_state, checkpoints, [2, 4, 6], target)
        assert_state_matches(load_state(out / f"step-{target}"), expected, base_state, dtype=torch.bfloat16)


def test_small_shard_size_writes_index_and_shards(qwen_run, tmp_path):
    steps = [1, 2, 3]
    cfg = write_config(tmp_path / "c.yml", qwen_run, steps, 9)
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out), "--shard-size", "30KB", "--max-memory", "4KB")
    assert result.exit_code == 0, result.output
    assert "2: Gram, then outputs" in result.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert [s.name for s in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    base = load_state(qwen_run / "base")
    expected = relex_expectation(base, [load_state(qwen_run / f"checkpoint-{s}") for s in steps], steps, 9)
    state = {}
    for shard in shards:  # each shard on its own: its header, its offsets, its bytes
        assert shard.stat().st_size <= 8 + 30_000 + 4096  # header plus at most one 30KB shard of data
        with safe_open(str(shard), "pt") as f:
            names = list(f.keys())
            assert names and all(index["weight_map"][k] == shard.name for k in names)
            part = {k: f.get_tensor(k) for k in names}
        assert_state_matches(part, {k: expected[k] for k in names}, base)
        state.update(part)
    assert sorted(state) == sorted(index["weight_map"]) == sorted(base)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    generate(out)


# steps, target, parameters (the planted run is linear in the step, from a base at step 0).
# A second direction here is noise, found from a float32 Gram matrix: rank 2 is looser.
STEP_CASES = {
    "uneven": ([2, 3, 5, 8], 20, {}),
    "late-start": ([10, 11, 12, 13], 30, {}),
    "late-start-through-the-base": ([10, 11, 12, 13], 30, {"fit": "linear_origin"}),
    "base-step": ([8, 10, 12, 13], 26, {"fit": "linear_origin", "base_step": 5}),
    "gaps-window": ([2, 3, 10, 11, 13], 26, {"window": 4}),
    "gaps-window-rank-2": ([2, 3, 10, 11, 13], 26, {"rank": 2, "window": 4}),
    "gaps-polynomial": ([2, 5, 8, 12, 13], 20, {"fit": "polynomial", "degree": 2}),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_fit_is_against_the_step_not_the_position(case, uneven_run, tmp_path):
    """Each checkpoint's coefficient is regressed on its step: positions 0..N-1 (or 1..N) would
    give other outputs here, while on steps 1..N they coincide with the steps."""
    steps, target, params = STEP_CASES[case]
    cfg = write_config(tmp_path / "c.yml", uneven_run, steps, target, parameters=params)
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out), "-q")
    assert result.exit_code == 0, result.output
    base = load_state(uneven_run / "base")
    checkpoints = [load_state(uneven_run / f"checkpoint-{s}") for s in steps]
    expected = relex_expectation(base, checkpoints, steps, target, **params)
    assert_state_matches(load_state(out), expected, base, rel=2e-3 if params.get("rank") else 1e-5)
    # the same checkpoints called 1..N (their positions + 1) are another model: the test can fail
    positions = relex_expectation(base, checkpoints, range(1, len(steps) + 1), target, **params)
    name = "model.layers.0.mlp.down_proj.weight"
    moved = (positions[name] - expected[name]).norm() / (expected[name] - base[name].double()).norm()
    assert moved > 0.05


def test_chunked_cli_output_equals_unchunked(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 4], [10, 20])
    assert run_cli(str(cfg), str(tmp_path / "a"), "-q").exit_code == 0
    assert run_cli(str(cfg), str(tmp_path / "b"), "-q", "--max-memory", "2KB").exit_code == 0
    for t in (10, 20):
        a, b = load_state(tmp_path / "a" / f"step-{t}"), load_state(tmp_path / "b" / f"step-{t}")
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name
        assert_relex_output(tmp_path / "b" / f"step-{t}", qwen_run, [1, 2, 3, 4], t)


def test_thread_count_leaves_the_output_byte_identical(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 4], [10, 20])
    one = run_cli(str(cfg), str(tmp_path / "one"), "--threads", "1", "--profile")
    assert one.exit_code == 0, one.output
    assert "1 worker busy" in " ".join(one.stdout.split())
    assert run_cli(str(cfg), str(tmp_path / "four"), "-q", "--threads", "4").exit_code == 0
    for t in (10, 20):
        a = (tmp_path / "one" / f"step-{t}" / "model.safetensors").read_bytes()
        assert a == (tmp_path / "four" / f"step-{t}" / "model.safetensors").read_bytes()
        assert_relex_output(tmp_path / "one" / f"step-{t}", qwen_run, [1, 2, 3, 4], t)


def test_tied_llama_stays_tied(llama_tied_run, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = write_config(tmp_path / "c.yml", llama_tied_run, [1, 2, 3, 4, 5], 15)
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    merged = load_state(out)
    assert "lm_head.weight" not in merged
    base = load_state(llama_tied_run / "base")
    assert "lm_head.weight" not in base  # stored once in the inputs too
    checkpoints = [load_state(llama_tied_run / f"checkpoint-{s}") for s in range(1, 6)]
    expected = relex_expectation(base, checkpoints, range(1, 6), 15)
    assert_state_matches(merged, expected, base)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight.detach(), merged["model.embed_tokens.weight"])
    generate(out)


def test_shipped_configs_run(tmp_path):
    from relex_merge.testing.synthetic import make_planted_run

    run = make_planted_run(tmp_path / "runs" / "synthetic", steps=range(1, 9))
    base = load_state(run / "base")
    # what each shipped config says: its window, targets and output dtype
    shipped = {
        "synthetic-explicit.yml": ([2, 3, 5, 8], {".": 20}, torch.bfloat16),
        "synthetic-trajectory.yml": ([1, 2, 3, 4, 5, 6, 7, 8], {"step-16": 16, "step-24": 24}, torch.float32),
    }
    for name, (steps, targets, dtype) in shipped.items():
        out = tmp_path / f"out-{name}"
        result = run_cli(str(REPO / "merge_configs" / name), str(out), "-q", cwd=tmp_path)
        assert result.exit_code == 0, result.output
        if "." not in targets:
            assert sorted(p.name for p in out.iterdir()) == sorted(targets)
        checkpoints = [load_state(run / f"checkpoint-{s}") for s in steps]
        for folder, target in targets.items():
            expected = relex_expectation(base, checkpoints, steps, target)
            assert_state_matches(load_state(out / folder), expected, base, dtype=dtype)
            generate(out / folder)


def test_trajectory_discovery_and_print_config(tmp_path):
    from relex_merge.testing.synthetic import make_planted_run

    run = make_planted_run(tmp_path / "run", steps=[1, 2, 3, 4, 5, 6, 7])
    # verl's layout: global_step_N/actor/huggingface holding HF weights
    verl = tmp_path / "verl"
    for step in (10, 20, 30):
        shutil.copytree(run / f"checkpoint-{step // 10}", verl / f"global_step_{step}" / "actor" / "huggingface")
    cases = [
        ({"run_dir": str(run)}, [1, 2, 3, 4, 5, 6, 7], "checkpoint-"),
        ({"run_dir": str(run), "steps": "2-6", "every": 2}, [2, 4, 6], "checkpoint-"),
        ({"run_dir": str(run), "steps": [1, 7]}, [1, 7], "checkpoint-"),
        ({"run_dir": str(verl)}, [10, 20, 30], "actor/huggingface"),
    ]
    for trajectory, steps, marker in cases:
        cfg = tmp_path / "t.yml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "merge_method": "relex",
                    "base_model": str(run / "base"),
                    "trajectory": trajectory,
                    "parameters": {"target_step": 100},
                }
            )
        )
        result = run_cli(str(cfg), "--print-config")
        assert result.exit_code == 0, result.output
        expanded = yaml.safe_load(result.stdout)
        assert "trajectory" not in expanded
        assert [m["parameters"]["step"] for m in expanded["models"]] == steps
        assert all(marker in m["model"] for m in expanded["models"])
    out = tmp_path / "verl-out"
    assert run_cli(str(cfg), str(out), "-q").exit_code == 0
    # global_step_10/20/30 hold checkpoint-1/2/3: fitted at steps 10, 20, 30, not 1, 2, 3
    base = load_state(run / "base")
    expected = relex_expectation(base, [load_state(run / f"checkpoint-{s}") for s in (1, 2, 3)], [10, 20, 30], 100)
    assert_state_matches(load_state(out), expected, base)
    generate(out)


def test_overwrite_replaces_and_refusal_keeps_existing(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = run_cli(str(cfg), str(out), "-q")
    assert refused.exit_code == 2
    assert "output folder is not empty; pass --overwrite" in refused.stderr
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli(str(cfg), str(out), "-q", "--overwrite").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert_relex_output(out, qwen_run, [1, 2, 3], 9)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_output_parents_are_made_and_removed_on_failure(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    nested = tmp_path / "a" / "b" / "out"
    assert run_cli(str(cfg), str(nested), "-q").exit_code == 0
    assert (nested / "model.safetensors").is_file()
    assert_relex_output(nested, qwen_run, [1, 2, 3], 9)
    # a merge that fails mid-way leaves no folders behind
    config = yaml.safe_load(cfg.read_text())
    broken = tmp_path / "ck2"
    shutil.copytree(qwen_run / "checkpoint-2", broken)
    state = load_state(broken)
    state["model.norm.weight"][0] = float("nan")
    from safetensors.torch import save_file

    save_file(state, broken / "model.safetensors")
    config["models"][1]["model"] = str(broken)
    cfg.write_text(yaml.safe_dump(config))
    result = run_cli(str(cfg), str(tmp_path / "x" / "y" / "out"), "-q")
    assert result.exit_code == 2 and "NaN or Inf" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_console_script_in_a_subprocess(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    exe = Path(sys.executable).parent / "relex-merge"
    proc = subprocess.run([str(exe), str(cfg), str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert_relex_output(tmp_path / "out", qwen_run, [1, 2, 3], 9)
    bad = subprocess.run(
        [str(exe), str(tmp_path / "missing.yml"), str(tmp_path / "o2")], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.yml'}: config file not found"]
    assert "Traceback" not in bad.stderr


def test_the_horizon_is_printed_one_way_everywhere(qwen_run, tmp_path):
    """1.2x in the verdict, the card, relex_config.yml and analyze alike (the card once said
    "1.20 x")."""
    import re

    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 4, 5, 6], 12)  # (12 - 6) / 5 = 1.2 spans
    merged = run_cli(str(cfg), str(tmp_path / "out"))
    analysed = run_cli("analyze", str(cfg), "-v")
    assert merged.exit_code == 0 and analysed.exit_code == 0, merged.output + analysed.output
    card = (tmp_path / "out" / "README.md").read_text()
    written = (tmp_path / "out" / "relex_config.yml").read_text()
    assert "| horizon past the window | 1.2x the window span |" in card
    assert "| target horizon | 1.2x the window span |" in card
    for text in (merged.stderr, card, written, analysed.stdout):  # a merge's verdict goes to stderr
        assert "step 12 is 1.2x the window span past its end" in text
        # no other spelling of a horizon: "1.20 x", "1.20x", "1.2 x"
        assert not re.findall(r"\d\.\d\d ?x\b|\d x\b", text.replace("x the true", "")), text


def test_a_target_inside_the_window_gets_no_verdict(qwen_run, tmp_path):
    """Issue 23, finding 6: step 3 of a window of steps 1-6 was judged "at -0.6x the window span
    past its end". It is interpolation: planning warns, and no verdict is printed or recorded."""
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 4, 5, 6], [3, 12])
    result = run_cli(str(cfg), str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    verdicts = [line for line in result.stderr.splitlines() if line.startswith("verdict: ")]
    assert len(verdicts) == 1 and "step 12 is 1.2x" in verdicts[0], result.stderr
    assert "target step(s) [3] lie inside the window (last step 6): this interpolates" in result.stderr
    assert "-0." not in result.stderr
    assert (tmp_path / "out" / "step-12" / "relex_config.yml").read_text().startswith("# relex-merge verdict")
    assert (tmp_path / "out" / "step-3" / "relex_config.yml").read_text().startswith("merge_method: relex")

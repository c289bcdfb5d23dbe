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
from safetensors.torch import load_file

from relex_merge.config import load_config
from tests.helpers import dense_relex, run_cli

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, run: Path, steps, targets, **extra) -> Path:
    config = {
        "merge_method": "relex",
        "base_model": str(run / "base"),
        "models": [{"model": str(run / f"checkpoint-{s}"), "parameters": {"step": s}} for s in steps],
        "parameters": {"target_step": targets, **extra.pop("parameters", {})},
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def generate(folder: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer("12+34=", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    return tokenizer.decode(out[0])


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
    assert set(merged) == set(base)
    for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias", "model.norm.weight"]:
        expected = dense_relex(base[name], [c[name] for c in checkpoints], steps, 18)
        err = (merged[name].double() - expected).norm() / expected.norm()
        assert err < 1e-5

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


def test_small_shard_size_writes_index_and_shards(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out), "--shard-size", "30KB", "--max-memory", "4KB")
    assert result.exit_code == 0, result.output
    assert "2: Gram, then outputs" in result.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    state = {}
    for shard in shards:
        part = load_file(shard)
        assert all(index["weight_map"][k] == shard.name for k in part)
        state.update(part)
    assert set(state) == set(index["weight_map"]) == set(load_state(qwen_run / "base"))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    generate(out)


def test_chunked_cli_output_equals_unchunked(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 4], [10, 20])
    assert run_cli(str(cfg), str(tmp_path / "a"), "-q").exit_code == 0
    assert run_cli(str(cfg), str(tmp_path / "b"), "-q", "--max-memory", "2KB").exit_code == 0
    for t in (10, 20):
        a, b = load_state(tmp_path / "a" / f"step-{t}"), load_state(tmp_path / "b" / f"step-{t}")
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name


def test_thread_count_leaves_the_output_byte_identical(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 4], [10, 20])
    one = run_cli(str(cfg), str(tmp_path / "one"), "--threads", "1", "--profile")
    assert one.exit_code == 0, one.output
    assert "1 worker busy" in " ".join(one.stdout.split())
    assert run_cli(str(cfg), str(tmp_path / "four"), "-q", "--threads", "4").exit_code == 0
    for t in (10, 20):
        a = (tmp_path / "one" / f"step-{t}" / "model.safetensors").read_bytes()
        assert a == (tmp_path / "four" / f"step-{t}" / "model.safetensors").read_bytes()


def test_tied_llama_stays_tied(llama_tied_run, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = write_config(tmp_path / "c.yml", llama_tied_run, [1, 2, 3, 4, 5], 15)
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_state(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    generate(out)


def test_shipped_configs_run(tmp_path):
    from relex_merge.synthetic import make_planted_run

    make_planted_run(tmp_path / "runs" / "synthetic", steps=range(1, 9))
    for name in ("synthetic-explicit.yml", "synthetic-trajectory.yml"):
        out = tmp_path / f"out-{name}"
        result = run_cli(str(REPO / "merge_configs" / name), str(out), "-q", cwd=tmp_path)
        assert result.exit_code == 0, result.output
        folders = [out] if (out / "config.json").exists() else sorted(out.iterdir())
        for folder in folders:
            generate(folder)


def test_trajectory_discovery_and_print_config(tmp_path):
    from relex_merge.synthetic import make_planted_run

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
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_output_parents_are_made_and_removed_on_failure(qwen_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3], 9)
    nested = tmp_path / "a" / "b" / "out"
    assert run_cli(str(cfg), str(nested), "-q").exit_code == 0
    assert (nested / "model.safetensors").is_file()
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
    bad = subprocess.run([str(exe), str(tmp_path / "missing.yml"), str(tmp_path / "o2")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.yml'}: config file not found"]
    assert "Traceback" not in bad.stderr

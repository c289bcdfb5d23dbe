"""Files the real training libraries wrote (tests/fixtures/real_writers, made by its
make_real_checkpoints.py with DeepSpeed, transformers' Trainer, torchtitan, accelerate and verl;
none of them is needed here), read as a user would: for every writer in manifest.json,

- ``convert`` of each save equals the ``save_pretrained`` reference taken at that moment, bit for
  bit (fp32; the bf16 DeepSpeed runs' ``--dtype bfloat16`` equals the trainer's own bf16 weights);
- a merge of the saves listed under ``models:``, and one found by ``trajectory:``, equal the same
  merge of the references, bit for bit;
- ``analyze`` of the saves gives the references' analysis.

The DeepSpeed references are what DeepSpeed's own ``zero_to_fp32`` consolidates (the generator
checked it and manifest.json records it), or, for the BF16 optimizer that zero_to_fp32 cannot
read, DeepSpeed's ``safe_get_full_fp32_param`` on the live engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import load_state, run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "real_writers"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
WRITERS = sorted(name for name in MANIFEST if not name.startswith("_"))
BASE = FIXTURES / MANIFEST["_about"]["base"]
STEPS = MANIFEST["_about"]["saves"]
TARGET = 10


def _saves(writer: str) -> dict[int, Path]:
    return {int(step): FIXTURES / writer / folder for step, folder in MANIFEST[writer]["checkpoints"].items()}


def _references(writer: str, key: str = "references") -> dict[int, Path]:
    return {int(step): FIXTURES / writer / folder for step, folder in MANIFEST[writer][key].items()}


def _has_config(writer: str) -> bool:
    """Whether the writer saved the model's config.json where relex-merge looks: beside the
    weights, in verl's huggingface/, or (HF Trainer + DeepSpeed) above the ZeRO tag folder."""
    save = _saves(writer)[STEPS[0]]
    return any((folder / "config.json").is_file() for folder in (save, save / "huggingface", save.parent))


def _config(path: Path, models: dict[int, Path] | None = None, run_dir: Path | None = None) -> Path:
    config = {"merge_method": "relex", "base_model": str(BASE), "parameters": {"target_step": TARGET, "fit": "linear"}}
    if run_dir is not None:
        config["trajectory"] = {"run_dir": str(run_dir)}
    else:
        config["models"] = [{"model": str(m), "parameters": {"step": s}} for s, m in models.items()]
    path.write_text(yaml.safe_dump(config))
    return path


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def reference_merges(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Per writer, the merge of its save_pretrained references (made on first use)."""
    made: dict[str, dict[str, torch.Tensor]] = {}
    root = tmp_path_factory.mktemp("reference-merges")

    def get(writer: str) -> dict[str, torch.Tensor]:
        if writer not in made:
            cfg = _config(root / f"{writer}.yml", _references(writer))
            result = run_cli(str(cfg), str(root / writer), "-q")
            assert result.exit_code == 0, result.output
            made[writer] = load_state(root / writer)
        return made[writer]

    return get


def test_the_manifest_records_who_wrote_each_fixture():
    """Each writer's library and its version, and what `trajectory:` is pointed at."""
    library = {
        "deepspeed": "deepspeed",
        "hf_trainer": "transformers",
        "torchtitan": "torchtitan",
        "accelerate": "accelerate",
        "verl": "verl",
        "dcp": "torch",
    }
    for writer in WRITERS:
        info = MANIFEST[writer]
        name = next(lib for prefix, lib in library.items() if writer.startswith(prefix))
        assert info["libraries"].get(name) and info["libraries"].get("torch"), writer
        assert "trajectory" in info, writer
        assert sorted(int(s) for s in info["checkpoints"]) == STEPS
        for folder in [*_saves(writer).values(), *_references(writer).values()]:
            assert folder.is_dir(), folder
        if info["zero_stage"] is not None:
            assert "reference_vs_zero_to_fp32" in info, writer


@pytest.mark.parametrize("writer", WRITERS)
def test_convert_equals_the_reference(writer, tmp_path):
    config_from = [] if _has_config(writer) else ["--config-from", str(BASE)]
    if config_from:  # the user is told where the config is missing, and how to give it
        save = _saves(writer)[STEPS[0]]
        refused = run_cli("convert", str(save), str(tmp_path / "refused"))
        assert refused.exit_code == 2
        assert "no config.json here" in refused.stderr and "--config-from" in refused.stderr
        assert not (tmp_path / "refused").exists()
    for step, save in _saves(writer).items():
        out = tmp_path / f"step_{step}"
        result = run_cli("convert", str(save), str(out), "-q", *config_from)
        assert result.exit_code == 0, result.output
        _assert_identical(load_state(out), load_state(_references(writer)[step]))
        assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize("writer", [w for w in WRITERS if "references_bf16" in MANIFEST[w]])
def test_convert_to_the_trainers_dtype_equals_its_own_weights(writer, tmp_path):
    """A bf16 DeepSpeed run: the files hold fp32 master weights (what convert writes by default);
    --dtype bfloat16 gives the weights the trainer itself ran with, bit for bit."""
    for step, save in _saves(writer).items():
        out = tmp_path / f"step_{step}"
        result = run_cli("convert", str(save), str(out), "-q", "--config-from", str(BASE), "--dtype", "bfloat16")
        assert result.exit_code == 0, result.output
        _assert_identical(load_state(out), load_state(_references(writer, "references_bf16")[step]))


@pytest.mark.parametrize("writer", WRITERS)
def test_a_merge_of_the_saves_equals_the_merge_of_the_references(writer, tmp_path, reference_merges):
    cfg = _config(tmp_path / "saves.yml", _saves(writer))
    result = run_cli(str(cfg), str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    _assert_identical(load_state(tmp_path / "out"), reference_merges(writer))


@pytest.mark.parametrize("writer", WRITERS)
def test_a_trajectory_merge_equals_the_merge_of_the_references(writer, tmp_path, reference_merges):
    run_dir = MANIFEST[writer]["trajectory"]
    if run_dir is None:  # accelerate's automatic naming: folders count saves, not steps
        counted = FIXTURES / writer / "run"
        cfg = _config(tmp_path / "t.yml", run_dir=counted)
        refused = run_cli(str(cfg), str(tmp_path / "out"))
        assert refused.exit_code == 2
        assert refused.stderr.strip() == (
            f"error: {cfg}: trajectory.run_dir: {counted / 'checkpoints'} holds accelerate's checkpoint_0, "
            "checkpoint_1, checkpoint_2 folders, numbered by save, not by optimizer step; list them under models: "
            "with the step each was saved at"
        )
        assert not (tmp_path / "out").exists()
        return
    cfg = _config(tmp_path / "t.yml", run_dir=FIXTURES / writer / run_dir)
    printed = run_cli(str(cfg), "--print-config")
    assert printed.exit_code == 0, printed.output
    found = {m["parameters"]["step"]: Path(m["model"]) for m in yaml.safe_load(printed.stdout)["models"]}
    assert found == _saves(writer)  # the folders the manifest says the library wrote each step into
    result = run_cli(str(cfg), str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    _assert_identical(load_state(tmp_path / "out"), reference_merges(writer))


@pytest.mark.slow  # a few seconds a writer
@pytest.mark.parametrize("writer", WRITERS)
def test_analyze_of_the_saves_equals_analyze_of_the_references(writer, tmp_path):
    analyses = []
    for name, models in (("saves", _saves(writer)), ("references", _references(writer))):
        result = run_cli("analyze", str(_config(tmp_path / f"{name}.yml", models)), "--json")
        assert result.exit_code == 0, result.output
        analyses.append(json.loads(result.stdout))
    assert analyses[0] == analyses[1]


def test_the_formats_table_in_the_docs_is_the_manifests():
    """docs/formats.md's table (trainer -> layout -> trajectory: -> tested version) is generated
    from manifest.json by scripts/formats_table.py, and the page holds the current one."""
    import importlib.util

    repo = FIXTURES.parents[2]
    spec = importlib.util.spec_from_file_location("formats_table", repo / "scripts" / "formats_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    table = script.table()
    assert script.TABLE.read_text() == table, "run python scripts/formats_table.py --write"
    page = (repo / "docs" / "formats.md").read_text()
    assert f"<!-- include: tests/fixtures/real_writers/formats_table.md -->\n{table}<!-- end include -->" in page
    for writer in WRITERS:
        assert f"(`{writer}`)" in table


@pytest.mark.parametrize("writer", ["verl_fsdp2_ws2", "accelerate_fsdp2_sharded"])
def test_convert_takes_a_trainers_step_folder(writer, tmp_path):
    """A new user points convert at the step folder (verl's global_step_N, accelerate's step_N), as
    trajectory: does; the weights are found inside it (actor/, pytorch_model_fsdp_0/)."""
    step = sorted(p for p in (FIXTURES / writer / "run").iterdir() if p.is_dir())[-1]
    out = tmp_path / "out"
    result = run_cli("convert", str(step), str(out), "--config-from", str(FIXTURES / "base"), "-q")
    assert result.exit_code == 0, result.output
    number = int(step.name.rsplit("_", 1)[-1])
    _assert_identical(load_state(out), load_state(_references(writer)[number]))

"""relex as a mergekit merge method, mergekit methods through relex-merge, multi-stage configs."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from relex_merge.core import fits
from relex_merge.interop.mergekit_method import RELEX_METHOD, register
from relex_merge.testing.synthetic import make_finetune
from tests.helpers import (
    assert_state_matches,
    dense_task_arithmetic,
    dense_ties,
    generate,
    load_state,
    relex_expectation,
    run_cli,
)

REPO = Path(__file__).resolve().parents[2]


def relex_doc(run: Path, steps, target, **params) -> dict:
    return {
        "merge_method": "relex",
        "base_model": str(run / "base"),
        "models": [{"model": str(run / f"checkpoint-{s}"), "parameters": {"step": s}} for s in steps],
        "parameters": {"target_step": target, **params},
        "dtype": "float32",
    }


def test_register_is_explicit_and_idempotent():
    from mergekit.merge_methods import registry

    assert register() is RELEX_METHOD
    assert register() is RELEX_METHOD
    assert [m for m in registry.registered_methods() if m.spec.name == "relex"] == [RELEX_METHOD]
    names = [p.name for p in RELEX_METHOD.spec.parameters]
    # the shape keys come from the fit families' declarations, after the fixed parameters
    assert names == [
        "step",
        "target_step",
        "rank",
        "fit",
        "window",
        "scale",
        "mode",
        "refit_every",
        "refit_window",
        "base_step",
        *sorted(fits.shape_keys()),  # alpha, degree, halflife, last, p, tau
    ]


MERGEKIT_CASES = {
    # run, steps, target, parameters. A second direction here is noise, found from a float32
    # Gram matrix: rank 2 is compared more loosely with the float64 reference.
    "1-5": ("qwen_run", [1, 2, 3, 4, 5], 15, {}),
    "1-5-rank-2-window": ("qwen_run", [1, 2, 3, 4, 5], 15, {"rank": 2, "window": 4}),
    "1-5-origin-scale": ("qwen_run", [1, 2, 3, 4, 5], 15, {"fit": "linear_origin", "scale": 0.7}),
    "uneven": ("uneven_run", [2, 3, 5, 8], 20, {}),
    "late-start-origin": ("uneven_run", [10, 11, 12, 13], 30, {"fit": "linear_origin"}),
    "gaps-window-polynomial": ("uneven_run", [2, 3, 10, 11, 13], 26, {"window": 4, "fit": "polynomial", "degree": 2}),
}


@pytest.mark.parametrize("case", list(MERGEKIT_CASES))
def test_mergekit_method_equals_dense_reference_and_streaming_engine(case, tmp_path, request):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    register()
    fixture, steps, target, params = MERGEKIT_CASES[case]
    run = request.getfixturevalue(fixture)
    ours = tmp_path / "c.yml"
    ours.write_text(yaml.safe_dump(relex_doc(run, steps, target, **params)))
    assert run_cli(str(ours), str(tmp_path / "ours"), "-q").exit_code == 0

    shuffled = relex_doc(run, steps, target, **params)
    random.Random(0).shuffle(shuffled["models"])  # mergekit must order by step, not position
    assert [m["parameters"]["step"] for m in shuffled["models"]] != steps
    config = MergeConfiguration.model_validate(shuffled)
    run_merge(config, str(tmp_path / "mk"), options=MergeOptions(write_model_card=False, quiet=True))

    # the independent expectation: the dense SVD reference on the saved checkpoints
    base = load_state(run / "base")
    expected = relex_expectation(base, [load_state(run / f"checkpoint-{s}") for s in steps], steps, target, **params)
    a, b = load_state(tmp_path / "ours"), load_state(tmp_path / "mk")
    assert_state_matches(b, expected, base, rel=2e-3 if params.get("rank") else 1e-5)
    # and the two ways in agree with each other
    assert set(a) == set(b)
    for name in a:
        err = (a[name].double() - b[name].double()).norm() / b[name].double().norm()
        assert err < 1e-5, name


def test_plain_mergekit_method_through_relex_merge(qwen_run, tmp_path):
    cfg = tmp_path / "lin.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(qwen_run / "checkpoint-1"), "parameters": {"weight": 1.0}},
                    {"model": str(qwen_run / "checkpoint-3"), "parameters": {"weight": 1.0}},
                ],
                "dtype": "float32",
            }
        )
    )
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out), "-q")
    assert result.exit_code == 0, result.output
    merged = load_state(out)
    a, b = load_state(qwen_run / "checkpoint-1"), load_state(qwen_run / "checkpoint-3")
    assert sorted(merged) == sorted(a)
    for name in a:  # linear: the weighted mean, normalized by the summed weights
        assert torch.allclose(merged[name], (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-7), name
    assert (out / "mergekit_config.yml").is_file() and "- mergekit" in (out / "README.md").read_text()


def two_stage(qwen_run: Path, tmp_path: Path, method: str) -> Path:
    domain = make_finetune(qwen_run / "base", tmp_path / "domain")
    stage2 = {
        "merge_method": method,
        "base_model": str(qwen_run / "base"),
        "models": [
            {"model": "rl", "parameters": {"weight": 1.0, **({"density": 0.8} if method == "ties" else {})}},
            {"model": str(domain), "parameters": {"weight": 0.5, **({"density": 0.8} if method == "ties" else {})}},
        ],
        "dtype": "float32",
    }
    cfg = tmp_path / "multi.yml"
    cfg.write_text(yaml.safe_dump_all([{"name": "rl", **relex_doc(qwen_run, [1, 2, 3, 4], 12)}, stage2]))
    return cfg


def second_stage_expectation(
    method: str, base: dict, stage1: dict, other: dict, weights, density=None, **params
) -> dict:
    """Stage 2's arithmetic, densely, on stage 1's expected tensors (as stage 1 writes them: float32)."""
    expected = {}
    for name, b in base.items():
        models = [stage1[name].float(), other[name]]
        if method == "ties":
            expected[name] = dense_ties(b, models, weights, [density] * 2, **params)
        else:
            expected[name] = dense_task_arithmetic(b, models, weights, **params)
    return expected


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_two_stage_merge_end_to_end(qwen_run, tmp_path, method):
    cfg = two_stage(qwen_run, tmp_path, method)
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out), "-q")
    assert result.exit_code == 0, result.output
    generate(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # intermediates removed
    # stage 1 by the dense reference, stage 2 by its own arithmetic on that
    steps = [1, 2, 3, 4]
    base = load_state(qwen_run / "base")
    rl = relex_expectation(base, [load_state(qwen_run / f"checkpoint-{s}") for s in steps], steps, 12)
    domain = load_state(tmp_path / "domain")
    expected = second_stage_expectation(method, base, rl, domain, [1.0, 0.5], 0.8)
    assert_state_matches(load_state(out), expected, base)
    if method == "ties":  # the trim and the sign election did something here
        name = "model.layers.1.mlp.up_proj.weight"
        plain = dense_task_arithmetic(base[name], [rl[name], domain[name]], [1.0, 0.5])
        assert (plain - expected[name]).norm() > 0.1 * (expected[name] - base[name].double()).norm()


def test_lazy_reuses_a_finished_stage(qwen_run, tmp_path):
    cfg = two_stage(qwen_run, tmp_path, "task_arithmetic")
    inter = tmp_path / "stages"
    first = run_cli(str(cfg), str(tmp_path / "out1"), "--intermediate-dir", str(inter))
    assert first.exit_code == 0, first.output
    stage_file = inter / "rl" / "model.safetensors"
    stamp = stage_file.stat().st_mtime_ns
    second = run_cli(str(cfg), str(tmp_path / "out2"), "--intermediate-dir", str(inter), "--lazy")
    assert second.exit_code == 0, second.output
    assert f"stage 'rl': reusing {inter / 'rl'}" in second.stderr
    assert stage_file.stat().st_mtime_ns == stamp
    out1, out2 = load_state(tmp_path / "out1"), load_state(tmp_path / "out2")
    assert sorted(out1) == sorted(out2) and all(torch.equal(out1[k], out2[k]) for k in out1)
    base = load_state(qwen_run / "base")
    rl = relex_expectation(base, [load_state(qwen_run / f"checkpoint-{s}") for s in (1, 2, 3, 4)], [1, 2, 3, 4], 12)
    expected = second_stage_expectation("task_arithmetic", base, rl, load_state(tmp_path / "domain"), [1.0, 0.5])
    assert_state_matches(out2, expected, base)
    # without --lazy the stage is rebuilt
    third = run_cli(str(cfg), str(tmp_path / "out3"), "--intermediate-dir", str(inter), "-q")
    assert third.exit_code == 0 and stage_file.stat().st_mtime_ns != stamp
    # a changed stage config is not reused (it was, issue 23): the stage is rebuilt for the new target
    documents = list(yaml.safe_load_all(cfg.read_text()))
    documents[0]["parameters"]["target_step"] = 20
    cfg.write_text(yaml.safe_dump_all(documents))
    stamp = stage_file.stat().st_mtime_ns
    fourth = run_cli(str(cfg), str(tmp_path / "out4"), "--intermediate-dir", str(inter), "--lazy")
    assert fourth.exit_code == 0, fourth.output
    assert "reusing" not in fourth.stderr and "rebuilding it" in fourth.stderr
    assert stage_file.stat().st_mtime_ns != stamp
    rl20 = relex_expectation(base, [load_state(qwen_run / f"checkpoint-{s}") for s in (1, 2, 3, 4)], [1, 2, 3, 4], 20)
    assert_state_matches(load_state(inter / "rl"), rl20, base)
    # and a changed input is not reused either
    stamp = stage_file.stat().st_mtime_ns
    state = load_state(qwen_run / "checkpoint-4")
    fifth_run = tmp_path / "changed-run"
    shutil.copytree(qwen_run, fifth_run)
    state["model.norm.weight"][0] += 1.0
    save_file(state, fifth_run / "checkpoint-4" / "model.safetensors")
    documents[0] = yaml.safe_load(yaml.safe_dump(documents[0]).replace(str(qwen_run), str(fifth_run)))
    cfg.write_text(yaml.safe_dump_all(documents))
    sixth = run_cli(str(cfg), str(tmp_path / "out5"), "--intermediate-dir", str(inter), "--lazy")
    assert sixth.exit_code == 0 and "rebuilding it" in sixth.stderr and stage_file.stat().st_mtime_ns != stamp


def test_shipped_multistage_configs_run(tmp_path):
    from relex_merge.testing.synthetic import main as make_synthetic

    run = tmp_path / "runs" / "synthetic"
    make_synthetic([str(run)])
    base = load_state(run / "base")
    checkpoints = [load_state(run / f"checkpoint-{s}") for s in range(1, 9)]
    domain = load_state(run / "domain-finetune")
    # what each shipped config says: stage 1 (relex over steps 1-8), then stage 2 with the domain fine-tune
    expected = {
        "relex-then-ties.yml": second_stage_expectation(
            "ties",
            base,
            relex_expectation(base, checkpoints, range(1, 9), 16),
            domain,
            [1.0, 0.5],
            0.8,
            normalize=True,
        ),
        "reconstruct-then-task-arithmetic.yml": second_stage_expectation(
            "task_arithmetic",
            base,
            relex_expectation(base, checkpoints, range(1, 9), 8, mode="reconstruct"),
            domain,
            [1.0, 0.5],
        ),
    }
    for name, want in expected.items():
        out = tmp_path / f"out-{name}"
        result = run_cli(str(REPO / "merge_configs" / name), str(out), cwd=tmp_path)
        assert result.exit_code == 0, result.output
        assert_state_matches(load_state(out), want, base)
        generate(out)
        # an example does not contradict itself: its relex stage's own verdict supports it
        verdicts = [line for line in result.stderr.splitlines() if line.startswith("verdict: ")]
        if name == "relex-then-ties.yml":
            assert len(verdicts) == 1 and verdicts[0].startswith("verdict: SUPPORTED: step 16 is 1.1x"), verdicts


def _write(tmp_path, docs) -> Path:
    cfg = tmp_path / "bad.yml"
    cfg.write_text(yaml.safe_dump_all(docs))
    return cfg


@pytest.mark.parametrize(
    "case,expected",
    [
        ("unknown method", "{cfg}: document 2: merge_method: unknown method 'frankenmerge' (known: "),
        ("unknown stage", "{cfg}: document 2: 'rl-typo' is neither a stage name nor an existing path"),
        ("cycle", "{cfg}: stages form a cycle: "),
        (
            "two finals",
            "{cfg}: a multi-document config needs exactly one document without 'name:' (the final output); found 2",
        ),
        ("duplicate name", "{cfg}: document 2: name: stage 'rl' is defined twice"),
    ],
)
def test_multistage_errors(case, expected, qwen_run, tmp_path):
    rl = {"name": "rl", **relex_doc(qwen_run, [1, 2, 3], 9)}
    final = {
        "merge_method": "task_arithmetic",
        "base_model": str(qwen_run / "base"),
        "models": [{"model": "rl", "parameters": {"weight": 1.0}}],
    }
    docs = {
        "unknown method": [rl, {**final, "merge_method": "frankenmerge"}],
        "unknown stage": [rl, {**final, "models": [{"model": "rl-typo", "parameters": {"weight": 1.0}}]}],
        "cycle": [
            {**rl, "base_model": "b"},
            {**final, "name": "b", "base_model": "rl"},
            {**final, "models": [{"model": "b", "parameters": {"weight": 1.0}}]},
        ],
        "two finals": [rl, final, final],
        "duplicate name": [rl, {**rl}, final],
    }[case]
    cfg = _write(tmp_path, docs)
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + expected.format(cfg=cfg)), lines
    if case == "cycle":
        assert lines[0].endswith(": stages form a cycle: rl -> b -> rl")  # found from the first document
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_multistage_output_keeps_its_provenance(tmp_path):
    """The final card and config name the stages (not their deleted temporary folders), record
    the relex stage's window, target, scale, fit and verdict, and every file is readable by others."""
    import os
    import stat

    from relex_merge.testing.synthetic import main as make_synthetic

    make_synthetic([str(tmp_path / "runs" / "synthetic")])
    config = REPO / "merge_configs" / "relex-then-ties.yml"
    out = tmp_path / "out"
    result = run_cli(str(config), str(out), "-q", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob(".out.relex-stages*"))  # the intermediate folder is gone ...
    card = (out / "README.md").read_text()
    written = (out / "mergekit_config.yml").read_text()
    assert ".relex-stages" not in card and ".relex-stages" not in written  # ... and nothing points into it
    assert "- model: rl-extrapolated" in written
    assert written.startswith(f"# stage 2 of a multi-stage merge ({config})")
    assert (out / "relex_stages.yml").read_text() == config.read_text()
    assert "## Stages" in card
    line = next(x for x in card.splitlines() if x.startswith("- stage 'rl-extrapolated' (relex)"))
    assert "window steps 1..8 (8 checkpoints)" in line and "target step 16, scale 1, fit linear" in line
    assert "; SUPPORTED: step 16" in line and "NOT SUPPORTED" not in line  # the verdict of the relex stage
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_python_callers_run_multistage_configs_without_click(tmp_path, monkeypatch):
    from relex_merge import Options, run_merge
    from relex_merge.testing.synthetic import main as make_synthetic

    make_synthetic([str(tmp_path / "runs" / "synthetic")])
    monkeypatch.chdir(tmp_path)
    result = run_merge(
        REPO / "merge_configs" / "reconstruct-then-task-arithmetic.yml",
        tmp_path / "out",
        Options(threads=1, intermediate_dir=tmp_path / "stages"),
    )
    assert [s.name for s in result.stages] == ["rl-denoised", None]
    assert result.stages[0].merge is not None and result.stages[0].out == tmp_path / "stages" / "rl-denoised"
    assert result.final.method == "task_arithmetic" and result.final.out == tmp_path / "out"
    base = load_state(tmp_path / "runs" / "synthetic" / "base")
    assert set(load_state(tmp_path / "out")) == set(base)


_FINAL_TA = {
    "merge_method": "task_arithmetic",
    "models": [{"model": "rl", "parameters": {"weight": 1.0}}],
}
_LATER_STAGE_MISTAKES = {
    "relex key": ({"parameters": {"rnk": 2}}, "document 2: unknown key 'parameters.rnk' (did you mean 'rank'?)"),
    "mergekit value": ({"dtype": ["float32"]}, "document 2: dtype: Input should be a valid string"),
    # mergekit's own models ignore these: they used to merge at the defaults without a word
    "mergekit key": (
        {"paramters": {"lambda": 1.0}},
        "document 2: unknown key 'paramters' (did you mean 'parameters'?)",
    ),
    "mergekit parameter": (
        {"models": [{"model": "rl", "parameters": {"weight": 1.0, "densty": 0.5}}]},
        "document 2: models.0.parameters.densty: not a parameter of task_arithmetic (did you mean 'density'?)",
    ),
    "mergekit model key": (
        {"models": [{"model": "rl", "paramters": {"weight": 1.0}}]},
        "document 2: unknown key 'models.0.paramters' (did you mean 'parameters'?)",
    ),
    "shared parameter per model": (
        {"models": [{"model": "rl", "parameters": {"weight": 1.0, "normalize": True}}]},
        "document 2: models.0.parameters.normalize: task_arithmetic reads 'normalize' once for every input; "
        "put it in the top-level parameters",
    ),
    "top-level parameter": (
        {"parameters": {"lamda": 1.0}},
        "document 2: parameters.lamda: not a parameter of task_arithmetic (did you mean 'lambda'?)",
    ),
    # found in document 1 while planning it, after the checks of every document had passed
    "two targets in a stage": (
        None,
        "document 1 (stage 'rl'): parameters.target_step: a stage used by later stages needs exactly one",
    ),
}


@pytest.mark.parametrize("case", list(_LATER_STAGE_MISTAKES))
def test_every_stage_is_checked_before_any_stage_runs(case, qwen_run, tmp_path, monkeypatch):
    """Later documents used to be parsed only after the earlier stages had merged; mergekit
    stages' misspelt keys and parameters were ignored."""
    from relex_merge.workflows import merge

    ran = []
    monkeypatch.setattr(merge, "execute_merge", lambda *args, **kwargs: ran.append(args))
    rl = {"name": "rl", **relex_doc(qwen_run, [1, 2, 3], 9)}
    change, expected = _LATER_STAGE_MISTAKES[case]
    if case == "relex key":
        final = {**relex_doc(qwen_run, [1, 2, 3], 9), "base_model": "rl"}
        final["parameters"] = {**final["parameters"], **change["parameters"]}
    elif change is None:
        rl["parameters"] = {**rl["parameters"], "target_step": [9, 12]}
        final = {**_FINAL_TA, "base_model": str(qwen_run / "base")}
    else:
        final = {**_FINAL_TA, "base_model": str(qwen_run / "base"), **change}
    cfg = _write(tmp_path, [rl, final])
    out = tmp_path / "out"
    result = run_cli(str(cfg), str(out))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cfg}: {expected}"), lines
    assert ran == [] and "stage 'rl' (relex)" not in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_plain_mergekit_config_gives_mergekit_yamls_bytes(qwen_run, tmp_path):
    """README's one line for mergekit users: `relex-merge CONFIG OUT` in place of `mergekit-yaml
    CONFIG OUT`. A config with no relex stage writes the same weights, model config, generation
    config and tokenizer as mergekit-yaml itself; only the card and the config echo are relex-merge's
    own (mergekit's card asks the Hub about local paths)."""
    import subprocess
    import sys

    domain = make_finetune(qwen_run / "base", tmp_path / "domain", seed=11)
    config = {
        "merge_method": "ties",
        "base_model": str(qwen_run / "base"),
        "models": [
            {"model": str(qwen_run / "checkpoint-6"), "parameters": {"weight": 1.0, "density": 0.8}},
            {"model": str(domain), "parameters": {"weight": 0.5, "density": 0.8}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    cfg = tmp_path / "ties.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    done = subprocess.run([str(mergekit_yaml), str(cfg), str(tmp_path / "mk")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = run_cli(str(cfg), str(tmp_path / "rx"), "-q")
    assert result.exit_code == 0, result.output
    theirs = {p.name for p in (tmp_path / "mk").iterdir()}
    ours = {p.name for p in (tmp_path / "rx").iterdir()}
    assert theirs == ours and "model.safetensors" in ours
    for name in sorted(theirs - {"README.md", "mergekit_config.yml"}):
        assert (tmp_path / "rx" / name).read_bytes() == (tmp_path / "mk" / name).read_bytes(), name
    echoed = [yaml.safe_load((tmp_path / d / "mergekit_config.yml").read_text()) for d in ("mk", "rx")]
    assert echoed[0] == echoed[1] == config


def test_a_stage_fingerprint_follows_the_files_that_choose_the_weights(tmp_path):
    """DeepSpeed's `latest` names the tag a checkpoint folder is read from; re-pointing it left
    --lazy reusing a stage made from the other tag."""
    from relex_merge.workflows.merge import stage_fingerprint

    folder = tmp_path / "checkpoint-8"
    (folder / "global_step8").mkdir(parents=True)
    (folder / "global_step8" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 64)
    (folder / "latest").write_text("global_step8")
    document = {"merge_method": "relex", "base_model": str(folder)}
    before = stage_fingerprint(document, "")
    assert stage_fingerprint(document, "") == before
    (folder / "latest").write_text("global_step9")
    assert stage_fingerprint(document, "") != before


def test_a_final_relex_stage_names_its_input_stage_not_the_deleted_folder(tmp_path):
    """The final relex stage's card (front matter, inputs table) named `.out.relex-stages/...`."""
    from relex_merge.testing.synthetic import main as make_synthetic

    make_synthetic([str(tmp_path / "runs" / "synthetic")])
    denoise = {
        "name": "denoised",
        "merge_method": "relex",
        "base_model": "runs/synthetic/base",
        "trajectory": {"run_dir": "runs/synthetic", "steps": "1-8"},
        "parameters": {"mode": "reconstruct", "target_step": 8},
    }
    final = {
        "merge_method": "relex",
        "base_model": "denoised",
        "models": [{"model": f"runs/synthetic/checkpoint-{s}", "parameters": {"step": s + 2}} for s in (7, 8)],
        "parameters": {"target_step": 12, "base_step": 8},
    }
    cfg = tmp_path / "two.yml"
    cfg.write_text(yaml.safe_dump_all([denoise, final]))
    result = run_cli(str(cfg), "out", "-q", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert ".relex-stages" not in card
    assert "base_model: denoised\n" in card and "| `denoised` | 8 (base) |" in card


@pytest.mark.parametrize("mistake", ["shape", "no config", "stage typo", "method key typo", "analyze"])
def test_a_mergekit_stages_inputs_are_checked_before_any_stage_runs(mistake, tmp_path, monkeypatch):
    """mergekit found these while merging, after the relex stage had run: a model of another shape
    ("Tensor size mismatch ... Align vocabulary axes", naming no model), a base without config.json
    ("Unrecognized model"); and two typos had no did-you-mean."""
    import shutil

    from relex_merge.testing.synthetic import main as make_synthetic
    from relex_merge.workflows import merge

    ran = []
    monkeypatch.setattr(merge, "execute_merge", lambda *args, **kwargs: ran.append(args))
    make_synthetic([str(tmp_path / "runs" / "synthetic")])
    run = tmp_path / "runs" / "synthetic"
    docs = list(yaml.safe_load_all((REPO / "merge_configs" / "relex-then-ties.yml").read_text()))
    if mistake == "shape":  # another model's weights where the domain fine-tune should be
        shutil.copy2(
            REPO / "demo" / "run" / "base" / "model.safetensors", run / "domain-finetune" / "model.safetensors"
        )
        expected = "document 2: runs/synthetic/domain-finetune: tensor model.embed_tokens.weight has shape [83, 64], "
        expected += "runs/synthetic/base has [83, 32]: mergekit merges tensors of one shape"
    elif mistake == "no config":
        (run / "domain-finetune" / "config.json").unlink()
        expected = "document 2: runs/synthetic/domain-finetune has no config.json, which mergekit reads for every model"
    elif mistake == "stage typo":
        docs[1]["models"][0]["model"] = "rl-extrapolatd"
        expected = (
            "document 2: 'rl-extrapolatd' is neither a stage name nor an existing path "
            "(did you mean stage 'rl-extrapolated'?)"
        )
    elif mistake == "method key typo":
        docs[1]["merge_methd"] = docs[1].pop("merge_method")
        expected = "document 2: merge_method: required (relex or a mergekit method); is 'merge_methd' a misspelling"
    else:
        expected = "expected one YAML document, found 2; this command takes one relex config: put document 1"
    cfg = tmp_path / "two.yml"
    cfg.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    args = ["analyze", "two.yml"] if mistake == "analyze" else ["two.yml", "out"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: two.yml: {expected}"), lines
    assert ran == [] and not (tmp_path / "out").exists()

"""Native trainer checkpoints: verl FSDP shards, DCP, .bin; `relex-merge convert`."""

from __future__ import annotations

import fractions
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from relex_merge.core import kernels
from relex_merge.io.formats import open_checkpoint
from tests.helpers import assert_relex_output, assert_state_matches, generate, load_state, relex_expectation, run_cli

REPO = Path(__file__).resolve().parents[2]
STEPS = [1, 2, 3, 4]


@pytest.fixture(scope="session")
def shards(qwen_run, tmp_path_factory):
    """Real FSDP2 / DCP / (ddp, fsdp) saves of qwen_run's checkpoints, made by torch.distributed."""
    out = tmp_path_factory.mktemp("shards")
    subprocess.run(
        [sys.executable, "-m", "tests.make_shards", str(qwen_run), str(out), *map(str, STEPS)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return out


def assert_same_as(reader, reference: dict[str, torch.Tensor]) -> None:
    assert sorted(reader.names()) == sorted(reference)
    for name, tensor in reference.items():
        assert reader.meta(name).shape == tuple(tensor.shape)
        assert torch.equal(reader.read(name), tensor), name
        if tensor.dim() and tensor.shape[0] > 3:
            lo, hi = 1, tensor.shape[0] - 1  # a row range crossing the rank boundary
            assert torch.equal(reader.read(name, (lo, hi)), tensor[lo:hi]), name


@pytest.mark.parametrize("layout", ["fsdp2", "ddp-fsdp", "dcp"])
def test_distributed_saves_read_back_unsharded(layout, shards, qwen_run):
    folder = {
        "fsdp2": shards / "global_step_2" / "actor",
        "ddp-fsdp": shards / "ddp-1",
        "dcp": shards / "dcp-1",
    }[layout]
    step = 2 if layout == "fsdp2" else 1
    reader = open_checkpoint(folder)
    assert (
        type(reader).__name__ == {"fsdp2": "FsdpShardReader", "ddp-fsdp": "FsdpShardReader", "dcp": "DcpReader"}[layout]
    )
    assert_same_as(reader, load_state(qwen_run / f"checkpoint-{step}"))


def test_single_gpu_plain_tensors_and_missing_fsdp_config(qwen_run, tmp_path):
    state = load_state(qwen_run / "checkpoint-3")
    torch.save(state, tmp_path / "model_world_size_1_rank_0.pt")
    reader = open_checkpoint(tmp_path)
    assert_same_as(reader, state)
    assert reader.warnings == [f"{tmp_path}: no fsdp_config.json; world size 1 inferred from the rank file names"]


def test_bin_checkpoints(qwen_run, tmp_path):
    state = load_state(qwen_run / "checkpoint-2")
    single = tmp_path / "single"
    single.mkdir()
    torch.save(state, single / "pytorch_model.bin")
    assert_same_as(open_checkpoint(single), state)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, sharded / file)
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_as(open_checkpoint(sharded), state)


def _merge_config(path: Path, base: Path, models: list[tuple[Path, int]]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "relex",
                "base_model": str(base),
                "models": [{"model": str(m), "parameters": {"step": s}} for m, s in models],
                "parameters": {"target_step": 12, "rank": 2},
            }
        )
    )
    return path


def test_relex_over_verl_shards_equals_relex_over_hf(shards, qwen_run, tmp_path):
    hf = _merge_config(tmp_path / "hf.yml", qwen_run / "base", [(qwen_run / f"checkpoint-{s}", s) for s in STEPS])
    assert run_cli(str(hf), str(tmp_path / "from-hf"), "-q").exit_code == 0
    # base from HF, window from verl shards, discovered through trajectory:
    verl = tmp_path / "verl.yml"
    verl.write_text(
        yaml.safe_dump(
            {
                "merge_method": "relex",
                "base_model": str(qwen_run / "base"),
                "trajectory": {"run_dir": str(shards), "steps": f"{STEPS[0]}-{STEPS[-1]}"},
                "parameters": {"target_step": 12, "rank": 2},
            }
        )
    )
    printed = run_cli(str(verl), "--print-config")
    assert all(m["model"].endswith("/actor") for m in yaml.safe_load(printed.stdout)["models"])
    result = run_cli(str(verl), str(tmp_path / "from-verl"), "-q")
    assert result.exit_code == 0, result.output
    a, b = load_state(tmp_path / "from-hf"), load_state(tmp_path / "from-verl")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # rank 2: the second direction is noise, found from a float32 Gram matrix
    assert_relex_output(tmp_path / "from-verl", qwen_run, STEPS, 12, rank=2, rel=2e-3)


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_convert_verl_to_hf(dtype, shards, qwen_run, tmp_path):
    out = tmp_path / "hf"
    result = run_cli("convert", str(shards / "global_step_3" / "actor"), str(out), "--dtype", dtype, "-q")
    assert result.exit_code == 0, result.output
    converted = load_state(out)
    reference = load_state(qwen_run / "checkpoint-3")
    expected_dtype = torch.float32 if dtype == "keep" else torch.bfloat16
    for name, tensor in reference.items():
        assert converted[name].dtype == expected_dtype
        assert torch.equal(converted[name], tensor.to(expected_dtype)), name
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == ("float32" if dtype == "keep" else "bfloat16")
    generate(out)


def test_convert_dcp_needs_a_config(shards, qwen_run, tmp_path):
    refused = run_cli("convert", str(shards / "dcp-1"), str(tmp_path / "o"))
    assert refused.exit_code == 2
    assert refused.stderr.strip() == (
        f"error: {shards / 'dcp-1'}: no config.json here or in huggingface/; "
        "pass --config-from with the model's HF folder"
    )
    assert not (tmp_path / "o").exists()
    ok = run_cli("convert", str(shards / "dcp-1"), str(tmp_path / "o"), "--config-from", str(qwen_run / "base"), "-q")
    assert ok.exit_code == 0, ok.output
    # the state dict that was saved (checkpoint-1's), tensor for tensor and bit for bit
    converted, saved = load_state(tmp_path / "o"), load_state(qwen_run / "checkpoint-1")
    assert sorted(converted) == sorted(saved)
    for name, tensor in saved.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name
    generate(tmp_path / "o")


def _copy_actor(shards: Path, tmp_path: Path) -> Path:
    actor = tmp_path / "actor"
    shutil.copytree(shards / "global_step_2" / "actor", actor)
    return actor


def _truncate(actor: Path) -> str:
    file = actor / "model_world_size_2_rank_1.pt"
    file.write_bytes(file.read_bytes()[:2000])
    return f"{file}: cannot read: truncated or not a torch checkpoint ("


def _drop_rank(actor: Path) -> str:
    (actor / "model_world_size_2_rank_1.pt").unlink()
    return f"{actor}: missing rank file model_world_size_2_rank_1.pt"


def _wrong_world(actor: Path) -> str:
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    return f"{actor / 'fsdp_config.json'}: world_size is 4 but the rank files are for world size 2"


def _mixed_world(actor: Path) -> str:
    shutil.copy(actor / "model_world_size_2_rank_0.pt", actor / "model_world_size_4_rank_0.pt")
    return f"{actor}: rank files of several world sizes [2, 4]; keep one save per folder"


@pytest.mark.parametrize("damage", [_truncate, _drop_rank, _wrong_world, _mixed_world], ids=lambda f: f.__name__[1:])
def test_broken_shards_give_one_line(damage, shards, qwen_run, tmp_path):
    actor = _copy_actor(shards, tmp_path)
    expected = damage(actor)
    cfg = _merge_config(tmp_path / "c.yml", qwen_run / "base", [(qwen_run / "checkpoint-1", 1), (actor, 2)])
    result = run_cli(str(cfg), str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines
    assert not (tmp_path / "out").exists()


def test_unsafe_pickle_is_refused_unless_allowed(qwen_run, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(qwen_run / "checkpoint-2", folder)
    (folder / "model.safetensors").unlink()
    state = load_state(qwen_run / "checkpoint-2")
    torch.save({**state, "note": fractions.Fraction(1, 3)}, folder / "pytorch_model.bin")
    cfg = _merge_config(tmp_path / "c.yml", qwen_run / "base", [(qwen_run / "checkpoint-1", 1), (folder, 2)])
    refused = run_cli(str(cfg), str(tmp_path / "out"))
    assert refused.exit_code == 2
    assert refused.stderr.strip() == (
        f"error: {folder / 'pytorch_model.bin'}: refusing to unpickle fractions.Fraction, which this format never "
        "holds (it could run code); pass --allow-unsafe-pickle only if you trust where it came from"
    )
    allowed = run_cli(str(cfg), str(tmp_path / "out"), "--allow-unsafe-pickle", "-q")
    assert allowed.exit_code == 0, allowed.output
    base = load_state(qwen_run / "base")
    expected = relex_expectation(base, [load_state(qwen_run / "checkpoint-1"), state], [1, 2], 12, rank=2)
    assert_state_matches(load_state(tmp_path / "out"), expected, base, rel=2e-3)


def test_convert_a_weight_file_into_a_folder_beside_it(qwen_run, tmp_path):
    """A file input overlaps only itself and the folders holding it, not its siblings."""
    folder = tmp_path / "ckpt"
    shutil.copytree(qwen_run / "checkpoint-2", folder)
    result = run_cli("convert", "model.safetensors", "converted", "-q", cwd=folder)
    assert result.exit_code == 0, result.output
    reference = load_state(qwen_run / "checkpoint-2")
    converted = load_state(folder / "converted")
    assert set(converted) == set(reference) and all(torch.equal(converted[n], reference[n]) for n in reference)
    for out in (".", "model.safetensors", str(tmp_path)):  # the file itself, or a folder that holds it
        refused = run_cli("convert", "model.safetensors", out, "--overwrite", cwd=folder)
        assert refused.exit_code == 2
        assert (
            refused.stderr.strip()
            == f"error: {out}: output overlaps the input model.safetensors; choose another output folder"
        )
    assert (folder / "model.safetensors").read_bytes() == (qwen_run / "checkpoint-2" / "model.safetensors").read_bytes()


def test_a_dcp_tensor_is_read_once_per_pass_however_small_the_budget(tmp_path, monkeypatch):
    """DCP loads a stored tensor whole for any rows asked: a tensor cut into spans was loaded
    once per span. With ``whole_tensor_reads`` each input's tensor is loaded once per pass."""
    import collections
    import warnings

    import torch.distributed.checkpoint as dcp

    from relex_merge.core.relex import RelexSpec
    from relex_merge.engine import EngineOptions, MergeJob, run_job
    from relex_merge.engine.tasks import plan_spans
    from tests.helpers import CollectSink, DictReader, assert_close, dense_relex, random_window

    base, checkpoints = random_window(n_ckpt=3, shapes={"w": (64, 8), "b": (8,)}, seed=5)
    folders = []
    for i, state in enumerate([base, *checkpoints]):
        folders.append(tmp_path / f"dcp-{i}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folders[-1])), no_dist=True)
    readers = [open_checkpoint(f) for f in folders]
    steps, spec = [1, 2, 3], RelexSpec(rank=2)
    job = MergeJob(readers[0], readers[1:], steps, [9], spec)
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 8)  # Gram chunks of one row
    options = EngineOptions(max_memory=20 * 64, threads=1)  # 64 elements (8 rows of w) a span
    dense = MergeJob(DictReader(base), [DictReader(c) for c in checkpoints], steps, [9], spec)
    assert len(plan_spans(dense, options, "w")) == 8  # the same budget cuts a mapped w into 8 spans

    loads = collections.Counter()
    real_load = dcp.load

    def counting_load(state_dict, *args, **kwargs):
        loads[(kwargs["storage_reader"].path, *state_dict)] += 1
        return real_load(state_dict, *args, **kwargs)

    monkeypatch.setattr(dcp, "load", counting_load)
    sink = CollectSink()
    run_job(job, [sink], options)
    assert loads == {(f, name): 2 for f in folders for name in ("w", "b")}  # Gram pass, output pass
    for name, tensor in base.items():
        expected = dense_relex(tensor, [c[name] for c in checkpoints], steps, 9, rank=2)
        assert_close(sink.tensor(name).reshape(tensor.shape), expected)


def test_fsdp_rows_of_a_tensor_sharded_along_dim_1_come_from_each_piece(monkeypatch):
    """Shard(1): each rank holds some columns of every row. A row span takes its rows from each
    piece; it used to join the whole tensor first and then slice it, once per span."""
    from relex_merge.io.formats.fsdp import FsdpShardReader, _Layout

    full = torch.arange(6 * 5, dtype=torch.float32).reshape(6, 5)
    reader = FsdpShardReader.__new__(FsdpShardReader)  # two rank pieces, no files
    reader._ranks, reader._states = [0, 1], {0: {"w": full[:, :2]}, 1: {"w": full[:, 2:]}}
    reader._layout, reader._meta = {"w": _Layout(1, (2, 3))}, {}
    joined = []
    real_cat = torch.cat

    def recording_cat(tensors, dim=0):
        joined.append([tuple(t.shape) for t in tensors])
        return real_cat(tensors, dim=dim)

    monkeypatch.setattr(torch, "cat", recording_cat)
    assert torch.equal(reader.read("w", (2, 4)), full[2:4])
    assert joined == [[(2, 2), (2, 3)]]  # only the span's rows were joined
    assert torch.equal(reader.read("w"), full)


# --- what any reader returns, and names checked against the model -----------------------------

REAL_WRITERS = Path(__file__).resolve().parents[1] / "fixtures" / "real_writers"


def _first_saves() -> list[Path]:
    manifest = json.loads((REAL_WRITERS / "manifest.json").read_text())
    return [REAL_WRITERS / w / info["checkpoints"]["2"] for w, info in manifest.items() if not w.startswith("_")]


def test_no_reader_returns_tensors_that_require_grad(qwen_run, tmp_path):
    """Trainers save Parameters (requires_grad=True); a reader that passes the flag on makes
    autograd track the merge math, whose out= kernels refuse it (the ZeRO crash of issue 20)."""
    state = load_state(qwen_run / "checkpoint-2")
    params = {name: torch.nn.Parameter(t.clone()) for name, t in state.items()}
    (tmp_path / "bin").mkdir()
    torch.save(params, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "fsdp").mkdir()
    torch.save(params, tmp_path / "fsdp" / "model_world_size_1_rank_0.pt")
    folders = [tmp_path / "bin", tmp_path / "fsdp", *_first_saves()]
    for folder in folders:
        reader = open_checkpoint(folder)
        for name in reader.names():
            rows = reader.meta(name).rows
            for span in (None, (0, max(1, rows // 2))):
                assert not reader.read(name, span).requires_grad, (folder, name)
    # and a merge over such files works (it crashed in block_deltas' torch.sub(out=...))
    models = [(qwen_run / "checkpoint-1", 1), (tmp_path / "bin", 2), (qwen_run / "checkpoint-3", 3)]
    cfg = _merge_config(tmp_path / "c.yml", qwen_run / "base", models)
    result = run_cli(str(cfg), str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    base = load_state(qwen_run / "base")
    window = [load_state(qwen_run / f"checkpoint-{s}") for s in (1, 2, 3)]
    expected = relex_expectation(base, window, [1, 2, 3], 12, rank=2)
    assert_state_matches(load_state(tmp_path / "out"), expected, base, rel=2e-3)


def _dcp_save(state: dict, folder: Path) -> Path:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    return folder


def test_a_dcp_save_whose_names_start_with_model_is_read_as_the_model_names_it(llama_tied_run, tmp_path):
    """A tied model's own names all start with ``model.`` (its lm_head is not saved), so a plain
    save and a {"model": ...} save both have every key under ``model.``: which prefix is the
    wrapper is settled by the base's names (merge) or config.json's (convert)."""
    run = llama_tied_run
    plain = {s: _dcp_save(load_state(run / f"checkpoint-{s}"), tmp_path / f"plain-{s}") for s in (1, 2, 3)}
    wrapped = {
        s: _dcp_save({"model": load_state(run / f"checkpoint-{s}")}, tmp_path / f"wrapped-{s}") for s in (1, 2, 3)
    }
    assert open_checkpoint(plain[1]).prefixes == ["", "model."]
    assert open_checkpoint(wrapped[1]).prefixes == ["", "model.", "model.model."]
    hf = _merge_config(tmp_path / "hf.yml", run / "base", [(run / f"checkpoint-{s}", s) for s in (1, 2, 3)])
    assert run_cli(str(hf), str(tmp_path / "from-hf"), "-q").exit_code == 0
    expected = load_state(tmp_path / "from-hf")
    for name, saves in (("plain", plain), ("wrapped", wrapped)):
        cfg = _merge_config(tmp_path / f"{name}.yml", run / "base", [(saves[s], s) for s in (1, 2, 3)])
        result = run_cli(str(cfg), str(tmp_path / f"from-{name}"), "-q")
        assert result.exit_code == 0, result.output
        got = load_state(tmp_path / f"from-{name}")
        assert sorted(got) == sorted(expected) and all(torch.equal(got[n], expected[n]) for n in expected), name
        out = tmp_path / f"converted-{name}"
        result = run_cli("convert", str(saves[2]), str(out), "--config-from", str(run / "base"), "-q")
        assert result.exit_code == 0, result.output
        converted, saved = load_state(out), load_state(run / "checkpoint-2")
        assert sorted(converted) == sorted(saved) and all(torch.equal(converted[n], saved[n]) for n in saved), name


def test_convert_refuses_names_the_model_does_not_have(qwen_run, tmp_path):
    """Exit 0 with optimizer state or foreign names in model.safetensors is impossible: the
    output's names and shapes are checked against the model config.json builds."""
    state = load_state(qwen_run / "checkpoint-2")
    cases = {
        "optimizer state": ({**state, "optimizer.state.lm_head.weight.exp_avg": torch.zeros(3)}, None),
        "torchtitan names": ({k.replace("model.embed_tokens", "tok_embeddings"): v for k, v in state.items()}, None),
        "a missing tensor": ({k: v for k, v in state.items() if k != "model.norm.weight"}, None),
        "a wrong shape": ({**state, "model.norm.weight": torch.zeros(3)}, None),
    }
    expected = {
        "optimizer state": "tensor optimizer.state.lm_head.weight.exp_avg is not in the Qwen2ForCausalLM that "
        f"{qwen_run / 'base' / 'config.json'} describes",
        "torchtitan names": "tensor tok_embeddings.weight is not in the Qwen2ForCausalLM that "
        f"{qwen_run / 'base' / 'config.json'} describes",
        "a missing tensor": "tensor model.norm.weight of the Qwen2ForCausalLM that "
        f"{qwen_run / 'base' / 'config.json'} describes is missing",
        "a wrong shape": f"tensor model.norm.weight has shape [3], {qwen_run / 'base' / 'config.json'} makes it "
        f"{list(state['model.norm.weight'].shape)}",
    }
    for case, (tensors, _) in cases.items():
        folder = tmp_path / case.replace(" ", "-")
        folder.mkdir()
        torch.save(tensors, folder / "pytorch_model.bin")
        out = tmp_path / f"out-{folder.name}"
        result = run_cli("convert", str(folder), str(out), "--config-from", str(qwen_run / "base"))
        assert result.exit_code == 2, (case, result.output)
        assert result.stderr.strip() == f"error: {folder}: {expected[case]}", case
        assert not out.exists()
    # a merge whose base is such a trainer checkpoint is refused the same way
    base = tmp_path / "optimizer-state"
    shutil.copy(qwen_run / "base" / "config.json", base)
    cfg = _merge_config(tmp_path / "c.yml", base, [(qwen_run / f"checkpoint-{s}", s) for s in (1, 2)])
    result = run_cli(str(cfg), str(tmp_path / "merged"))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {base}: {expected['optimizer state']}".replace(
        str(qwen_run / "base" / "config.json"), str(base / "config.json")
    )
    assert not (tmp_path / "merged").exists()


def test_convert_drops_buffers_the_model_does_not_save(qwen_run, tmp_path):
    """Old trainers saved rotary inv_freq buffers; from_pretrained ignores them, so does convert."""
    state = load_state(qwen_run / "checkpoint-2")
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save({**state, "model.rotary_emb.inv_freq": torch.ones(4)}, folder / "pytorch_model.bin")
    result = run_cli("convert", str(folder), str(tmp_path / "out"), "--config-from", str(qwen_run / "base"), "-q")
    assert result.exit_code == 0, result.output
    assert sorted(load_state(tmp_path / "out")) == sorted(state)


def test_convert_of_an_architecture_transformers_does_not_know_warns(qwen_run, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(qwen_run / "checkpoint-2", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "my_own", "architectures": ["MyOwnLM"]}))
    result = run_cli("convert", str(folder), str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == (
        f"warning: transformers cannot build the model {folder / 'config.json'} describes here (an architecture "
        "it does not know); the tensors' names and shapes are not checked against it"
    )
    assert sorted(load_state(tmp_path / "out")) == sorted(load_state(folder))


@pytest.mark.parametrize("fault", ["short reads", "end of file", "error"])
def test_the_safetensors_reader_survives_short_reads_and_names_a_failed_one(fault, qwen_run, monkeypatch):
    """os.preadv may return fewer bytes than asked (signals, network file systems) or 0 at the
    end of a file truncated under us; the reader must loop on the first and say the second."""
    from safetensors.torch import load_file

    from relex_merge.common.errors import RelexError
    from relex_merge.io.formats import safetensors as module

    folder = qwen_run / "checkpoint-2"
    reference = load_file(folder / "model.safetensors")
    real = os.preadv
    calls = []

    def preadv(fd, buffers, offset):
        calls.append(offset)
        if fault == "short reads":  # 1..13 bytes a call, from exactly where the last one stopped
            (buffer,) = buffers
            return real(fd, [memoryview(buffer)[: 1 + len(calls) % 13]], offset)
        if fault == "end of file" and len(calls) > 1:
            return 0
        if fault == "error":
            raise OSError(5, "Input/output error")
        (buffer,) = buffers
        return real(fd, [memoryview(buffer)[: len(buffer) // 2]], offset)

    monkeypatch.setattr(module.os, "preadv", preadv)
    reader = open_checkpoint(folder)
    name = "model.norm.weight"
    if fault == "short reads":
        for rows in [None, (1, 3) if reference[name].dim() > 1 else None]:
            expected = reference[name] if rows is None else reference[name][rows[0] : rows[1]]
            got = reader.read(name, rows)
            assert got.dtype == expected.dtype and torch.equal(got, expected)
        embed = "model.embed_tokens.weight"
        assert torch.equal(reader.read(embed, (2, 5)), reference[embed][2:5])
        return
    with pytest.raises(RelexError) as caught:
        reader.read(name)
    assert str(caught.value) == f"{folder / 'model.safetensors'}: " + (
        f"ended early while reading tensor {name}; the file is truncated"
        if fault == "end of file"
        else f"cannot read tensor {name} (Input/output error)"
    )

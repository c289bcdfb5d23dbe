"""The DeepSpeed ZeRO reader on the files DeepSpeed itself wrote (tests/fixtures/real_writers:
ZeRO-1, -2, -3, HF Trainer + ZeRO-3, bf16 ZeRO-3, the BF16 optimizer; 1 to 3 ranks), without
DeepSpeed: the same tensors, names, order and bits as DeepSpeed's zero_to_fp32 (the committed
references, which the generator checked against it), read in spans, and refusals in one line."""

from __future__ import annotations

import fractions
import json
import shutil
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from relex_merge.common.errors import RelexError
from relex_merge.io.formats import open_checkpoint
from relex_merge.io.formats.zero import ZeroReader
from relex_merge.io.hf import model_tensors
from tests.helpers import load_state, run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "real_writers"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
ZERO = sorted(w for w in MANIFEST if not w.startswith("_") and MANIFEST[w]["zero_stage"] is not None)
SAVES = [(w, int(step), FIXTURES / w / folder) for w in ZERO for step, folder in MANIFEST[w]["checkpoints"].items()]


def _reference(writer: str, step: int) -> dict[str, torch.Tensor]:
    return load_state(FIXTURES / writer / MANIFEST[writer]["references"][str(step)])


def test_the_fixtures_cover_every_stage_and_the_bf16_optimizer():
    stages = {MANIFEST[w]["zero_stage"] for w in ZERO}
    assert stages == {1, 2, 3}
    readers = [open_checkpoint(save) for _, _, save in SAVES]
    assert {(r.stage, r.world_size) for r in readers} >= {(1, 1), (2, 3), (3, 2), (3, 3), (1, 2)}
    assert any(r.bf16_optimizer for r in readers) and any(r.trainer_dtype == torch.bfloat16 for r in readers)
    for writer in ZERO:  # the references are DeepSpeed's own consolidation (or, where it cannot, its fp32 master)
        verdict = MANIFEST[writer]["reference_vs_zero_to_fp32"]
        assert verdict.startswith("equal, bit for bit") or "safe_get_full_fp32_param" in verdict, writer


@pytest.mark.parametrize("writer,step,save", SAVES, ids=[f"{w}-{s}" for w, s, _ in SAVES])
def test_every_save_reads_as_deepspeeds_consolidation(writer, step, save):
    reader = open_checkpoint(save)
    assert type(reader) is ZeroReader and reader.resident_bytes == 0
    reference = _reference(writer, step)
    # zero_to_fp32's order: the model's parameters in turn (no persistent buffers here)
    model = model_tensors(FIXTURES / "base" / "config.json")
    assert reader.names() == list(model.shapes)
    for name in reader.names():
        meta = reader.meta(name)
        whole = reader.read(name)
        assert not whole.requires_grad
        assert meta.dtype == whole.dtype == reference[name].dtype == torch.float32
        assert meta.shape == tuple(whole.shape) and torch.equal(whole, reference[name]), name
        for rows in (1, 3):  # spans cross the ranks' partitions
            spans = [reader.read(name, (a, min(meta.rows, a + rows))) for a in range(0, meta.rows, rows)]
            assert torch.equal(torch.cat(spans), whole), (name, rows)
    files = reader.files()
    assert all(f.parent == save for f in files) and len(files) == len({*files})
    assert "deepspeed" not in sys.modules


def test_the_folder_above_the_tags_reads_the_tag_latest_names(tmp_path):
    writer = "deepspeed_zero3"
    actor = FIXTURES / writer / "ckpt" / "_actor"
    assert (actor / "latest").read_text().strip() == "global_step6"
    reader = open_checkpoint(actor)
    assert reader.tag == actor / "global_step6"
    reference = _reference(writer, 6)
    assert all(torch.equal(reader.read(n), reference[n]) for n in reference)
    # HF Trainer's checkpoint-N holds latest, the tag and config.json
    checkpoint = FIXTURES / "hf_trainer_zero3" / "run" / "checkpoint-4"
    assert open_checkpoint(checkpoint).tag == checkpoint / "global_step4"
    assert open_checkpoint(checkpoint / "global_step4").config_folders == [checkpoint]
    # several tags and no latest: which one is meant cannot be guessed
    shutil.copytree(actor, tmp_path / "_actor")
    (tmp_path / "_actor" / "latest").unlink()
    with pytest.raises(RelexError) as err:
        open_checkpoint(tmp_path / "_actor")
    assert str(err.value) == (
        f"{tmp_path / '_actor'}: 3 DeepSpeed tag folders (global_step2, global_step4, global_step6) and no "
        "`latest` file naming one; point at the tag folder itself"
    )


def test_reads_from_many_threads_at_once_agree():
    save = FIXTURES / "deepspeed_zero2" / "run" / "global_step4"
    reader = open_checkpoint(save)
    assert reader.thread_safe_reads
    reference = _reference("deepspeed_zero2", 4)
    results, errors = {}, []

    def work(i: int) -> None:
        try:
            for name in reader.names():
                rows = reader.meta(name).rows
                a = i % rows
                results[(i, name)] = (reader.read(name, (a, rows)), reference[name][a:])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(got, want) for got, want in results.values())


def test_consent_to_unpickle_still_needs_no_deepspeed():
    """--allow-unsafe-pickle unpickles fully; DeepSpeed's classes still come out as our stand-ins."""
    writer, step, save = SAVES[0]
    reader = ZeroReader(save, allow_unsafe_pickle=True)
    reference = _reference(writer, step)
    assert all(torch.equal(reader.read(n), reference[n]) for n in reference)
    assert "deepspeed" not in sys.modules


def _copy_save(tmp_path: Path, writer: str = "deepspeed_zero3_bf16", step: int = 2) -> Path:
    tag = tmp_path / "run" / f"global_step{step}"
    shutil.copytree(FIXTURES / writer / MANIFEST[writer]["checkpoints"][str(step)], tag)
    return tag


def test_a_file_holding_more_than_deepspeeds_types_needs_consent(tmp_path):
    tag = _copy_save(tmp_path)
    model_states = tag / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    state = torch.load(model_states, weights_only=True)
    state["consumed"] = fractions.Fraction(1, 3)  # a trainer's client state object
    torch.save(state, model_states)
    refused = run_cli("convert", str(tag), str(tmp_path / "out"), "--config-from", str(FIXTURES / "base"))
    assert refused.exit_code == 2
    assert refused.stderr.strip() == (
        f"error: {model_states}: refusing to unpickle fractions.Fraction, which this format never holds (it could "
        "run code); pass --allow-unsafe-pickle only if you trust where it came from"
    )
    assert not (tmp_path / "out").exists()
    allowed = run_cli(
        "convert",
        str(tag),
        str(tmp_path / "out"),
        "--config-from",
        str(FIXTURES / "base"),
        "-q",
        "--allow-unsafe-pickle",
    )
    assert allowed.exit_code == 0, allowed.output
    reference = _reference("deepspeed_zero3_bf16", 2)
    assert all(torch.equal(load_state(tmp_path / "out")[n], reference[n]) for n in reference)


def _drop_rank(tag: Path) -> str:
    (tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    return f"{tag}: the optimizer states say 2 data-parallel ranks but 1 *_optim_states.pt files are here"


def _drop_rank_0(tag: Path) -> str:
    (tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    return f"{tag}: the optimizer states of rank 0 are missing (ranks found: [1])"


def _truncate(tag: Path) -> str:
    file = tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    file.write_bytes(file.read_bytes()[:3000])
    return f"{file}: cannot read: truncated or not a torch checkpoint ("


def _drop_model_states(tag: Path) -> str:
    (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    return f"{tag}: 1 zero_pp_rank_*_model_states.pt files for 2 ranks"


def _mix_saves(tag: Path) -> str:
    other = FIXTURES / "deepspeed_zero3" / "ckpt" / "_actor" / "global_step2"
    shutil.copy(other / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tag)
    return f"{tag}: both bf16_zero_pp_rank_* and zero_pp_rank_* files: two saves mixed"


def _model_parallel(tag: Path) -> str:
    shutil.copy(
        tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", tag / "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt"
    )
    return f"{tag}: a tensor- or pipeline-parallel DeepSpeed save (mp_rank_01); only data-parallel ZeRO saves"


def _not_optimizer_states(tag: Path) -> str:
    file = tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"module": {}}, file)
    return f"{file}: no optimizer_state_dict: not a DeepSpeed ZeRO optimizer-states file"


def _shorter_partition(tag: Path) -> str:
    file = tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    from relex_merge.io.base import load_torch_file
    from relex_merge.io.formats.zero import DEEPSPEED_TYPES

    state = load_torch_file(file, True, DEEPSPEED_TYPES)  # DeepSpeed's classes as our stand-ins
    groups = state["optimizer_state_dict"]["fp32_flat_groups"]
    state["optimizer_state_dict"]["fp32_flat_groups"] = [g[:-5].clone() for g in groups]
    torch.save(state, file.with_suffix(".new"))  # not over the file it is mapped from
    file.with_suffix(".new").replace(file)
    return f"{tag}: the ranks hold [660, 655] fp32 elements; ZeRO-3 ranks hold equal partitions"


@pytest.mark.parametrize(
    "damage",
    [
        _drop_rank,
        _drop_rank_0,
        _truncate,
        _drop_model_states,
        _mix_saves,
        _model_parallel,
        _not_optimizer_states,
        _shorter_partition,
    ],
    ids=lambda f: f.__name__[1:],
)
def test_damaged_saves_give_one_line_and_write_nothing(damage, tmp_path, monkeypatch):
    from relex_merge.io.formats import zero

    # the test's re-saved files pickle our stand-ins under our names: allow those too
    known = zero.DEEPSPEED_TYPES + tuple(
        (cls, f"{cls.__module__}.{cls.__qualname__}") for cls, _ in zero.DEEPSPEED_TYPES
    )
    monkeypatch.setattr(zero, "DEEPSPEED_TYPES", known)
    tag = _copy_save(tmp_path)
    expected = damage(tag)
    result = run_cli("convert", str(tag), str(tmp_path / "out"), "--config-from", str(FIXTURES / "base"))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines
    assert not (tmp_path / "out").exists()


def _rss_file() -> int:
    """Bytes of file-backed pages mapped into this process (RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="pages are given back on Linux only")
def test_a_read_gives_back_the_pages_it_mapped(tmp_path, monkeypatch):
    """Reading every span of a 96 MiB ZeRO-3 partition leaves about one span's pages mapped;
    without giving them back, the whole partition would stay resident."""
    rows, cols = 3 * 1024, 8 * 1024  # 96 MiB of fp32
    tag = tmp_path / "global_step1"
    tag.mkdir()
    flat = torch.arange(rows * cols, dtype=torch.float32)
    torch.save(
        {"optimizer_state_dict": {"zero_stage": 3, "partition_count": 1, "fp32_flat_groups": [flat]}},
        tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    torch.save(
        {"param_shapes": [OrderedDict(w=torch.Size([rows, cols]))], "module": {}, "buffer_names": []},
        tag / "zero_pp_rank_0_mp_rank_00_model_states.pt",
    )
    del flat

    def peak_growth(reader) -> int:
        before = peak = _rss_file()
        for a in range(0, rows, 128):  # spans of 4 MiB
            span = reader.read("w", (a, a + 128))
            assert span[0, 0].item() == a * cols
            peak = max(peak, _rss_file())
        return peak - before

    assert peak_growth(ZeroReader(tag)) < 16 << 20  # measured: ~5 MiB
    from relex_merge.io import pages

    monkeypatch.setattr(pages, "_LIBC", None)  # no giving back: every page read stays mapped
    assert peak_growth(ZeroReader(tag)) > 64 << 20  # measured: ~96 MiB

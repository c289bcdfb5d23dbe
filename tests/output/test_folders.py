"""The output folder is claimed atomically (issue 23, finding 4): of two runs started into the same
new OUT, the later one to finish must not silently replace the earlier one's output."""

from __future__ import annotations

import pytest

from relex_merge.common.errors import RelexError
from relex_merge.output.folders import atomic_output_dir
from tests.helpers import run_cli, write_config


def test_a_run_that_finishes_second_does_not_replace_the_first(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RelexError) as err:
        with atomic_output_dir(out) as tmp:
            (tmp / "mine").write_text("second")
            out.mkdir()  # another run finished first, into the same new OUT
            (out / "theirs").write_text("first")
    assert str(err.value) == (
        f"{out}: another run wrote this output folder while this one ran; this run's output was discarded "
        "(pass --overwrite to replace it)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    assert [p.name for p in out.iterdir()] == ["theirs"]


def test_an_empty_out_is_claimed_and_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert [p.name for p in out.iterdir()] == ["a"]
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_merge_into_an_out_that_filled_meanwhile_fails_in_one_line(qwen_run, tmp_path, monkeypatch):
    """The same through the command: the folder is filled while the merge runs (after its checks)."""
    from relex_merge.workflows import merge

    cfg = write_config(tmp_path / "c.yml", qwen_run, [1, 2, 3, 4, 5, 6], 12)
    out = tmp_path / "out"
    real = merge.shared_output_dir

    def racing(where, group=None, overwrite=False):
        (where / "theirs").parent.mkdir(exist_ok=True)
        (where / "theirs").write_text("first")  # another run's output lands first
        return real(where, group, overwrite)

    monkeypatch.setattr(merge, "shared_output_dir", racing)
    result = run_cli(str(cfg), str(out), "-q")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {out}: another run wrote this output folder")
    assert [p.name for p in out.iterdir()] == ["theirs"]

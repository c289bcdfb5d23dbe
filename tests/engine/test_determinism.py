"""Same bytes by construction (issue 23): a window whose tensors are large enough (1-2 MB) for a
BLAS to split its products, merged and analysed in separate processes under every setting that
used to change the arithmetic's order: reruns, worker threads, memory budgets (span sizes),
OMP_NUM_THREADS and torchrun ranks (2 and 3). Every output and fit cache must be the same bytes.

On main before the fix the memory budget alone changed the Gram sums (span boundaries), and on
MKL/AVX-512 machines reruns, threads and ranks did too."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relex_merge.testing.synthetic import make_planted_run
from tests.helpers import write_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
# The full check (30 checkpoints, 5 runs of the same command) takes ~4x as long:
#   RELEX_SAME_BYTES_WINDOW=30 RELEX_SAME_BYTES_RUNS=5 python -m pytest tests/engine/test_determinism.py
WINDOW = int(os.environ.get("RELEX_SAME_BYTES_WINDOW", "10"))
RUNS = int(os.environ.get("RELEX_SAME_BYTES_RUNS", "2"))


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """Tiny Qwen2 with hidden 512: 1 MB attention and 2 MB MLP matrices, WINDOW checkpoints."""
    return make_planted_run(
        tmp_path_factory.mktemp("wide") / "run",
        steps=range(1, WINDOW + 1),
        rate=1e-3,
        model_kwargs={"hidden": 512, "layers": 1},
    )


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR")}
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


def _merge(args: list[str], env: dict, torchrun: int = 0) -> None:
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
    result = subprocess.run(
        [*launcher, "-m", "relex_merge", *args, "-q"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _digest(folder: Path, names: tuple[str, ...]) -> str:
    return hashlib.sha256(b"".join((folder / name).read_bytes() for name in names)).hexdigest()[:16]


def test_outputs_and_fit_caches_are_the_same_bytes_whatever_threads_processes_and_budget(wide_run, tmp_path):
    cfg = write_config(tmp_path / "c.yml", wide_run, range(1, WINDOW + 1), [2 * WINDOW, 3 * WINDOW], dtype="float32")
    variants = {
        **{f"run {k + 1}": ([], {}, 0) for k in range(RUNS)},
        "--threads 1": (["--threads", "1"], {}, 0),
        "--threads 2": (["--threads", "2"], {}, 0),
        "--max-memory 24MB": (["--max-memory", "24MB"], {}, 0),
        "--max-memory 100MB": (["--max-memory", "100MB"], {}, 0),
        "OMP_NUM_THREADS=1": ([], {"OMP_NUM_THREADS": "1"}, 0),
        "OMP_NUM_THREADS=2": ([], {"OMP_NUM_THREADS": "2"}, 0),
        "torchrun 1": ([], {"OMP_NUM_THREADS": "1"}, 1),
        "torchrun 2": ([], {"OMP_NUM_THREADS": "2"}, 2),
        "torchrun 3": ([], {"OMP_NUM_THREADS": "1"}, 3),
    }
    outputs = {}
    for i, (name, (flags, env, ranks)) in enumerate(variants.items()):
        out = tmp_path / f"out{i}"
        _merge([str(cfg), str(out), *flags], _env(**env), ranks)
        outputs[name] = _digest(out, (f"step-{2 * WINDOW}/model.safetensors", f"step-{3 * WINDOW}/model.safetensors"))
    assert len(set(outputs.values())) == 1, outputs
    caches = {}
    for i, (name, (flags, env, ranks)) in enumerate(
        [
            ("--max-memory 24MB", (["--max-memory", "24MB"], {}, 0)),
            ("--max-memory 100MB, OMP_NUM_THREADS=2", (["--max-memory", "100MB"], {"OMP_NUM_THREADS": "2"}, 0)),
            ("torchrun 2", ([], {"OMP_NUM_THREADS": "1"}, 2)),
        ]
    ):
        out = tmp_path / f"analysis{i}"
        _merge(["analyze", str(cfg), "--out", str(out), *flags], _env(**env), ranks)
        caches[name] = _digest(out, ("fit_cache.safetensors", "analysis.json"))
    assert len(set(caches.values())) == 1, caches

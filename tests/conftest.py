import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from relex_merge.testing.synthetic import make_planted_run  # noqa: E402


@pytest.fixture(scope="session")
def qwen_run(tmp_path_factory):
    """Tiny Qwen2: base + checkpoint-1..6 on a planted linear trajectory."""
    return make_planted_run(tmp_path_factory.mktemp("qwen") / "run", steps=range(1, 7), rate=1e-3)


@pytest.fixture(scope="session")
def llama_tied_run(tmp_path_factory):
    return make_planted_run(
        tmp_path_factory.mktemp("llama") / "run", steps=range(1, 6), arch="llama", tied=True, seed=3
    )


@pytest.fixture(scope="session")
def uneven_run(tmp_path_factory):
    """Tiny Qwen2 saved at steps that are not positions: uneven, with gaps, and a late stretch
    (10-13) far from the base at step 0. A fit against the checkpoint's position instead of its
    step passes every test whose steps are 1..N; it fails on these."""
    return make_planted_run(
        tmp_path_factory.mktemp("uneven") / "run", steps=[2, 3, 5, 8, 10, 11, 12, 13], rate=1e-3, seed=5
    )

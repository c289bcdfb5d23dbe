import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from relex_merge.synthetic import make_planted_run  # noqa: E402


@pytest.fixture(scope="session")
def qwen_run(tmp_path_factory):
    """Tiny Qwen2: base + checkpoint-1..6 on a planted linear trajectory."""
    return make_planted_run(tmp_path_factory.mktemp("qwen") / "run", steps=range(1, 7), rate=1e-3)


@pytest.fixture(scope="session")
def llama_tied_run(tmp_path_factory):
    return make_planted_run(
        tmp_path_factory.mktemp("llama") / "run", steps=range(1, 6), arch="llama", tied=True, seed=3
    )

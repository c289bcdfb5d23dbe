"""eval and sweep on local models and local task data never touch the network, even when the
user has not exported HF_HUB_OFFLINE / HF_DATASETS_OFFLINE."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo" / "run"
TASK = ["--tasks", "relex_demo_addition", "--include-path", "demo/tasks"]

# Loaded by every Python started with this folder first on PYTHONPATH: DNS look-ups and
# connects (other than Unix sockets) raise, and each attempt is appended to the log file with
# where it came from.
SITECUSTOMIZE = """
import os, socket, traceback

_LOG = os.environ["RELEX_TEST_NETWORK_LOG"]


def _blocked(kind, where):
    with open(_LOG, "a") as log:
        log.write(f"{kind} {where!r}\\n" + "".join(traceback.format_stack()[:-2]) + "\\n")
    raise OSError(f"network blocked by the test: {kind} {where!r}")


def getaddrinfo(host, *args, **kwargs):
    _blocked("getaddrinfo", host)


def gethostbyname(host):
    _blocked("gethostbyname", host)


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def connect(self, address):
    if self.family == getattr(socket, "AF_UNIX", None):
        return _connect(self, address)
    _blocked("connect", address)


def connect_ex(self, address):
    if self.family == getattr(socket, "AF_UNIX", None):
        return _connect_ex(self, address)
    _blocked("connect_ex", address)


socket.getaddrinfo = getaddrinfo
socket.gethostbyname = gethostbyname
socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
"""


def _env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "network.log"
    log.write_text("")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_UPDATE_DOWNLOAD_COUNTS")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    env["RELEX_TEST_NETWORK_LOG"] = str(log)
    env["HF_HOME"] = str(tmp_path / "hf_home")  # a first run: nothing cached
    return env, log


def _relex(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    # a fresh interpreter: huggingface_hub and datasets read the offline switches on import
    return subprocess.run(
        [sys.executable, "-m", "relex_merge", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_eval_and_sweep_on_local_data_make_no_network_access(tmp_path):
    env, log = _env(tmp_path)
    # the block works (and this checkout's relex_merge is the one imported)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import socket, relex_merge; print(relex_merge.__file__)\n"
            "try: socket.getaddrinfo('example.org', 443)\nexcept OSError: pass",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(REPO), probe.stdout
    assert log.read_text().startswith("getaddrinfo 'example.org'")
    log.write_text("")
    assert not any(k.endswith("_OFFLINE") for k in env)

    model = tmp_path / "checkpoint-20"
    shutil.copytree(DEMO / "checkpoint-20", model)
    result = _relex(env, "eval", str(model), *TASK, "--limit", "5")
    assert result.returncode == 0, result.stderr
    assert "exact_match" in result.stdout
    assert log.read_text() == "", "eval reached for the network:\n" + log.read_text()

    out = tmp_path / "sweep"
    result = _relex(env, "sweep", "merge_configs/demo.yml", str(out), "--targets", "40", *TASK, "--limit", "5", "-q")
    assert result.returncode == 0, result.stderr
    assert "step-40-scale-1 (best)" in result.stdout
    assert log.read_text() == "", "sweep reached for the network:\n" + log.read_text()
    assert sorted(p.name for p in out.iterdir()) == ["baseline_lm_eval_results.json", "best", "sweep_results.json"]


def _manager(tmp_path: Path, yamls: dict[str, str]):
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "tasks"
    folder.mkdir()
    for name, text in yamls.items():
        (folder / f"{name}.yaml").write_text(text)
    return TaskManager(include_path=str(folder), include_defaults=False)


LOCAL = "task: local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/test.jsonl\ntest_split: test\n"
TASKS = {
    "local": LOCAL,
    "local_list": "task: local_list\ndataset_path: csv\ndataset_kwargs:\n  data_files: [a.csv, b.csv]\n",
    "local_dir": "task: local_dir\ndataset_path: {dir}\ntest_split: test\n",
    "hub": "task: hub\ndataset_path: some-org/some-dataset\ntest_split: test\n",
    "json_url": "task: json_url\ndataset_path: json\ndataset_kwargs:\n  data_files: https://example.org/t.jsonl\n",
    "hf_url": "task: hf_url\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: hf://datasets/org/name/t.parquet\n",
    "json_no_files": "task: json_no_files\ndataset_path: json\n",
    "custom": LOCAL.replace("task: local", "task: custom") + "custom_dataset: !function utils.load\n",
    "hf_metric": LOCAL.replace("task: local", "task: hf_metric")
    + "metric_list:\n  - metric: exact_match\n    hf_evaluate: true\n",
    "unknown_metric": LOCAL.replace("task: local", "task: unknown_metric") + "metric_list:\n  - metric: sacre_rouge\n",
    "own_metric": LOCAL.replace("task: local", "task: own_metric")
    + "tag: local_tag\nmetric_list:\n  - metric: exact_match\n",
    "included": "include: local.yaml\ntask: included\n",
    "group_local": "group: group_local\ntask: [local, local_list, {task: inline, dataset_path: text, "
    "dataset_kwargs: {data_files: x.txt}}]\n",
    "group_hub": "group: group_hub\ntask: [local, hub]\n",
    "group_override": "group: group_override\ntask: [local]\ndataset_path: some-org/some-dataset\n",
    "group_of_groups": "group: group_of_groups\ntask: [group_local, {group: group_hub}]\n",
}


@pytest.mark.parametrize(
    "task, local",
    [
        ("local", True),
        ("local_list", True),
        ("local_dir", True),
        ("included", True),
        ("own_metric", True),
        ("local_tag", True),
        ("group_local", True),
        ("hub", False),
        ("json_url", False),
        ("hf_url", False),
        ("json_no_files", False),
        ("custom", False),
        ("hf_metric", False),
        ("unknown_metric", False),
        ("group_hub", False),
        ("group_override", False),
        ("group_of_groups", False),
    ],
)
def test_a_task_is_local_when_its_data_is(tmp_path, task, local):
    from relex_merge.evaluation.offline import tasks_are_local

    data = tmp_path / "data_dir"
    data.mkdir()
    manager = _manager(tmp_path, {k: v.format(dir=data) if k == "local_dir" else v for k, v in TASKS.items()})
    assert task in manager.all_tasks
    assert tasks_are_local([task], manager) is local
    assert tasks_are_local(["local", task], manager) is local


def test_offline_only_for_local_tasks_and_only_while_scoring(tmp_path, monkeypatch):
    from datasets import config as datasets_config
    from huggingface_hub import constants as hub_constants

    from relex_merge.evaluation.offline import offline_if_local

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # as imported without the variables
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", False)
    manager = _manager(tmp_path, {"local": TASKS["local"], "hub": TASKS["hub"]})
    state = lambda: (
        os.environ.get("HF_HUB_OFFLINE"),
        os.environ.get("HF_DATASETS_OFFLINE"),  # noqa: E731
        hub_constants.is_offline_mode(),
        datasets_config.HF_HUB_OFFLINE,
        datasets_config.HF_DATASETS_OFFLINE,
    )

    with offline_if_local(["local", "hub"], manager) as switched:  # a Hub dataset: leave the network alone
        assert not switched and state() == (None, None, False, False, False)
    with offline_if_local(["local"], manager) as switched:
        assert switched and state() == ("1", "1", True, True, True)
    assert state() == (None, None, False, False, False)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's own setting wins
    with offline_if_local(["local"], manager) as switched:
        assert switched and state() == ("0", "1", False, True, True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    with offline_if_local(["local"], manager) as switched:
        assert not switched and state() == ("0", "0", False, False, False)

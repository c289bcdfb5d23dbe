"""Keep lm-eval off the network when everything it needs is local.

The models relex-merge scores are local folders by construction. When every requested task
reads its data from local files too, nothing needs the network, yet ``datasets`` still sends a
download-count request (a HEAD to s3.amazonaws.com, ``increase_load_count``) for packaged
builders such as ``json`` unless it is offline. So for exactly that case relex-merge switches
huggingface_hub and datasets offline itself, for the duration of the scoring. When some task's
data is not known to be local (a Hub dataset, a Python task, a metric from the HF ``evaluate``
hub), nothing is changed: the user may have network and need it.

huggingface_hub (``constants.HF_HUB_OFFLINE``) and datasets (``config.HF_HUB_OFFLINE``,
``config.HF_DATASETS_OFFLINE``) read the variables once, when first imported, and lm-eval's
task index imports both; so the switch sets the environment variables (for whatever is imported
later) and those module constants (for what already is). A variable the user set, to anything,
is left alone with its constant.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["LOCAL_BUILDERS", "offline_if_local", "tasks_are_local", "dataset_is_local"]

log = logging.getLogger(__name__)

# datasets' packaged builders that read nothing but the files they are given
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow"})


def _is_url(text: str) -> bool:
    return "://" in text  # http(s)://, hf://, s3://, gs://, and chained zip://...::https://


def _paths(value: Any) -> list[Any] | None:
    """Every path in a ``data_files`` value (a path, a list of them, or a split -> path(s) dict)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict):
        out = []
        for item in value.values():
            more = _paths(item)
            if more is None:
                return None
            out += more
        return out
    return None


def dataset_is_local(cfg: dict[str, Any]) -> bool:
    """Whether a task config (lm-eval task YAML, includes resolved) reads only local data:
    ``dataset_path`` a packaged builder (json, csv, parquet, text, arrow) with local
    ``data_files`` / ``data_dir``, or a local directory."""
    if "class" in cfg or cfg.get("custom_dataset") is not None:
        return False  # Python code decides where the data comes from
    path = cfg.get("dataset_path")
    kwargs = cfg.get("dataset_kwargs") or {}
    if not isinstance(path, str) or not path or _is_url(path) or not isinstance(kwargs, dict):
        return False
    files = _paths(kwargs.get("data_files"))
    data_dir = kwargs.get("data_dir")
    if files is None or any(not isinstance(f, (str, os.PathLike)) or _is_url(str(f)) for f in files):
        return False
    if data_dir is not None and (not isinstance(data_dir, (str, os.PathLike)) or _is_url(str(data_dir))):
        return False
    if path in LOCAL_BUILDERS:
        return bool(files) or data_dir is not None
    return Path(path).expanduser().is_dir()


def _metrics_are_local(cfg: dict[str, Any]) -> bool:
    """lm-eval's own metrics need nothing; one it does not know (or ``hf_evaluate: true``) is
    loaded from the Hub by HF ``evaluate``."""
    from lm_eval.api import metrics  # noqa: F401  (fills the registry)
    from lm_eval.api.registry import metric_registry

    if cfg.get("process_results") is not None:
        return True  # lm-eval then computes the metrics with the task's own function
    entries = cfg.get("metric_list") or []
    if not isinstance(entries, list):
        return False
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("hf_evaluate") is True:
            return False
        metric = entry.get("metric")
        if not isinstance(metric, str) or metric not in metric_registry:
            return False  # HF evaluate, or a !function we cannot see into
    return True


def _task_is_local(cfg: dict[str, Any]) -> bool:
    return dataset_is_local(cfg) and _metrics_are_local(cfg)


def _group_fields() -> set[str]:
    from dataclasses import fields

    from lm_eval.config.group import GroupConfig

    return {f.name for f in fields(GroupConfig)}


def tasks_are_local(tasks: Sequence[str], manager) -> bool:
    """Whether every task (and every task inside a requested group or tag) reads only local
    data, judged from lm-eval's task index the way lm-eval's TaskFactory would build it:
    a group's non-group keys override its members' configs. Anything unexpected: not local."""
    index = manager.task_index
    group_fields = _group_fields()

    def member_configs(item, overrides: dict, depth: int) -> Iterator[dict | None]:
        if depth > 32:
            yield None
            return
        if isinstance(item, str):
            entry = index.get(item)
            if entry is None:
                yield None
            elif entry.kind.name == "TAG":
                for name in sorted(entry.tags):
                    yield from member_configs(name, overrides, depth + 1)
            elif entry.kind.name == "GROUP":
                yield from group_configs(entry.cfg or {}, overrides, depth + 1)
            else:
                yield {**(entry.cfg or {"class": None}), **overrides}
        elif isinstance(item, dict) and "group" in item:
            entry = index.get(item["group"])
            if entry is not None and entry.kind.name == "GROUP":
                inline = {k: v for k, v in item.items() if k != "group"}
                yield from group_configs(entry.cfg or {}, {**overrides, **inline}, depth + 1)
            else:
                yield from group_configs(item, overrides, depth + 1)
        elif isinstance(item, dict) and "task" in item:
            entry = index.get(item["task"])
            if entry is None:  # an inline task
                yield {**overrides, **item}
            else:
                yield from member_configs(item["task"], {**overrides, **item}, depth + 1)
        else:
            yield None

    def group_configs(cfg: dict, overrides: dict, depth: int) -> Iterator[dict | None]:
        members = cfg.get("task")
        if not isinstance(members, list):
            yield None
            return
        own = {k: v for k, v in cfg.items() if k not in group_fields}
        for member in members:
            yield from member_configs(member, {**own, **overrides}, depth)

    configs = [cfg for task in tasks for cfg in member_configs(task, {}, 0)]
    return bool(configs) and all(cfg is not None and _task_is_local(cfg) for cfg in configs)


_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@contextlib.contextmanager
def offline_if_local(tasks: Sequence[str], manager) -> Iterator[bool]:
    """Inside, huggingface_hub and datasets are offline when every task's data is local and the
    user has not set the variable; on the way out everything is as it was. Yields whether
    anything was switched."""
    unset = [name for name in _SWITCHES if name not in os.environ]
    if not unset:
        log.debug("offline: %s set by the user; left as they are", " and ".join(_SWITCHES))
        yield False
        return
    if not tasks_are_local(tasks, manager):
        log.debug("offline: not switched: the data of %s is not known to be local", ", ".join(tasks))
        yield False
        return
    log.debug("offline: every task's data is local; %s set while scoring", " and ".join(unset))
    saved_env = {name: os.environ.get(name) for name in _SWITCHES}
    for name in unset:
        os.environ[name] = "1"
    # imported after the variables are set: a first import reads them; an earlier one needs its constants set
    from datasets import config as datasets_config
    from huggingface_hub import constants as hub_constants

    attributes = []
    if "HF_HUB_OFFLINE" in unset:
        attributes.append((hub_constants, "HF_HUB_OFFLINE"))
    if "HF_DATASETS_OFFLINE" in unset:
        attributes += [(datasets_config, "HF_HUB_OFFLINE"), (datasets_config, "HF_DATASETS_OFFLINE")]
    saved = [(module, name, getattr(module, name)) for module, name in attributes]
    try:
        for module, name in attributes:
            setattr(module, name, True)
        yield True
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

"""Multi-document configs (mergekit-multi style): each document is a merge; documents with a
``name:`` are intermediate stages that later documents use as model paths; the one unnamed
document is the final output. Stages run in dependency order."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relex_merge.common.errors import RelexError
from relex_merge.config.schema import parse_config
from relex_merge.config.trajectory import expand_trajectory

__all__ = ["MODEL_KEYS", "Stage", "parse_stages", "model_references", "substitute", "expanded_yaml"]

# Keys whose string values name a model in relex and mergekit configs.
MODEL_KEYS = ("base_model", "model", "tokenizer_source")


@dataclass(frozen=True)
class Stage:
    """One document of a (multi-document) config, with the stages it uses as inputs."""

    name: str | None  # None: the final output
    number: int  # 1-based position in the file, for messages
    document: dict  # as parsed; stage names not yet replaced by paths
    depends_on: tuple[str, ...]  # names of the stages it uses as models

    @property
    def method(self) -> str:
        """The document's ``merge_method`` (relex or a mergekit method)."""
        return self.document["merge_method"]

    @property
    def label(self) -> str:
        """How messages name the stage: ``document 2 (stage 'a')``."""
        return f"document {self.number}" + (f" (stage '{self.name}')" if self.name else "")


def model_references(value: Any, key: str | None = None) -> Iterable[str]:
    """Every string a config uses as a model (base_model, model, tokenizer_source values)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from model_references(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from model_references(v, key)
    elif isinstance(value, str) and key in MODEL_KEYS:
        yield value


def substitute(value: Any, paths: dict[str, str], key: str | None = None) -> Any:
    """A copy of ``value`` with stage names replaced by their output paths."""
    if isinstance(value, dict):
        return {k: substitute(v, paths, k) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, paths, key) for v in value]
    if isinstance(value, str) and key in MODEL_KEYS and value in paths:
        return paths[value]
    return value


def parse_stages(documents: list[Any], source: str, known_methods: Iterable[str]) -> list[Stage]:
    """Validate the documents and return them as stages in an order that runs dependencies first."""
    known = set(known_methods)
    stages: list[Stage] = []
    names: set[str] = set()
    for number, doc in enumerate(documents, 1):
        where = f"{source}: document {number}" if len(documents) > 1 else source
        if not isinstance(doc, dict):
            raise RelexError(f"{where}: expected a YAML mapping")
        method = doc.get("merge_method")
        if not isinstance(method, str):
            near = difflib.get_close_matches("merge_method", [str(k) for k in doc], n=1)
            typo = f"; is '{near[0]}' a misspelling of it?" if near and near[0] != "merge_method" else ""
            raise RelexError(f"{where}: merge_method: required (relex or a mergekit method){typo}")
        if method not in known:
            raise RelexError(f"{where}: merge_method: unknown method {method!r} (known: {', '.join(sorted(known))})")
        name = doc.get("name")
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise RelexError(f"{where}: name: expected a short stage name without '/'")
        if name in names:
            raise RelexError(f"{where}: name: stage '{name}' is defined twice")
        if name is not None:
            names.add(name)
        stages.append(Stage(name, number, doc, ()))
    finals = [s for s in stages if s.name is None]
    if len(stages) > 1 and len(finals) != 1:
        raise RelexError(
            f"{source}: a multi-document config needs exactly one document without 'name:' "
            f"(the final output); found {len(finals)}"
        )
    resolved = []
    for stage in stages:
        deps = []
        for ref in model_references({k: v for k, v in stage.document.items() if k != "name"}):
            if ref in names:
                if ref == stage.name:
                    raise RelexError(f"{source}: {stage.label} uses itself as an input")
                deps.append(ref)
            elif len(stages) > 1 and not Path(ref).exists():
                near = difflib.get_close_matches(ref, sorted(names), n=1)
                hint = f" (did you mean stage '{near[0]}'?)" if near else ""
                raise RelexError(f"{source}: {stage.label}: '{ref}' is neither a stage name nor an existing path{hint}")
        resolved.append(Stage(stage.name, stage.number, stage.document, tuple(dict.fromkeys(deps))))
    return _topological(resolved, source)


def _topological(stages: list[Stage], source: str) -> list[Stage]:
    by_name = {s.name: s for s in stages if s.name is not None}
    order: list[Stage] = []
    state: dict[int, str] = {}  # number -> "visiting" | "done"

    def visit(stage: Stage, path: list[str]) -> None:
        mark = state.get(stage.number)
        if mark == "done":
            return
        if mark == "visiting":
            cycle = path[path.index(stage.name or "final") :] + [stage.name or "final"]
            raise RelexError(f"{source}: stages form a cycle: {' -> '.join(cycle)}")
        state[stage.number] = "visiting"
        for dep in stage.depends_on:
            visit(by_name[dep], path + [stage.name or "final"])
        state[stage.number] = "done"
        order.append(stage)

    for stage in stages:
        visit(stage, [])
    return order


def expanded_yaml(documents: list[Any], source: str) -> str:
    """The config with every relex document's checkpoint list resolved (--print-config)."""
    import yaml

    texts = []
    for number, doc in enumerate(documents, 1):
        if isinstance(doc, dict) and doc.get("merge_method") == "relex":
            where = f"{source}: document {number}" if len(documents) > 1 else source
            texts.append(expand_trajectory(parse_config(doc, where)).to_yaml())
        else:
            texts.append(yaml.safe_dump(doc, sort_keys=False))
    return "---\n".join(texts)

"""The declared public API: the package root's lazy names and every module's ``__all__``."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import relex_merge


def _modules() -> list[str]:
    """Every module of the package except ``__main__`` (importing it is running the CLI's module)."""
    found = [info.name for info in pkgutil.walk_packages(relex_merge.__path__, "relex_merge.")]
    return sorted(name for name in found if not name.endswith("__main__"))


def test_every_name_of_the_package_root_resolves():
    for name in relex_merge.__all__:
        assert getattr(relex_merge, name) is not None, name
    namespace: dict = {}
    exec("from relex_merge import *", namespace)
    assert set(relex_merge.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        relex_merge.nonexistent  # noqa: B018


@pytest.mark.parametrize("name", _modules())
def test_every_module_declares_names_that_exist(name):
    module = importlib.import_module(name)
    declared = getattr(module, "__all__", None)
    assert declared is not None, f"{name} has no __all__"
    assert len(declared) == len(set(declared)), f"{name}.__all__ lists a name twice"
    missing = [n for n in declared if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"


def test_the_docstrings_import_line_gives_the_functions():
    """Issue 23, finding 1: ``from relex_merge import analyze, ...`` once gave the submodules of
    the same names (``analyze(...)`` -> 'module' object is not callable)."""
    import inspect

    namespace: dict = {}
    exec("from relex_merge import Options, run_merge, analyze, sweep, evaluate, convert", namespace)
    for name in ("run_merge", "analyze", "sweep", "evaluate", "convert"):
        assert inspect.isfunction(namespace[name]), (name, namespace[name])
    assert inspect.isclass(namespace["Options"])

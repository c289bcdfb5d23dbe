"""Plug-in folders: every extension point of relex-merge is a package whose modules each define
one plug-in under an agreed attribute name (``FAMILY``, ``FORMAT``, ``EXECUTOR``, ``SINK``,
``COMMAND``). A ``Registry`` finds them on first use, so adding a fit family, a checkpoint
format, an executor, an output format or a command is one new file in that folder.

Rules every registry applies:
- modules whose name starts with ``_`` are the folder's own helpers, not plug-ins;
- any other module must define the attribute, as an instance of the declared type;
- two plug-ins may not share a name (and whatever else ``check`` refuses).

Discovery is lazy (the first lookup imports the folder), so importing a registry costs nothing
and a plug-in may import the package that holds the registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """The plug-ins of one folder (``package``), each a module's ``attribute``."""

    def __init__(
        self,
        package: str,
        attribute: str,
        kind: type,
        what: str,
        *,
        name: Callable[[T], str] = lambda plugin: plugin.name,  # type: ignore[attr-defined]
        order: Callable[[T], object] | None = None,
        check: Callable[[list[T], T], None] | None = None,
    ):
        self.package = package
        self.attribute = attribute
        self.kind = kind
        self.what = what  # for messages: "fit family", "checkpoint format"
        self._name = name
        self._order = order
        self._check = check
        self._found: dict[str, T] | None = None

    def _discover(self) -> dict[str, T]:
        package = importlib.import_module(self.package)
        found: dict[str, T] = {}
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{self.package}.{info.name}")
            plugin = getattr(module, self.attribute, None)
            if not isinstance(plugin, self.kind):
                raise TypeError(f"{module.__name__} defines no {self.attribute} (a {self.kind.__name__})")
            key = self._name(plugin)
            if key in found:
                raise TypeError(f"{self.what} name {key!r} is taken")
            if self._check is not None:
                self._check(list(found.values()), plugin)
            found[key] = plugin
        if self._order is not None:
            found = dict(sorted(found.items(), key=lambda item: self._order(item[1])))
        return found

    def _all(self) -> dict[str, T]:
        if self._found is None:
            self._found = self._discover()
        return self._found

    def all(self) -> list[T]:
        """Every plug-in, in the registry's order."""
        return list(self._all().values())

    def names(self) -> list[str]:
        """Every plug-in's name, in the registry's order."""
        return list(self._all())

    def get(self, name: str) -> T:
        """The plug-in called ``name``; KeyError naming the known ones otherwise."""
        found = self._all()
        try:
            return found[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r} (known: {', '.join(found)})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._all()

    def reset(self) -> None:
        """Forget what was found: the next lookup scans the folder again (a plug-in added at
        run time, as the tests do)."""
        self._found = None

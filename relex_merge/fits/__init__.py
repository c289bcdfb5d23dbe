"""Fit families: the curve each direction's coefficient follows against the step.

Every module in this package (other than ``base``) defines one family as ``FAMILY``; the
registry below finds them, so adding a family is one new file. Config validation, the mergekit
method, the engine, backtests, ``fit: auto``, the model card and the plots all ask this registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from relex_merge.fits.base import BasisFamily, Curve, FitFamily, Shape

__all__ = ["AUTO", "FitFamily", "BasisFamily", "Curve", "Shape", "family", "names", "families", "shape_keys"]

AUTO = "auto"  # not a family: the backtest picks one per target


def _discover() -> dict[str, FitFamily]:
    found: dict[str, FitFamily] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        fam = getattr(module, "FAMILY", None)
        if not isinstance(fam, FitFamily):
            raise TypeError(f"{module.__name__} defines no FAMILY")
        if fam.name in found or fam.name == AUTO:
            raise TypeError(f"fit family name {fam.name!r} is taken")
        found[fam.name] = fam
    # the order ties are broken in: simpler first, then by name
    return dict(sorted(found.items(), key=lambda item: (item[1].complexity, item[0])))


_FAMILIES = _discover()


def families() -> list[FitFamily]:
    """Every registered family, simplest first."""
    return list(_FAMILIES.values())


def names() -> list[str]:
    """Every registered family's name, simplest first (``auto`` is not among them)."""
    return list(_FAMILIES)


def family(name: str) -> FitFamily:
    """The family registered as ``name``; KeyError naming the known ones otherwise."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown fit family {name!r} (known: {', '.join(_FAMILIES)}, or {AUTO})") from None


def shape_keys() -> list[str]:
    """Config keys of every family's shape parameter (degree, p, tau)."""
    return list(dict.fromkeys(f.shape.key for f in _FAMILIES.values() if f.shape is not None))

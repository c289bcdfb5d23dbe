"""Fit families: the curve each direction's coefficient follows against the step.

Every module in this package (other than ``_base``) defines one family as ``FAMILY``; the
registry below finds them, so adding a family is one new file. Config validation, the mergekit
method, the engine, backtests, ``fit: auto``, the model card and the plots all ask this registry.
"""

from __future__ import annotations

from relex_merge.common.registry import Registry
from relex_merge.core.fits._base import BasisFamily, Curve, DirectFamily, FitFamily, Shape, r_squared

__all__ = [
    "AUTO",
    "FitFamily",
    "BasisFamily",
    "DirectFamily",
    "Curve",
    "Shape",
    "r_squared",
    "REGISTRY",
    "family",
    "names",
    "families",
    "shape_keys",
    "shape_users",
    "shape_parameter",
]

AUTO = "auto"  # not a family: the backtest picks one per target


def _not_auto(found: list[FitFamily], fam: FitFamily) -> None:
    if fam.name == AUTO:
        raise TypeError(f"fit family name {AUTO!r} is taken (fit: auto chooses among the families)")


# the order ties are broken in: simpler first, then by name
REGISTRY: Registry[FitFamily] = Registry(
    __name__, "FAMILY", FitFamily, "fit family", order=lambda fam: (fam.complexity, fam.name), check=_not_auto
)


def families() -> list[FitFamily]:
    """Every registered family, simplest first."""
    return REGISTRY.all()


def names() -> list[str]:
    """Every registered family's name, simplest first (``auto`` is not among them)."""
    return REGISTRY.names()


def family(name: str) -> FitFamily:
    """The family registered as ``name``; KeyError naming the known ones otherwise."""
    try:
        return REGISTRY.get(name)
    except KeyError:
        raise KeyError(f"unknown fit family {name!r} (known: {', '.join(names())}, or {AUTO})") from None


def shape_keys() -> list[str]:
    """Config keys of every family's shape parameter (degree, p, tau), in registry order."""
    return list(dict.fromkeys(f.shape.key for f in families() if f.shape is not None))


def shape_users(key: str) -> list[FitFamily]:
    """The families whose shape parameter is ``key``."""
    return [f for f in families() if f.shape is not None and f.shape.key == key]


def shape_parameter(key: str) -> tuple[bool, str]:
    """What a shape key is, from its families' declarations: (whole numbers only, description)
    -- what the config schema and the mergekit method are generated from."""
    users = shape_users(key)
    integer = {f.shape.integer for f in users}
    if len(integer) != 1:
        raise TypeError(f"shape parameter {key!r}: its families disagree on whether it is an integer")
    parts = []
    for f in users:
        default = f"default {f.shape.default:g}" if f.shape.default is not None else "default: chosen by the backtest"
        parts.append(f"{f.name}: {f.shape.meaning} ({default})")
    return integer.pop(), "; ".join(parts)

"""Sizes and byte counts as people write and read them: ``8GB``, ``512MiB``, ``1.2 GB``."""

from __future__ import annotations

import re

from relex_merge.common.errors import RelexError

__all__ = ["parse_size", "human_bytes", "default_max_memory", "horizon_text"]

# the unit: an optional prefix (binary with an i), then an optional b; "i" alone is no unit
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(text: str | int, what: str) -> int:
    """Bytes in ``text`` (decimal units: 8GB = 8e9; binary: 8GiB); ``what`` names the option
    or key in the one-line error."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise RelexError(f"{what}: cannot read size {text!r} (examples: 8GB, 512MiB, 1000000)")
    unit = (match.group(2) or "").lower()
    return int(float(match.group(1)) * _UNITS[unit])


def human_bytes(n: float) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as parse_size reads them)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.2f} TB"


def default_max_memory() -> int:
    """Half the memory available now, at least 256 MiB: the default --max-memory."""
    import psutil

    return max(256 * 1024**2, int(psutil.virtual_memory().available * 0.5))


def horizon_text(h: float) -> str:
    """A horizon (in window or fit spans) as every output prints it, the verdict line's way:
    ``1.1x`` (one decimal, no space)."""
    return f"{h:.1f}x"

"""Fingerprints of a model's weight files: what the model card lists and what the fit cache (and
every "is this the same input?" check) compares. Sampled (head, middle, tail) by default, or every
byte with --full-hash."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["InputRecord", "input_record"]

_SAMPLE = 1 << 20


@dataclass(frozen=True)
class InputRecord:
    """One input as the model card lists it (and the fit cache checks it)."""

    path: str  # as the config gives it
    bytes: int  # of its weight files
    fingerprint: str  # "fast:<sha256 of sizes and samples>" or "sha256:<of every byte>"


def _file_digest(file: Path, full: bool) -> bytes:
    digest = hashlib.sha256()
    size = file.stat().st_size
    digest.update(f"{file.name}:{size}".encode())
    with open(file, "rb") as f:
        if full:
            for block in iter(lambda: f.read(16 * _SAMPLE), b""):
                digest.update(block)
        else:  # head, middle and tail: catches truncation, re-saves and most edits in ms
            for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                f.seek(offset)
                digest.update(f.read(_SAMPLE))
    return digest.digest()


def input_record(path: str, files: Sequence[Path], full_hash: bool) -> InputRecord:
    """Size and fingerprint of one input's weight files: sampled (fast) unless ``full_hash``."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(_file_digest(file, full_hash))
    kind = "sha256" if full_hash else "fast"
    return InputRecord(path, sum(f.stat().st_size for f in files), f"{kind}:{digest.hexdigest()[:32]}")

"""Giving back the pages of a memory-mapped file once a span of it has been copied out.

torch.load(mmap=True) maps a checkpoint file privately; every page a read touches then counts in
the process's resident memory until the mapping goes, which for a pickled checkpoint (one
mapping per file, alive as long as the reader) is the end of the run. Readers that copy spans
out of such mappings call ``FileMappings.release`` afterwards: the span's whole pages are
dropped from this process (madvise MADV_DONTNEED), so resident memory stays near one span
whatever the file's size. A later read of the same bytes faults them in again from the page
cache or the disk.

Only pages that /proc/self/maps shows to lie in a private mapping of that very file are
released, and readers never write to those mappings (they copy spans out): a page of anonymous
memory, or one written since it was mapped, would be zeroed or reverted by MADV_DONTNEED, so
any address outside the file's mappings is left alone. Where there is no /proc or no libc (not
Linux), nothing is released and reads work as before.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import mmap
import os
import threading
from pathlib import Path

import torch

__all__ = ["FileMappings"]

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4  # the same value on every Linux architecture
_PAGE = mmap.PAGESIZE


def _libc():
    if not os.path.exists("/proc/self/maps"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


_LIBC = _libc()


class FileMappings:
    """The private mappings of one file in this process (torch.load maps ``rw-p``, copy on
    write, and nothing writes to them), found on first use, after the file has been mapped.
    Thread-safe."""

    def __init__(self, file: Path):
        self.file = os.path.realpath(file)
        self._ranges: list[tuple[int, int]] | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether this platform can release pages at all."""
        return _LIBC is not None

    def _find(self) -> list[tuple[int, int]]:
        ranges = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    parts = line.split(maxsplit=5)
                    # address perms offset dev inode path; perms "rw-p": readable, private
                    if len(parts) == 6 and parts[5].rstrip("\n") == self.file:
                        perms = parts[1]
                        if perms[0] == "r" and perms[3] == "p":
                            lo, hi = (int(x, 16) for x in parts[0].split("-"))
                            ranges.append((lo, hi))
        except OSError:
            pass
        return sorted(ranges)

    def release(self, tensor: torch.Tensor, start: int, stop: int) -> None:
        """Drop the whole pages of elements ``[start, stop)`` of ``tensor`` (a view into a
        mapping of this file) from this process; anything else is left alone."""
        if _LIBC is None or stop <= start:
            return
        size = tensor.element_size()
        address = tensor.data_ptr() + start * size
        lo = -(-address // _PAGE) * _PAGE  # only whole pages inside the span
        hi = (address + (stop - start) * size) // _PAGE * _PAGE
        if hi <= lo:
            return
        ranges = self._ranges
        if ranges is None or not _inside(ranges, lo, hi):
            with self._lock:  # the file may have been mapped again since: look once more
                self._ranges = ranges = self._find()
        if _inside(ranges, lo, hi):
            _LIBC.madvise(lo, hi - lo, _MADV_DONTNEED)


def _inside(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    i = bisect.bisect_right(ranges, (lo, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= lo and hi <= ranges[i][1]

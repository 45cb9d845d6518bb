"""Handing freed memory back to the operating system.

glibc keeps freed heap memory for reuse, and raises its threshold for serving large allocations from
their own maps each time such a map is freed: the float copies that loading frees (a block's weights
before quantization, a projection before fusion) stay in the heap and count in the process's resident
memory. :func:`trim_heap` returns them; it costs a pass over the heap (about a millisecond for a
node's heap here), so the loader calls it when the process grew by some MiB (:class:`HeapTrimmer`),
not after every tensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys

_libc: ctypes.CDLL | None = None


def trim_heap(collect: bool = True) -> None:
    """Collect garbage (unless ``collect`` is false: a full collection takes longer than the trim), then
    give the heap's free memory back to the system (glibc only; else a no-op)."""
    global _libc
    if collect:
        gc.collect()
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)


def resident_bytes() -> int | None:
    """This process's resident memory now (from /proc/self/statm), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Trims the heap whenever the process grew by ``every`` bytes since the last trim: the garbage that
    converting a part leaves (unpacked values, float copies) is several times what the part keeps, so
    counting what was read would let it pile up. Without /proc, trims every ``every`` bytes read."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._base = resident_bytes()
        self._read = 0

    def after(self, read: int) -> None:
        """Call after each part is loaded, with the bytes it read."""
        self._read += read
        now = resident_bytes()
        if (now - self._base if now is not None and self._base is not None else self._read) >= self.every:
            self.trim()

    def trim(self, collect: bool = False) -> None:
        """Trim now; ``collect``: run a full garbage collection first (reference cycles)."""
        trim_heap(collect)
        self._base, self._read = resident_bytes(), 0

"""Handing freed memory back to the operating system.

glibc keeps freed heap memory for reuse, and raises its threshold for serving large allocations from
their own maps each time such a map is freed: the float copies that loading frees (a block's weights
before quantization, a projection before fusion) stay in the heap and count in the process's resident
memory. :func:`trim_heap` returns them; it costs a pass over the heap (about a millisecond for a
node's heap here), so the loader calls it once per block, not per tensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys

_libc: ctypes.CDLL | None = None


def trim_heap() -> None:
    """Collect garbage, then give the heap's free memory back to the system (glibc only; else a no-op)."""
    global _libc
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)

"""Handing freed heap memory back to the OS between the large, short-lived buffers of alignment and generation.

glibc raises its mmap threshold after a large buffer is freed (up to 32 MiB), so the next buffers of a few
MiB (a cost matrix, one layer's tokens) come from the heap, and once freed they stay resident: generating
from ResNet-50-sized teachers then peaks hundreds of MiB above what it holds. `malloc_trim(0)` returns
those free pages; it changes no allocator setting, so the rest of the process keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache


@cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries: nothing to trim
        return None


def release_free_memory() -> None:
    """Return free heap pages to the OS (glibc `malloc_trim(0)`); a no-op where it is unavailable."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

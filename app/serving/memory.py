"""The process's native heap: glibc malloc's own statistics, returning freed memory to the OS, and the arena count.

A CPU forward pass allocates activations whose sizes follow each batch's shape. glibc keeps what is freed in its
arenas for reuse (one arena per thread that allocated, up to 8 per core), so after a busy period resident memory
stays at the high-water mark of every arena although the memory is free: RELIABILITY.md's soak measured the
growth and what these controls do to it. ``mallinfo2`` says how much of the heap is in use and how much is free
but held; ``malloc_trim(0)`` hands the free pages back; ``mallopt(M_ARENA_MAX)`` caps the arenas.

Owns: reading those statistics and calling those two functions (a no-op where the C library is not glibc).
Must not: know the model, the batcher or HTTP; callers decide when to trim (the service: every
``SAFT_MALLOC_TRIM_INTERVAL_S``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from pathlib import Path

_M_ARENA_MAX = -8  # glibc's malloc.h


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _load_glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):  # musl, macOS, or a glibc older than 2.33 (no mallinfo2)
        return None
    return libc


_LIBC = _load_glibc()


@dataclass(frozen=True, slots=True)
class HeapStats:
    """Bytes of glibc's heap: in use by the program, free but held by malloc, and in mmapped blocks."""

    in_use: int
    free: int
    mmapped: int


def heap_stats() -> HeapStats | None:
    """glibc's ``mallinfo2`` summed over all arenas; None without glibc."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return HeapStats(in_use=int(info.uordblks), free=int(info.fordblks), mmapped=int(info.hblkhd))


def resident_bytes() -> int | None:
    """This process's resident set (VmRSS), or None where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def trim() -> bool:
    """Return the heap's free pages to the OS (``malloc_trim(0)``); whether anything was released."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False


def limit_arenas(n: int) -> bool:
    """Cap glibc's arenas at ``n`` (0: leave glibc's default); call before threads start. Whether it took effect."""
    if n <= 0 or _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_ARENA_MAX, n))

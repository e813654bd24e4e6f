"""The process's native heap: glibc malloc's own statistics, returning freed memory to the OS, and the arena count.

A CPU forward pass allocates activations whose sizes follow each batch's shape. glibc keeps what is freed in its
arenas for reuse (one arena per thread that allocated, up to 8 per core), so after a busy period resident memory
stays at the high-water mark of every arena although the memory is free: RELIABILITY.md's soak measured the
growth and what these controls do to it. ``mallinfo2`` says how much of the heap is in use and how much is free
but held; ``malloc_trim(0)`` hands the free pages back; ``mallopt(M_ARENA_MAX)`` caps the arenas.

glibc's heap still grows where every request runs the model (RELIABILITY.md); jemalloc returns freed memory by itself,
so ``saft serve`` prefers it where it is installed: ``preload_jemalloc`` says how to re-execute with it preloaded.

Owns: reading those statistics and calling those two functions (a no-op where the C library is not glibc), and
finding jemalloc (which allocator this process runs on, the library's path, the environment that preloads it).
Must not: know the model, the batcher or HTTP; callers decide when to trim (the service: every
``SAFT_MALLOC_TRIM_INTERVAL_S``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # glibc's malloc.h
#: Where Debian's libjemalloc2 puts the library (x86_64, arm64), then the linker's search.
_JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")


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
    """glibc's ``mallinfo2`` summed over all arenas; None without glibc's allocator (jemalloc preloaded: glibc's heap
    is then unused and its statistics say nothing)."""
    if _LIBC is None or allocator() == "jemalloc":
        return None
    info = _LIBC.mallinfo2()
    return HeapStats(in_use=int(info.uordblks), free=int(info.fordblks), mmapped=int(info.hblkhd))


def resident_bytes(pid: int | None = None) -> int | None:
    """The resident set (VmRSS) of process ``pid`` (None: this one), or None where /proc or the process is not there."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
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


async def trim_every(interval_s: float, on_trim: Callable[[], None] = lambda: None) -> None:
    """Every ``interval_s`` until cancelled, ``trim()`` in a worker thread (off the event loop), then ``on_trim()``."""
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(trim)
        on_trim()


@functools.cache
def allocator() -> str:
    """The C allocator this process runs on: "jemalloc" where that library is mapped (preloaded), else "glibc"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def jemalloc_path() -> str | None:
    """The installed jemalloc library, or None."""
    for path in _JEMALLOC_PATHS:
        if Path(path).is_file():
            return path
    found = ctypes.util.find_library("jemalloc")
    return found if found and Path(found).is_absolute() else None


#: Set in the environment of the re-executed process: it never re-executes again, whatever it finds.
REEXEC_MARK = "SAFT_ALLOCATOR_REEXEC"


def preload_jemalloc(choice: str, env: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute this process with so that it runs on jemalloc, or None to go on as it is.

    ``choice``: "glibc" (None), "jemalloc" (``RuntimeError`` if it is not installed or did not load), "auto" (jemalloc
    if installed, on Linux, and the operator preloads nothing else). None too when jemalloc is loaded already. The
    re-executed process carries ``REEXEC_MARK``, so a library that failed to preload is reported, never retried."""
    if choice == "glibc" or allocator() == "jemalloc":
        return None
    if env.get(REEXEC_MARK):
        if choice == "jemalloc":
            raise RuntimeError(f"SAFT_ALLOCATOR=jemalloc: {env.get('LD_PRELOAD')!r} was preloaded but jemalloc is not "
                               "this process's allocator (the dynamic linker ignored it; see its message above)")
        log.warning("jemalloc was preloaded (%s) but did not load; running on glibc", env.get("LD_PRELOAD"))
        return None
    if not sys.platform.startswith("linux") or (choice == "auto" and env.get("LD_PRELOAD")):
        return None  # LD_PRELOAD is Linux's; an operator's own preload (tcmalloc, mimalloc) is theirs to keep
    path = jemalloc_path()
    if path is None:
        if choice == "jemalloc":
            raise RuntimeError("SAFT_ALLOCATOR=jemalloc, but no jemalloc library is installed (Debian: apt-get install "
                               f"libjemalloc2; looked in {', '.join(_JEMALLOC_PATHS)} and the linker's path)")
        return None
    preload = env.get("LD_PRELOAD", "")
    return {**env, "LD_PRELOAD": f"{path} {preload}".strip(), REEXEC_MARK: "1"}

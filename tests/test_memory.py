"""The heap controls of ``app.serving.memory`` against this process's real glibc: statistics, trim, arena cap."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.serving.memory import heap_stats, limit_arenas, resident_bytes, trim


def test_heap_stats_see_a_freed_block_and_trim_returns_it() -> None:
    before = heap_stats()
    if before is None:
        pytest.fail("glibc's mallinfo2 is not available on this machine (the service's image and CI use glibc)")
    # 4,000 blocks of 64 KiB (below the mmap threshold: they live in the heap); free every other one, so the free
    # memory lies between live blocks, where glibc's own trimming of the heap's top cannot reach it
    blocks = [ctypes.create_string_buffer(64 * 1024) for _ in range(4000)]
    grown = heap_stats()
    assert grown is not None and grown.in_use >= before.in_use + 200 * 2**20
    del blocks[::2]
    freed = heap_stats()
    rss_freed = resident_bytes()
    assert freed is not None and freed.in_use < grown.in_use - 100 * 2**20 and freed.free >= grown.free + 100 * 2**20
    assert trim()
    rss_trimmed = resident_bytes()
    # the free pages went back to the OS: resident memory falls by most of the 125 MiB freed
    assert rss_freed is not None and rss_trimmed is not None and rss_trimmed < rss_freed - 80 * 2**20, (rss_freed, rss_trimmed)
    assert len(blocks) == 2000  # the live half stays (and keeps the heap from shrinking on its own)


def test_limit_arenas_takes_a_positive_cap_and_ignores_zero() -> None:
    assert limit_arenas(8)  # this process: a cap above what it uses changes nothing for the other tests
    assert not limit_arenas(0)


def test_the_allocator_choice_preloads_jemalloc_only_where_asked_and_installed(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from app.serving import memory

    library = tmp_path / "libjemalloc.so.2"
    monkeypatch.setattr(memory, "_JEMALLOC_PATHS", (str(library),))
    monkeypatch.setattr(memory.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(memory, "allocator", lambda: "glibc")
    # Not installed: auto stays on glibc, an explicit choice is a clear error naming what to install.
    assert memory.preload_jemalloc("auto", {}) is None and memory.preload_jemalloc("glibc", {}) is None
    with pytest.raises(RuntimeError, match="SAFT_ALLOCATOR=jemalloc, but no jemalloc library is installed.*libjemalloc2"):
        memory.preload_jemalloc("jemalloc", {})
    # Installed: auto and jemalloc preload it (before any preload the operator set), glibc does not.
    library.write_bytes(b"")
    mark = memory.REEXEC_MARK
    assert memory.preload_jemalloc("auto", {"A": "1"}) == {"A": "1", "LD_PRELOAD": str(library), mark: "1"}
    assert memory.preload_jemalloc("jemalloc", {"LD_PRELOAD": "/x.so"}) == {"LD_PRELOAD": f"{library} /x.so", mark: "1"}
    assert memory.preload_jemalloc("auto", {"LD_PRELOAD": "/x.so"}) is None  # the operator's own preload stays alone
    assert memory.preload_jemalloc("glibc", {}) is None
    # Re-executed, yet not on jemalloc (the linker ignored the library): never again; an explicit choice says so.
    assert memory.preload_jemalloc("auto", {mark: "1", "LD_PRELOAD": str(library)}) is None
    with pytest.raises(RuntimeError, match="was preloaded but jemalloc is not this process's allocator"):
        memory.preload_jemalloc("jemalloc", {mark: "1", "LD_PRELOAD": str(library)})
    # Already running on it (the re-executed server): nothing more to do.
    monkeypatch.setattr(memory, "allocator", lambda: "jemalloc")
    assert memory.preload_jemalloc("jemalloc", {}) is None


def test_saft_serve_runs_on_jemalloc_or_says_why_not() -> None:
    """On this machine, for real: with jemalloc installed, a process started with ``preload_jemalloc``'s environment
    runs on it (and glibc's statistics are not reported for it); without it, ``saft serve`` asked for jemalloc exits
    with an error that names the setting, before it serves."""
    from app.serving.memory import jemalloc_path, preload_jemalloc

    if jemalloc_path() is not None:
        env = preload_jemalloc("jemalloc", {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
        assert env is not None
        code = "from app.serving.memory import allocator, heap_stats; print(allocator(), heap_stats())"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert out.stdout.split() == ["jemalloc", "None"], out.stderr
    else:
        out = subprocess.run([sys.executable, "-m", "app.cli", "serve"], env={**os.environ, "SAFT_ALLOCATOR": "jemalloc"},
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode != 0 and "SAFT_ALLOCATOR" in out.stderr and "libjemalloc2" in out.stderr, out.stderr

"""The heap controls of ``app.serving.memory`` against this process's real glibc: statistics, trim, arena cap."""

from __future__ import annotations

import ctypes

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

"""A short, bounded version of bench/soak.py (about a minute): at and beyond capacity and back.

The long soak (several minutes, figures in RELIABILITY.md) is ``python -m bench.soak``. Timings are
measured there, never asserted here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from app.launcher import start_server, stop_server
from bench.soak import SERVER_ENV, Phase, run_phases
from tests.support import metric_value


@pytest.mark.slow
def test_overload_sheds_with_retry_after_and_recovers(tmp_path: Path) -> None:
    proc, url = start_server({**SERVER_ENV, "SAFT_LOG_LEVEL": "INFO"}, tmp_path / "server.log")  # it reads the allocator line
    try:
        # warm-up with full batches, so the allocator has seen the largest ones before memory is compared
        phases = [Phase("warm-up", 10, 8), Phase("beyond capacity", 20, 32), Phase("recovery", 10, 2)]
        # 10% of requests are small /filter streams: they stand in line for room and are never starved by /score
        warm, over, recovery = asyncio.run(run_phases(url, phases, proc.pid, filter_share=0.1))
        for phase in (warm, over, recovery):
            summary = phase.summary()
            assert not any(code >= 500 for code in phase.statuses), summary
            assert set(phase.statuses) <= {200, 429}, summary
            assert not phase.transport_errors and phase.wrong_results == 0, summary  # no /filter timed out or lost a line
            assert phase.missing_retry_after == 0, summary  # every 429 says when to come back
        assert over.statuses[429] > 0 and over.statuses[200] > 0, over.summary()  # load shed, not collapse
        assert recovery.statuses[429] == 0 and recovery.statuses[200] > 0, recovery.summary()  # back to normal
        assert httpx.get(f"{url}/readyz").json()["queue_depth"] == 0
        trims = metric_value(httpx.get(f"{url}/metrics").text, "saft_heap_trims_total")
        if "C allocator: glibc" in (tmp_path / "server.log").read_text():
            assert trims >= 2  # every SAFT_MALLOC_TRIM_INTERVAL_S (10 s) over 40 s
        else:  # jemalloc (preloaded by saft serve where installed) returns freed pages itself: no trim loop
            assert "C allocator: jemalloc" in (tmp_path / "server.log").read_text() and trims == 0
        growth = recovery.rss_mb[-1] - warm.rss_mb[-1]
        print(f"RSS after warm-up {warm.rss_mb[-1]} MB, at the end {recovery.rss_mb[-1]} MB (growth {growth:+.1f} MB)")
        print([p.summary() for p in (warm, over, recovery)])
        assert growth < 100, (warm.rss_mb, over.rss_mb, recovery.rss_mb)  # +56.5 MB before heap trimming; a leak per request would show
    finally:
        stop_server(proc)

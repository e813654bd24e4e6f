"""The soak's memory curves (RELIABILITY.md, Memory): resident memory, heap in use, free heap held and the cache.

    python docs/reports/memory-r1/plot.py   # reads the soak JSONs beside it, writes memory.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = [("soak-5min-untrimmed.json", "5 min, before: no trim, glibc's arenas"),
        ("soak-30min.json", "30 min, after (trim every 10 s, 2 arenas)"),
        ("soak-30min-cache-off.json", "30 min, after, cache off (every item runs the model)"),
        ("soak-30min-cache-off-jemalloc.json", "30 min, cache off, jemalloc (glibc's heap gauges unused: 0)"),
        ("soak-30min-cache-off-async-deps.json", "30 min, cache off, jemalloc, async dependencies, warm-up with a peak")]


def main() -> None:
    fig, axes = plt.subplots(1, len(RUNS), figsize=(26, 4.5), sharey=True)
    for ax, (name, title) in zip(axes, RUNS, strict=True):
        report = json.loads((HERE / name).read_text())
        curve = report["curve"]
        t = [s["t"] / 60 for s in curve]
        base = curve[0]["rss_mb"]
        for key, label in (("rss_mb", "resident (VmRSS)"), ("heap_in_use_mb", "heap in use"),
                           ("heap_free_mb", "heap free, held by malloc"), ("cache_mb", "embedding cache")):
            start = curve[0].get(key, 0.0) if key != "rss_mb" else base
            ax.plot(t, [s.get(key, float("nan")) - start for s in curve], label=label)
        ends = {}
        for s in curve:
            ends[s["phase"]] = s["t"] / 60
        for phase_end in list(ends.values())[:-1]:
            ax.axvline(phase_end, color="grey", lw=0.6, ls=":")
        ax.set_title(f"{title}\nRSS growth after warm-up {report['rss_growth_after_warm_up_mb']:+.1f} MB", fontsize=9)
        ax.set_xlabel("minutes (dotted: phase ends)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MB above the first sample")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "memory.png", dpi=110)


if __name__ == "__main__":
    main()

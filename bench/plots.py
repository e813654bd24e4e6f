"""PNG plots of bench/results.json for BENCHMARKS.md (one per benchmark that has results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bench.common import RESULTS, ROOT

OUT = ROOT / "docs" / "bench"


def _core(ax: Any, r: dict[str, Any]) -> None:
    sizes = r["by_batch_size"]
    ax.plot([x.get("max_batch_size", x.get("batch_size")) for x in sizes], [x["fraction_of_matmul"] for x in sizes], "o-", label="by batch size")
    budgets = r.get("by_token_budget") or []
    if budgets:
        ax2 = ax.twiny()
        ax2.plot([x["max_batch_tokens"] for x in budgets], [x["fraction_of_matmul"] for x in budgets], "s--", color="tab:orange",
                 label="by token budget")
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("padded-token budget (batch size ≤ 256)", color="tab:orange")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max batch size (no token budget)")
    ax.set_ylabel("achieved GFLOP/s ÷ fp32 matmul GFLOP/s")
    ax.axhline(0.8, color="grey", ls=":", lw=1)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"core vs matmul ({r['matmul_gflops']} GFLOP/s), {r['blocks_run']} blocks", fontsize=10)


def _service(ax: Any, r: dict[str, Any]) -> None:
    rows = r["by_concurrency"]
    xs = [str(x["concurrency"]) for x in rows]
    ax.bar(xs, [x["ratio_to_core"] for x in rows], color="tab:blue")
    for i, x in enumerate(rows):
        ax.text(i, x["ratio_to_core"] + 0.02, f"{x['ratio_to_core']:.2f}\np50 {x['p50_ms'] / 1000:.1f}s\np99 {x['p99_ms'] / 1000:.1f}s",
                ha="center", fontsize=7)
    ax.axhline(0.85, color="grey", ls=":", lw=1)
    ax.set_ylim(0, 1.35)
    ax.set_xlabel("client concurrency")
    ax.set_ylabel("service texts/s ÷ core texts/s")
    ax.set_title("service vs the core in-process, same texts (core runs bracket each level)", fontsize=10)


def _pairs(ax: Any, labels: list[str], a: list[float], b: list[float], names: tuple[str, str], ylabel: str, title: str) -> None:
    import numpy as np

    x = np.arange(len(labels))
    ax.bar(x - 0.2, a, 0.4, label=names[0])
    ax.bar(x + 0.2, b, 0.4, label=names[1])
    ax.set_xticks(x, labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def plots(
    results: Annotated[Path, typer.Option(help="Results file to plot.")] = RESULTS,
    out: Annotated[Path, typer.Option(help="Directory of the PNGs.")] = OUT,
) -> None:
    """Write one PNG per benchmark with results (core, service, batching, peer, layers, cache, refit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def figure(name: str, draw: Any, *args: Any) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        draw(ax, *args)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(str(out / f"{name}.png"))

    core = data.get("core-cpu-quiet") or data.get("core-cpu")  # the quiet reference run when there is one
    if core:
        figure("core", _core, core)
    if "service-vs-core" in data:
        figure("service", _service, data["service-vs-core"])
    if "batching" in data:
        rows = data["batching"]["by_concurrency"]
        figure("batching", _pairs, [f"c={r['concurrency']}" for r in rows], [r["on_texts_per_s"] for r in rows],
               [r["off_texts_per_s"] for r in rows], ("batching on", "off (batch size 1)"), "texts/s", "service: batching on vs off")
    if "peer-infinity" in data:
        rows = data["peer-infinity"]["by_concurrency"]
        figure("peer", _pairs, [f"c={r['concurrency']}" for r in rows], [r["saft_texts_per_s"] for r in rows],
               [r["peer_texts_per_s"] for r in rows], ("saft-filter (embed + score)", "infinity-emb (embed)"), "texts/s",
               "all-MiniLM-L6-v2 over HTTP, CPU fp32")
    if "layers" in data:
        r = data["layers"]
        figure("layers", _pairs, ["texts/s"], [r["chosen_texts_per_s"]], [r["full_texts_per_s"]],
               (f"blocks 1..{r['blocks_chosen']} (layer {r['chosen_layer']})", f"all {r['blocks_full']} blocks"), "texts/s",
               f"layer truncation: {r['speedup']}x")
    if "cache" in data:
        r = data["cache"]
        figure("cache", _pairs, [f"c={r['concurrency']}"], [r["on"]["texts_per_s"]], [r["off"]["texts_per_s"]],
               ("cache on", "cache off"), "texts/s", f"{round(100 * r['duplicate_share'])}% duplicates: {r['speedup']}x")
    if "refit" in data:
        r = data["refit"]

        def draw(ax: Any) -> None:
            ns = [x["n"] for x in r["by_n"]]
            ax.plot(ns, [x["peak_rss_mb"] for x in r["by_n"]], "o-", label="peak RSS (MB)")
            ax.set_xscale("log")
            ax.set_xlabel("calibration samples N")
            ax.set_ylabel("peak RSS (MB)")
            ax.set_ylim(0, max(x["peak_rss_mb"] for x in r["by_n"]) * 1.3)
            ax2 = ax.twinx()
            ax2.plot(ns, [x["seconds"] for x in r["by_n"]], "s--", color="tab:orange")
            ax2.set_ylabel("fit seconds", color="tab:orange")
            ax.set_title(f"streaming refit, d={r['dim']}: memory flat, time linear", fontsize=10)

        figure("refit", draw)
    typer.echo("\n".join(written))

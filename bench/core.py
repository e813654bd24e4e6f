"""In-process benchmarks of the scoring core: the hardware limit, layer truncation and the GPU run."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from app.core.embedding import BatchLimits, Embedder, EmbeddingConfig, Encoded
from app.core.items import parse_item
from app.core.pipeline import DEFAULT_FIT_EMBEDDING
from bench.common import RESULTS, in_worker_thread, matmul_gflops, save, texts

ResultsOpt = Annotated[Path, typer.Option(help="Results file to merge into.")]

#: Where a CPU forward pass spends its time, by ATen op (self time, torch.profiler): the dense
#: projections are the part a matmul benchmark bounds; the rest is what keeps the core below it.
_OP_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn"),
    "attention": ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax", "aten::baddbmm"),
}


def block_params(embedder: Embedder, n_blocks: int) -> int:
    return sum(p.numel() for block in list(embedder._blocks)[:n_blocks] for p in block.parameters())


def attention_flops(embedder: Embedder, encoded: list[Encoded], n_blocks: int) -> int:
    """The attention FLOPs a causal pass must do over the real tokens: per block and item of n tokens, QKᵀ and the
    weighted sum of V over the lower triangle, 2 · 2 · d · n(n+1)/2 (d = heads × head dim). Padding is not counted
    (it is waste, as in the 2·params·tokens count), nor the softmax (O(n²) but not FLOPs a matmul bounds)."""
    cfg = embedder.model.config
    d = int(cfg.num_attention_heads) * int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return n_blocks * sum(2 * d * len(e.input_ids) * (len(e.input_ids) + 1) for e in encoded)


def timed_embed(embedder: Embedder, encoded: list[Encoded], config: EmbeddingConfig, tokens: int, size: int) -> float:
    """Seconds to embed ``encoded`` in length-sorted batches, timed in a worker thread as the service runs it."""

    def run() -> float:
        start = time.perf_counter()
        embedder.embed(encoded, config, BatchLimits(tokens, size))
        if embedder.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return in_worker_thread(run)


def op_shares(embedder: Embedder, encoded: list[Encoded], config: EmbeddingConfig, size: int) -> dict[str, float]:
    """Fraction of a pass's CPU self time in matmuls, attention and everything else."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        embedder.embed(encoded, config, BatchLimits(1 << 30, size))
    shares: Counter[str] = Counter()
    for event in prof.key_averages():
        group = next((g for g, keys in _OP_GROUPS.items() if any(k in event.key for k in keys)), "other")
        shares[group] += event.self_cpu_time_total
    total = sum(shares.values()) or 1
    return {g: round(shares[g] / total, 3) for g in ("matmul", "attention", "other")}


def run_core(n: int, layers: str, max_length: int, batch_sizes: str, token_budgets: str, model: str, device: str,
             profile_batch: int, results: Path, name: str | None = None) -> dict[str, Any]:
    embedder = Embedder.load(model, device=device)
    if layers == "default":  # the committed default's embedding: its layer, pooling, template and window
        from app.config import PROJECT_ROOT
        from app.store.artifacts import load_version

        config = load_version(PROJECT_ROOT / "models", "default")[1].embedding
        max_length = config.max_length
    else:
        config = EmbeddingConfig(layers=tuple(int(x) for x in layers.split(",")), pooling="mean", max_length=max_length)
    encoded = embedder.encode_items([parse_item(t) for t in texts(n)], config)
    tokens = sum(len(e.input_ids) for e in encoded)
    deepest = max(embedder.normalize_layers(config.layers))
    flops_per_token = 2 * block_params(embedder, deepest)
    attention = attention_flops(embedder, encoded, deepest) if embedder.is_decoder else 0
    embedder.embed(encoded[:8], config)  # warm-up
    peak = in_worker_thread(lambda: matmul_gflops(embedder.device, embedder.dtype))

    def row(**plan: int) -> dict[str, Any]:
        elapsed = timed_embed(embedder, encoded, config, plan.get("max_batch_tokens", 1 << 30), plan.get("max_batch_size", 1 << 30))
        gflops = flops_per_token * tokens / elapsed / 1e9
        with_attention = (flops_per_token * tokens + attention) / elapsed / 1e9
        out = {**plan, "seconds": round(elapsed, 3), "texts_per_s": round(n / elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1),
               "gflops": round(gflops, 1), "fraction_of_matmul": round(gflops / peak, 3),
               "gflops_with_attention": round(with_attention, 1), "fraction_with_attention": round(with_attention / peak, 3)}
        typer.echo(json.dumps(out))
        return out

    by_size = [row(max_batch_size=int(x)) for x in batch_sizes.split(",") if x]
    by_budget = [row(max_batch_tokens=int(x), max_batch_size=256) for x in token_budgets.split(",") if x]
    peak_after = in_worker_thread(lambda: matmul_gflops(embedder.device, embedder.dtype))
    best = max(by_size + by_budget, key=lambda r: r["tokens_per_s"])
    shares = op_shares(embedder, encoded, config, profile_batch) if profile_batch and embedder.device.type == "cpu" else None
    return save(name or f"core-{embedder.device.type}", {
        "command": "python -m bench.run core" if name is None else f"python -m bench.run {name}",
        "model": embedder.model_id, "dtype": str(embedder.dtype).removeprefix("torch."),
        "items": n, "tokens": tokens, "embedding": config.as_dict(), "layers": list(config.layers), "blocks_run": deepest,
        "max_length": max_length, "flops_per_token": flops_per_token, "attention_flops": attention, "matmul_gflops": round(peak, 1), "matmul_gflops_after": round(peak_after, 1),
        "by_batch_size": by_size, "by_token_budget": by_budget, "best": best,
        "op_time_shares": {"batch_size": profile_batch, **shares} if shares else None,
    }, results)


def core(
    n: Annotated[int, typer.Option(help="Items.")] = 256,
    layers: Annotated[str, typer.Option(help="Layer(s) embedded (mean pooling), or 'default': the committed default's "
                                        "embedding (layer, pooling, template, window; --max-length is then its own).")] = "20",
    max_length: int = 256,
    batch_sizes: Annotated[str, typer.Option(help="Max batch sizes to try (no token budget).")] = "1,2,4,8,16,32",
    token_budgets: Annotated[str, typer.Option(help="Padded-token budgets to try (batch size up to 256).")] = "512,1024,2048,8192",
    model: str = "smollm2-135m-instruct",
    device: str = "auto",
    profile_batch: Annotated[int, typer.Option(help="Batch size of one profiled pass (op time shares); 0 skips it.")] = 4,
    results: ResultsOpt = RESULTS,
) -> None:
    """Hardware limit: embedding GFLOP/s (2·params·tokens of the blocks run, and with the causal attention FLOPs) by
    batch plan vs a large matmul."""
    run_core(n, layers, max_length, batch_sizes, token_budgets, model, device, profile_batch, results)


def layers(
    n: Annotated[int, typer.Option(help="Items.")] = 128,
    layer: Annotated[int, typer.Option(help="The chosen layer (the default subspace's).")] = 20,
    model: str = "smollm2-135m-instruct",
    max_length: int = 256,
    max_batch_tokens: int = 1024,
    max_batch_size: int = 4,
    repeats: Annotated[int, typer.Option(help="Alternating runs of each (the best of each is kept).")] = 2,
    results: ResultsOpt = RESULTS,
) -> None:
    """Layer truncation: texts/s running blocks up to ``layer`` vs the full model, same texts and batches."""
    embedder = Embedder.load(model)
    chosen = EmbeddingConfig(layers=(layer,), pooling="mean", max_length=max_length)
    full = EmbeddingConfig(layers=(-1,), pooling="mean", max_length=max_length)
    encoded = embedder.encode_items([parse_item(t) for t in texts(n)], chosen)
    embedder.embed(encoded[:4], full)  # warm-up
    times: dict[str, list[float]] = {"chosen": [], "full": []}
    for _ in range(repeats):  # alternate, so a load spike hits both alike
        for key, config in (("chosen", chosen), ("full", full)):
            times[key].append(timed_embed(embedder, encoded, config, max_batch_tokens, max_batch_size))
            typer.echo(f"{key}: {times[key][-1]:.2f} s")
    blocks = embedder.normalize_layers((layer,))[0]
    t_chosen, t_full = min(times["chosen"]), min(times["full"])
    save("layers", {
        "command": "python -m bench.run layers", "model": embedder.model_id, "items": n,
        "chosen_layer": layer, "blocks_chosen": blocks, "blocks_full": embedder.num_layers,
        "chosen_texts_per_s": round(n / t_chosen, 2), "full_texts_per_s": round(n / t_full, 2),
        "speedup": round(t_full / t_chosen, 3), "block_ratio": round(embedder.num_layers / max(blocks, 1), 3),
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "batch": {"max_batch_tokens": max_batch_tokens, "max_batch_size": max_batch_size},
    }, results)


def gpu(
    n: Annotated[int, typer.Option(help="Items.")] = 1024,
    batch_sizes: str = "8,32,128",
    token_budgets: str = "8192,16384,32768",
    results: ResultsOpt = RESULTS,
) -> None:
    """The core benchmark on CUDA in bf16 vs the chip's bf16 matmul rate; records 'not run' without a GPU."""
    if not torch.cuda.is_available():
        reason = "no CUDA device on this machine; none was lent to this task"
        save("gpu", {"command": "python -m bench.run gpu", "run": False, "reason": reason}, results)
        typer.echo(f"bench gpu: not run: {reason} (recorded as run=false in {results})", err=True)
        raise typer.Exit(3)  # fail loudly: a script on a lent GPU machine must not pass without measuring
    layers = ",".join(map(str, DEFAULT_FIT_EMBEDDING.layers))  # the default subspace's embedding
    run_core(n, layers, DEFAULT_FIT_EMBEDDING.max_length, batch_sizes, token_budgets, "smollm2-135m-instruct", "cuda", 0, results,
             name="gpu")

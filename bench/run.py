"""Benchmark harness: ``python -m bench.run <name>``; each merges its result into bench/results.json.

    core       hardware limit: embedding GFLOP/s by batch plan vs a large fp32 matmul, op time shares
    service    texts/s and p50/p99 through HTTP at concurrency 1/8/32/128 vs the core in-process
    batching   the service with its batcher vs batching off (max_batch_size 1)
    peer       infinity-emb serving all-MiniLM-L6-v2 vs this service serving and scoring with it
    layers     running blocks up to the chosen layer vs the full model
    cache      30% duplicate requests, embedding cache on vs off
    fairness   one bulk /filter stream vs an interactive caller's one-item /score: p90 contended / idle
    refit      peak RSS and time of a streaming fit for N = 10k, 50k, 200k (one process per N)
    bulk       saft filter (local, Ray with 1 and 2 actors) over 10k / 50k lines: lines/s and peak RSS vs the core
    plain      the service at concurrency 16 vs a plain transformers loop over the same weights, alternating
    quantize   int8 dynamic quantization vs fp32 eager on the committed default: texts/s and score changes
    compiled   torch.compile of every block vs fp32 eager on the committed default: texts/s and score changes
    padding-mask  the decoder's pass without the padding mask (is_causal) vs with it: texts/s and score changes
    threads    thread settings of the service (OMP_*, SAFT_NUM_THREADS, ...) compared through HTTP, alternating
    gpu        the core on CUDA in bf16 vs the chip's bf16 matmul (records 'not run' without a GPU)
    plots      PNGs of the results under docs/bench/

Each figure is a ratio of two things measured in the same run: this machine is shared and noisy.
"""

from __future__ import annotations

import typer

from bench.bulk import bulk
from bench.core import core, gpu, layers
from bench.fairness import fairness
from bench.levers import compiled, padding_mask, quantize
from bench.peer import peer
from bench.plain import plain
from bench.plots import plots
from bench.refit import refit
from bench.service import batching, cache, service, threads

app = typer.Typer(add_completion=False, help=__doc__)
for command in (core, service, batching, peer, layers, cache, fairness, refit, bulk, plain, quantize, compiled, padding_mask, threads, gpu, plots):
    app.command()(command)

if __name__ == "__main__":
    app()

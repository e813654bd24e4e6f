"""CPU levers measured with quality beside speed (issue 17): ``python -m bench.run quantize``.

int8 dynamic quantization of every ``nn.Linear`` (torch.ao, weights int8, activations quantized per batch) against
the fp32 eager model, both on the committed default's embedding (its layer, pooling, template, 512-token window) and
the service's CPU batches (``BatchLimits`` of the device). Measured in one process, alternating: texts/s of each
(``--rounds`` passes each over the same encoded items) and, on the same items, the committed default's scores: the
largest |Δscore| relative to τ's scale, the verdicts that flip, and the AUROC per item kind of each. The lever is kept
only where the AUROC moves by at most 0.005 per kind (the issue's tolerance).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from sklearn.metrics import roc_auc_score

from app.config import PROJECT_ROOT
from app.core.embedding import Embedder
from app.core.pipeline import parse_line, score_encoded
from app.store.artifacts import load_version
from bench.common import RESULTS, in_worker_thread, rows, save
from bench.core import ResultsOpt

TOLERANCE_AUROC = 0.005
NOpt = Annotated[int, typer.Option(help="dev_eval items (shuffled, seed 1).")]
RoundsOpt = Annotated[int, typer.Option(help="Timed passes of each model, alternating.")]


def _two_default_models() -> tuple[Embedder, Embedder]:
    """Two separate loads of the committed default's model: the fp32 eager baseline and the one a lever changes."""
    model_id = load_version(PROJECT_ROOT / "models", "default")[1].model_id
    return Embedder.load(model_id), Embedder.load(model_id)


def _auroc_by_kind(kinds: list[str], labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    out = {}
    for kind in sorted(set(kinds)):
        mask = np.array([k == kind for k in kinds])
        if len(set(labels[mask].tolist())) == 2:
            out[kind] = round(float(roc_auc_score(labels[mask], scores[mask])), 4)
    return out


def _compare(result_name: str, lever: str, variant: Embedder, fp32: Embedder, n: int, rounds: int, command: str,
             results: Path) -> dict[str, Any]:
    """fp32 eager vs ``variant`` (the same model under a lever) on the committed default, alternating in one process."""
    subspace, manifest = load_version(PROJECT_ROOT / "models", "default")
    config = manifest.embedding
    lines = [parse_line(i + 1, row) for i, row in enumerate(rows(n, seed=1))]
    lines = [line for line in lines if line.item is not None and line.label is not None]
    items = [line.item for line in lines if line.item is not None]
    labels = np.array([line.label for line in lines])
    kinds: list[str] = [str(item.kind) for item in items]
    encoded = fp32.encode_items(items, config)
    tokens = sum(len(e.input_ids) for e in encoded)
    models = {"fp32": fp32, lever: variant}
    warm_up: dict[str, float] = {}
    for name, model in models.items():  # the first passes (a compiled model compiles here)
        start = time.perf_counter()
        in_worker_thread(partial(model.embed, encoded[:8], config))
        warm_up[name] = round(time.perf_counter() - start, 2)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    vectors: dict[str, np.ndarray] = {}
    for r in range(rounds):
        for name, model in list(models.items())[:: 1 if r % 2 == 0 else -1]:
            def run(model: Embedder = model) -> tuple[float, np.ndarray]:
                start = time.perf_counter()
                out = model.embed(encoded, config)
                return time.perf_counter() - start, out

            elapsed, vectors[name] = in_worker_thread(run)
            seconds[name].append(round(elapsed, 2))
    scored = {name: score_encoded(subspace, manifest, items, encoded, v) for name, v in vectors.items()}
    scores = {name: np.array([s.score for s in out]) for name, out in scored.items()}
    taus = np.array([manifest.threshold_for(k) for k in kinds])
    delta = np.abs(scores[lever] - scores["fp32"])
    auroc = {name: _auroc_by_kind(kinds, labels, s) for name, s in scores.items()}
    change = {k: round(auroc[lever][k] - auroc["fp32"][k], 4) for k in auroc["fp32"]}
    total = {name: sum(t) for name, t in seconds.items()}
    speedup = round(total["fp32"] / total[lever], 3)
    return save(result_name, {
        "command": command,
        "subspace": f"{manifest.name}/{manifest.version}", "embedding": config.as_dict(), "items": len(items), "tokens": tokens,
        "batch_limits": dataclasses.asdict(fp32.batch_limits), "warm_up_seconds": warm_up,
        "seconds": seconds, "texts_per_s": {name: round(len(items) * rounds / t, 2) for name, t in total.items()},
        f"speedup_{lever.replace('-', '_')}_vs_fp32": speedup, "speedup": speedup,
        "max_abs_delta_score": round(float(delta.max()), 5), "median_abs_delta_score": round(float(np.median(delta)), 5),
        "median_abs_tau": round(float(np.median(np.abs(taus))), 5),
        "verdicts_flipped": int(sum(a.verdict != b.verdict for a, b in zip(scored["fp32"], scored[lever], strict=True))),
        "auroc_by_kind": auroc, "auroc_change_by_kind": change,
        "kept": bool(change) and all(abs(c) <= TOLERANCE_AUROC for c in change.values()) and speedup > 1.0,
        "tolerance_auroc": TOLERANCE_AUROC,
    }, results)


def quantize(
    n: NOpt = 160,
    rounds: RoundsOpt = 2,
    results: ResultsOpt = RESULTS,
) -> None:
    """int8 dynamic quantization vs fp32 eager on the committed default: texts/s and score changes, one run."""
    from torch.ao.quantization import quantize_dynamic

    fp32, int8 = _two_default_models()
    quantize_dynamic(int8.model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    _compare("quantize", "int8", int8, fp32, n, rounds, f"python -m bench.run quantize --n {n} --rounds {rounds}", results)


def compiled(
    n: NOpt = 160,
    rounds: RoundsOpt = 2,
    results: ResultsOpt = RESULTS,
) -> None:
    """``torch.compile`` (inductor, dynamic shapes) of every transformer block vs fp32 eager on the committed default.

    Each block's ``forward`` is replaced by its compiled form (not ``nn.Module.compile``, which would trace the hooks
    too), so the block hooks (layer capture, the stop
    after the chosen layer, the overtaking checkpoint) stay eager around it; ``dynamic=True`` makes batch size and
    length symbolic, so the service's varying shapes do not recompile per request (the warm-up pass pays the compile).
    """
    fp32, variant = _two_default_models()
    variant.compile_blocks()  # what SAFT_COMPILE_BLOCKS=true does
    _compare("compile", "compile", variant, fp32, n, rounds, f"python -m bench.run compiled --n {n} --rounds {rounds}", results)


def padding_mask(
    n: NOpt = 160,
    rounds: RoundsOpt = 2,
    results: ResultsOpt = RESULTS,
) -> None:
    """The decoder's pass without the padding mask (SDPA's is_causal kernel; ``Embedder.mask_padding``, the default)
    vs with it (a materialized (batch, 1, L, L) mask, what transformers builds from a padded batch's mask)."""
    masked, causal = _two_default_models()
    masked.mask_padding = True
    causal.mask_padding = False
    _compare("padding-mask", "no-mask", causal, masked, n, rounds,
             f"python -m bench.run padding-mask --n {n} --rounds {rounds}", results)

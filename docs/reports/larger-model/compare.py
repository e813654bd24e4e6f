"""A larger model with the same code: SmolLM2-135M (the default) against Gemma 3 270M on one stratified subsample.

Both caches come from ``docs/reports/quality-r3/embed_pool.py`` (one forward pass per item, the chat template —
Gemma 3 270M is a base model without one, so the product's documented plain format is used, as ``saft`` does for
any such model — and the response-mean pooling of the default). The subsample is up to 40 items per (source, label),
whole groups at a time (seed 0): 2,661 items, every one of the pool's 42 sources. The 135M rows are read from the
full pool's cache by (file, line), so both models are judged on the very same items.

Every figure is the product's own source-held-out evaluation (``app.core.crossval``, the code behind ``saft crossval``)
with ``FitOptions()``'s defaults (shrinkage LDA 0.5, centering per kind, every source weighing the same, τ per kind at
5% FPR chosen inside each fold): per data kind the AUROC of the pooled out-of-source scores and TPR at 5% FPR; per
source the share dropped (benign) or caught (harmful) at τ; by source and by family.

    .venv/bin/python docs/reports/larger-model/compare.py --small /work/cache/pool --large /work/cache/pool-gemma \
        --out docs/reports/larger-model/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from app.core.crossval import EmbeddedPool, crossval
from app.core.pipeline import FitOptions

HERE = Path(__file__).parent
FAMILIES = json.loads((HERE.parent / "quality-r3" / "families.json").read_text())
FAMILY_OF = {s: f for f, ss in FAMILIES.items() if not f.startswith("_") for s in ss}
SMALL_LAYERS = (4, 8, 12, 16, 20)  # quality-r3's cache of the 135M model


def read_cache(cache: Path, layers_idx: list[int], pooling: str, rows_idx: np.ndarray | None = None) -> np.ndarray:
    """Vectors of ``cache``'s chat template, the given layer columns concatenated, in ``rows_idx`` order."""
    n = sum(1 for _ in (cache / "items.jsonl").open())
    X: np.ndarray | None = None
    have = np.zeros(n, bool)
    for path in sorted((cache / "chat").glob("*-[0-9][0-9][0-9][0-9].npz")):
        z = np.load(path)
        v = z[pooling][:, layers_idx].astype(np.float32).reshape(len(z["idx"]), -1)
        if X is None:
            X = np.zeros((n, v.shape[1]), np.float32)
        X[z["idx"]] = v
        have[z["idx"]] = True
    assert X is not None, f"{cache}: no chunks"
    if rows_idx is None:
        rows_idx = np.arange(n)
    missing = int((~have[rows_idx]).sum())
    if missing:
        raise SystemExit(f"{cache}: {missing} of the subsample's items are not embedded yet")
    return X[rows_idx]


def evaluate(X: np.ndarray, rows: list[dict], by: str, nested: bool) -> dict:
    """``app.core.crossval``'s own figures (``app.core.quality``'s metrics of the pooled out-of-fold scores), per kind and source."""
    pool = EmbeddedPool(X.astype(np.float32), np.asarray([r["label"] for r in rows]), [r["item_kind"] for r in rows],
                        [r["kind"] for r in rows], [r["source"] for r in rows], [r["group"] for r in rows])
    # nested: τ per fold as the product sets it (on the training sources' own held-out scores; 42 x 41 fits a
    # variant); otherwise on the fold's training scores (42 fits). AUROC and TPR do not depend on τ.
    r = crossval(pool, FitOptions(cross_fit="source" if nested else "none"), by=by, families=FAMILY_OF)  # type: ignore[arg-type]
    metrics = r["metrics"]
    out: dict = {"by_kind": {}, "by_source": {}}
    for k, m in metrics["by_kind"].items():
        out["by_kind"][k] = {"n": m["n"], "auroc": m.get("auroc"), "tpr1": m.get("tpr_at_1pct_fpr"),
                             "tpr5": m.get("tpr_at_5pct_fpr"), "benign_dropped": m["fpr_at_threshold"], "harmful_caught": m["recall"]}
    for source, m in metrics["by_source"].items():
        row: dict = {"n": m["n"]}
        if m["n"] > m["n_harmful"]:
            row["benign_dropped"] = m["fpr_at_threshold"]
        if m["n_harmful"]:
            row["harmful_caught"] = m["recall"]
        out["by_source"][source] = row
    benign = {s: v["benign_dropped"] for s, v in out["by_source"].items() if "benign_dropped" in v}
    harmful = {s: v["harmful_caught"] for s, v in out["by_source"].items() if "harmful_caught" in v}
    out["worst_benign"] = max(benign.items(), key=lambda kv: kv[1])
    out["worst_harmful"] = min(harmful.items(), key=lambda kv: kv[1])
    out["benign_sources_over_15pct"] = sum(v > 0.15 for v in benign.values())
    out["harmful_sources_under_60pct"] = sum(v < 0.60 for v in harmful.values())
    return out


def show(name: str, r: dict) -> str:
    k = r["by_kind"]
    return (f"{name:34s} P {k['prompt']['auroc']:.3f}  T {k['text']['auroc']:.3f}  R {k['pair']['auroc']:.3f}  "
            f"tpr5 P/T/R {k['prompt']['tpr5']:.2f}/{k['text']['tpr5']:.2f}/{k['pair']['tpr5']:.2f}  "
            f"worst FP {r['worst_benign'][0]} {r['worst_benign'][1]:.2f}  worst TP {r['worst_harmful'][0]} {r['worst_harmful'][1]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=Path, required=True, help="quality-r3's cache of the whole pool (135M)")
    ap.add_argument("--large", type=Path, required=True, help="the larger model's cache of the subsample")
    ap.add_argument("--large-layers", default="3,6,9,12,15,18", help="the layers the larger cache holds, in order")
    ap.add_argument("--pooling", default="resp")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [json.loads(line) for line in (args.large / "items.jsonl").open()]
    small_rows = {(r["file"], r["line"]): r["idx"] for r in map(json.loads, (args.small / "items.jsonl").open())}
    small_idx = np.asarray([small_rows[(r["file"], r["line"])] for r in rows])
    large_layers = [int(x) for x in args.large_layers.split(",")]
    variants: list[tuple[str, np.ndarray]] = [(f"smollm2-135m L{layer}", read_cache(args.small, [SMALL_LAYERS.index(layer)], args.pooling, small_idx))
                                             for layer in (12, 16, 20)]
    variants += [(f"gemma3-270m L{layer}", read_cache(args.large, [i], args.pooling)) for i, layer in enumerate(large_layers)]
    results = []
    for by in ("source", "family"):
        for name, X in variants:
            r = evaluate(X, rows, by, nested=False)
            print(show(f"{name} by {by}", r), flush=True)
            results.append({"model_layer": name, "by": by, "tau": "fold training scores", **r})
    # The default's layer (16) and the larger model's best layer by source (mean AUROC over the three kinds), by source
    # with τ chosen as the product chooses it.
    gemma = [r for r in results if r["by"] == "source" and r["model_layer"].startswith("gemma3-270m")]
    best = max(gemma, key=lambda r: np.mean([r["by_kind"][k]["auroc"] for k in ("prompt", "text", "pair")]))["model_layer"]
    for name in ("smollm2-135m L16", best):
        r = evaluate(dict(variants)[name], rows, "source", nested=True)
        print(show(f"{name} by source, nested tau", r), flush=True)
        results.append({"model_layer": name, "by": "source", "tau": "nested source-held-out (the product's)", **r})
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"items": len(rows), "pooling": args.pooling, "results": results}, indent=1))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()

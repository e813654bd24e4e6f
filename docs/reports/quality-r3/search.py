"""Round 3 search: every variant judged by leave-one-source-out and leave-one-family-out on the cached pool.

Reads the cache of ``embed_pool.py``. For each variant and each held-out source (or family), fits on the rest
and scores the held-out items; reports per data kind (prompt / text / pair) the AUROC of the pooled
out-of-source scores, TPR at 5% FPR, and per source the share dropped (benign) or caught (harmful) at a
per-kind τ set at 5% FPR on the training items (``app.core.crossval``, the code behind ``saft crossval``).

    .venv/bin/python docs/reports/quality-r3/search.py --cache /work/cache/pool --out docs/reports/quality-r3/search.json

This is exploration; the numbers in docs/QUALITY.md come from ``saft crossval`` (the product's own code).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from app.core.crossval import EmbeddedPool, crossval
from app.core.pipeline import FitOptions
from app.core.quality import ThresholdPolicy

FAMILIES = json.loads((Path(__file__).parent / "families.json").read_text())
FAMILY_OF = {s: f for f, ss in FAMILIES.items() if not f.startswith("_") for s in ss}


def load_cache(cache: Path, template: str, pooling: str, layers_idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
    rows = [json.loads(line) for line in (cache / "items.jsonl").open()]
    X = None
    have = np.zeros(len(rows), bool)
    for path in sorted((cache / template).glob("*-[0-9][0-9][0-9][0-9].npz")):
        z = np.load(path)
        v = z[pooling][:, layers_idx].astype(np.float32).reshape(len(z["idx"]), -1)
        if X is None:
            X = np.zeros((len(rows), v.shape[1]), np.float32)
        X[z["idx"]] = v
        have[z["idx"]] = True
    return X, have


@dataclass
class Pool:
    source: np.ndarray
    kind: np.ndarray  # data kind: prompt / text / pair
    item_kind: np.ndarray  # text / pair
    label: np.ndarray
    group: np.ndarray


def load_pool(cache: Path) -> Pool:
    rows = [json.loads(line) for line in (cache / "items.jsonl").open()]
    return Pool(*(np.asarray([r[k] for r in rows]) for k in ("source", "kind", "item_kind", "label", "group")))


def auroc(y, s):
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def tpr_at(y, s, fpr=0.05):
    if not 0 < y.sum() < len(y):
        return None
    f, t, _ = roc_curve(y, s)
    return float(t[f <= fpr].max())


def crossval_variant(X, have, pool: Pool, by: str, *, balance, shrinkage, center, nuisance):
    """The product's own source-held-out evaluation (``app.core.crossval``) on cached vectors."""
    idx = np.flatnonzero(have)
    ep = EmbeddedPool(X[idx].astype(np.float32), pool.label[idx], pool.item_kind[idx].tolist(), pool.kind[idx].tolist(),
                      pool.source[idx].tolist(), pool.group[idx].tolist())
    options = FitOptions(method="lda", center=center, shrinkage=shrinkage, balance=balance, nuisance=nuisance,
                         policy=ThresholdPolicy("fpr", 0.05), cross_fit="none")
    r = crossval(ep, options, by=by, families=FAMILY_OF)  # type: ignore[arg-type]
    out = np.full(len(pool.label), np.nan)
    drop = np.zeros(len(pool.label), bool)
    out[idx] = r["scores"]
    drop[idx] = r["scores"] > r["thresholds"]
    return out, drop


def summarize(out, drop, have, pool: Pool):
    res = {"by_kind": {}, "by_source": {}}
    for k in ("prompt", "text", "pair"):
        m = have & (pool.kind == k)
        if m.any():
            res["by_kind"][k] = {"n": int(m.sum()), "auroc": auroc(pool.label[m], out[m]), "tpr5": tpr_at(pool.label[m], out[m])}
    worst_benign, worst_harm = ("", 0.0), ("", 1.0)
    for s in np.unique(pool.source[have]):
        m = have & (pool.source == s)
        y = pool.label[m]
        row = {"n": int(m.sum())}
        if (y == 0).any():
            row["benign_dropped"] = float(drop[m][y == 0].mean())
            if row["benign_dropped"] > worst_benign[1]:
                worst_benign = (s, row["benign_dropped"])
        if (y == 1).any():
            row["harmful_caught"] = float(drop[m][y == 1].mean())
            if row["harmful_caught"] < worst_harm[1]:
                worst_harm = (s, row["harmful_caught"])
        a = auroc(y, out[m])
        if a is not None:
            row["auroc"] = a
        res["by_source"][s] = row
    res["worst_benign"] = worst_benign
    res["worst_harmful"] = worst_harm
    return res


def line(name, r):
    k = r["by_kind"]
    f = lambda x: "  -  " if x is None else f"{x:.3f}"  # noqa: E731
    return (f"{name:58s} P {f(k.get('prompt', {}).get('auroc'))} T {f(k.get('text', {}).get('auroc'))} "
            f"R {f(k.get('pair', {}).get('auroc'))} tpr5R {f(k.get('pair', {}).get('tpr5'))} "
            f"| FP {r['worst_benign'][0][:18]} {r['worst_benign'][1]:.2f} | TP {r['worst_harmful'][0][:18]} {r['worst_harmful'][1]:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--templates", default="chat,judge")
    ap.add_argument("--poolings", default="mean,last")
    ap.add_argument("--layers", default="16;20")  # ';'-separated sets, ','-joined layers
    ap.add_argument("--by", default="source,family")
    ap.add_argument("--balance", default="item,source")
    ap.add_argument("--shrinkage", default="0.5")
    ap.add_argument("--center", default="kind")
    ap.add_argument("--nuisance", default="0")
    ap.add_argument("--kinds", default="", help="restrict to item kinds (text,pair) present in the cache")
    ap.add_argument("--data-kinds", default="", help="restrict to data kinds (prompt,text,pair)")
    ap.add_argument("--same-as", default="", help="restrict to the items another template's cache holds (a fair comparison)")
    args = ap.parse_args()
    pool = load_pool(args.cache)
    all_layers = (4, 8, 12, 16, 20)
    results = []
    for template, pooling, layer_set in itertools.product(args.templates.split(","), args.poolings.split(","), args.layers.split(";")):
        layers = [int(x) for x in layer_set.split(",")]
        X, have = load_cache(args.cache, template, pooling, [all_layers.index(x) for x in layers])
        if X is None:
            continue
        if args.kinds:
            have &= np.isin(pool.item_kind, args.kinds.split(","))
        if args.same_as:
            have &= load_cache(args.cache, args.same_as, "mean", [0])[1]
        if args.data_kinds:
            have &= np.isin(pool.kind, args.data_kinds.split(","))
        X = X.astype(np.float64)
        for by, balance, shr, center, nui in itertools.product(args.by.split(","), args.balance.split(","),
                                                               map(float, args.shrinkage.split(",")), args.center.split(","),
                                                               map(int, args.nuisance.split(","))):
            out, drop = crossval_variant(X, have, pool, by, balance=balance, shrinkage=shr, center=center, nuisance=nui)
            r = summarize(out, drop, have, pool)
            name = f"{template}/{pooling}/L{layer_set}/{by}/{balance}/s{shr}/{center}/n{nui}"
            print(line(name, r), flush=True)
            results.append({"variant": name, **r})
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

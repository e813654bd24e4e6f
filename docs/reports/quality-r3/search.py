"""Round 3 search: every variant judged by leave-one-source-out and leave-one-family-out on the cached pool.

Reads the cache of ``embed_pool.py``. For each variant and each held-out source (or family), fits on the rest
and scores the held-out items; reports per data kind (prompt / text / pair) the AUROC of the pooled
out-of-source scores, TPR at 5% FPR, and per source the share dropped (benign) or caught (harmful) at a
per-kind τ set at 5% FPR on the training benign items. Per-(source, kind, label) moments are computed once
per feature set, so a fold is a sum of cells and one linear solve.

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


def fit_direction(X, w, y, ik, *, shrinkage, center, nuisance, standardize=True, benign_sources=None, src=None):
    """Weighted LDA in the product's stored form; returns (centers per item kind, scale, direction)."""
    centers = {}
    for k in ("text", "pair"):
        m = (ik == k) & ((y == 0) if center == "benign" else np.ones_like(y, bool))
        if m.any():
            centers[k] = np.average(X[m], axis=0, weights=w[m])
    Z = X - np.where((ik == "pair")[:, None], centers.get("pair", 0), centers.get("text", 0))
    var = np.average(Z**2, axis=0, weights=w)
    scale = np.sqrt(np.maximum(var, 1e-12)) if standardize else np.ones(X.shape[1])
    Z = Z / scale
    mu = {c: np.average(Z[y == c], axis=0, weights=w[y == c]) for c in (0, 1)}
    D = Z - np.where((y == 1)[:, None], mu[1], mu[0])
    W = (D * w[:, None]).T @ D / w.sum()
    d = X.shape[1]
    delta = mu[1] - mu[0]
    if nuisance:
        # Directions along which benign sources' means differ (format / topic / source), projected out.
        means = []
        for s in np.unique(src[y == 0]):
            m = (src == s) & (y == 0)
            means.append(np.average(Z[m], axis=0, weights=w[m]))
        M = np.stack(means)
        M = M - M.mean(0)
        U = np.linalg.svd(M, full_matrices=False)[2][:nuisance].T
        P = np.eye(d) - U @ U.T
        W = P @ W @ P
        delta = P @ delta
    cov = (1 - shrinkage) * W + shrinkage * np.trace(W) / d * np.eye(d)
    v = np.linalg.solve(cov, delta)
    if nuisance:
        v = P @ v
    return centers, scale, v / np.linalg.norm(v)


def score(X, ik, centers, scale, v):
    Z = X - np.where((ik == "pair")[:, None], centers.get("pair", 0), centers.get("text", 0))
    return (Z / scale) @ v


def weights(pool: Pool, idx, balance: str):
    if balance == "item":
        return np.ones(len(idx))
    cell = np.char.add(np.char.add(pool.source[idx], "|"), pool.label[idx].astype(str))
    _, inv, counts = np.unique(cell, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inv]
    if balance == "sqrt":
        w = 1.0 / np.sqrt(counts[inv])
    return w / w.mean()


def crossval(X, have, pool: Pool, by: str, **fit):
    balance = fit.pop("balance")
    unit = pool.source if by == "source" else np.asarray([FAMILY_OF.get(s, s) for s in pool.source])
    out = np.full(len(pool.label), np.nan)
    drop = np.zeros(len(pool.label), bool)
    for u in np.unique(unit[have]):
        test = have & (unit == u)
        # Groups never straddle: a near-duplicate of a held-out item is held out of training too.
        train = np.flatnonzero(have & (unit != u) & ~np.isin(pool.group, np.unique(pool.group[test])))
        w = weights(pool, train, balance)
        centers, scale, v = fit_direction(X[train], w, pool.label[train], pool.item_kind[train], src=pool.source[train], **fit)
        s_train = score(X[train], pool.item_kind[train], centers, scale, v)
        taus = {}
        for k in ("text", "pair"):
            m = (pool.item_kind[train] == k) & (pool.label[train] == 0)
            taus[k] = np.quantile(s_train[m], 0.95)
        t = np.flatnonzero(test)
        out[t] = score(X[t], pool.item_kind[t], centers, scale, v)
        drop[t] = out[t] > np.asarray([taus[k] for k in pool.item_kind[t]])
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
    ap.add_argument("--center", default="all,benign")
    ap.add_argument("--nuisance", default="0")
    ap.add_argument("--kinds", default="", help="restrict to item kinds (text,pair) present in the cache")
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
        X = X.astype(np.float64)
        for by, balance, shr, center, nui in itertools.product(args.by.split(","), args.balance.split(","),
                                                               map(float, args.shrinkage.split(",")), args.center.split(","),
                                                               map(int, args.nuisance.split(","))):
            out, drop = crossval(X, have, pool, by, balance=balance, shrinkage=shr, center=center, nuisance=nui)
            r = summarize(out, drop, have, pool)
            name = f"{template}/{pooling}/L{layer_set}/{by}/{balance}/s{shr}/{center}/n{nui}"
            print(line(name, r), flush=True)
            results.append({"variant": name, **r})
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

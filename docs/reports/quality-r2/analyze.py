"""Variants on cached embeddings with the library's Subspace code. Fit on the calibration part, measure on dev."""
import sys, glob, json, itertools
from pathlib import Path
import numpy as np
sys.path.insert(0, "/work/main")
from app.core.subspace import Subspace
from app.core.quality import quality

def load(d):
    parts = [dict(np.load(f)) for f in sorted(glob.glob(f"{d}/shard*.npz"))]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "layers"}
    out["layers"] = list(parts[0]["layers"])
    return out

def feats(D, pooling, layers):
    poolings = pooling.split("+")
    cols = [D["layers"].index(l) for l in layers]
    return np.concatenate([D[p][:, cols].reshape(len(D["labels"]), -1) for p in poolings], axis=1)

def metrics(y, s):
    q = quality(y, s, float("inf"))
    return q["auroc"], q["tpr_at_5pct_fpr"]

def run(D, pooling, layers, mode="shared", shrinkage=0.5, center="kind", pair_pooling=None, extra=None):
    """mode shared: one LDA over both kinds (per-kind centering); perkind: one LDA per kind."""
    tr, te = D["fileidx"] == 0, D["fileidx"] == 1
    kinds = D["item_kinds"]
    y = D["labels"]
    s = np.full(len(y), np.nan)
    if mode == "shared":
        X = feats(D, pooling, layers)
        sub = Subspace(method="lda", center=center, shrinkage=shrinkage).fit(X[tr], kinds[tr].tolist(), y[tr].tolist())
        s[te] = sub.score_samples(X[te], kinds[te].tolist())
    else:
        for kind in ("text", "pair"):
            p = (pair_pooling or pooling) if kind == "pair" else pooling
            X = feats(D, p, layers)
            m = kinds == kind
            sub = Subspace(method="lda", center="global", shrinkage=shrinkage).fit(X[tr & m], None, y[tr & m].tolist())
            s[te & m] = sub.score_samples(X[te & m])
    res = {}
    for kind in ("text", "pair"):
        m = te & (kinds == kind)
        if len(set(y[m])) == 2:
            res[kind] = metrics(y[m], s[m])
    return res, s

if __name__ == "__main__":
    D = load(sys.argv[1])
    tr, te = D["fileidx"] == 0, D["fileidx"] == 1
    for f in (0, 1):
        for k in ("pair", "text"):
            m = (D["fileidx"] == f) & (D["item_kinds"] == k)
            print(["cal", "dev"][f], k, "n0", int((D["labels"][m] == 0).sum()), "n1", int((D["labels"][m] == 1).sum()))
    rows = []
    for pooling, layers, mode, shr in itertools.product(
        ["mean", "response", "last", "mean+response"], [(12,), (16,), (20,), (16, 20)], ["shared", "perkind"], [0.5]):
        try:
            r, _ = run(D, pooling, layers, mode, shr)
        except Exception as e:
            print("ERR", pooling, layers, mode, e); continue
        rows.append((pooling, layers, mode, shr, r))
        print(f"{pooling:14s} {str(layers):9s} {mode:8s} {shr:.1f}  prompts {r.get('text', (np.nan,np.nan))[0]:.3f}  pairs {r['pair'][0]:.3f} tpr5 {r['pair'][1]:.3f}", flush=True)

"""Grouped 5-fold CV over every embedded item (calibration + dev pooled; folds by the data's `group`,
so near-duplicates and JBB behaviours never straddle), plus the plain calibration->dev split.
Same Subspace code as saft fit. Usage: analyze3.py DIR [variants]"""
import sys, json, hashlib, itertools
from pathlib import Path
import numpy as np
sys.path.insert(0, "/work/notes/emb"); sys.path.insert(0, "/work/main")
from analyze import load, feats
from app.core.subspace import Subspace
from app.core.quality import quality

D = load(sys.argv[1])
groups = {}
for fi, name in enumerate(("calibration", "dev_eval")):
    for n, raw in enumerate(Path(f"/work/shared/data/{name}.jsonl").read_bytes().splitlines(), 1):
        if raw.strip():
            groups[(fi, n)] = json.loads(raw).get("group", f"{fi}-{n}")
G = np.array([groups[(f, l)] for f, l in zip(D["fileidx"], D["lines"])])
fold = np.array([int(hashlib.sha256(g.encode()).hexdigest()[:8], 16) % 5 for g in G])
y, kinds, fi, src = D["labels"], D["item_kinds"], D["fileidx"], D["sources"]
print("n", len(y), {k: (int(((kinds == k) & (y == 0)).sum()), int(((kinds == k) & (y == 1)).sum())) for k in ("pair", "text")},
      "dev pairs", int(((fi == 1) & (kinds == "pair") & (y == 0)).sum()), int(((fi == 1) & (kinds == "pair") & (y == 1)).sum()))

def fit_score(X, trm, tem, basis, shrinkage, center="kind"):
    sub = Subspace(method="lda", center=center, shrinkage=shrinkage).fit(X[trm], kinds[trm].tolist(), y[trm].tolist())
    return sub.score_samples(X[tem], kinds[tem].tolist())

def per_kind(s, m):
    out = {}
    for kind in ("text", "pair"):
        mk = m & (kinds == kind)
        q = quality(y[mk], s[mk], float("inf"))
        out[kind] = (q["auroc"], q["tpr_at_5pct_fpr"])
    return out

def evaluate(pooling, layers, basis, shrinkage=0.5, center="kind"):
    X = feats(D, pooling, layers)
    s_cv = np.empty(len(y))
    for f in range(5):
        s_cv[fold == f] = fit_score(X, fold != f, fold == f, basis, shrinkage, center)
    # CV scores come from 5 different fits: rank within each fold, then average the per-fold metrics
    cv = {k: [] for k in ("text", "pair")}
    for f in range(5):
        r = per_kind(s_cv, fold == f)
        for k in cv:
            cv[k].append(r[k])
    cvm = {k: tuple(np.mean(v, axis=0)) for k, v in cv.items()}
    s_dev = np.full(len(y), np.nan)
    s_dev[fi == 1] = fit_score(X, fi == 0, fi == 1, basis, shrinkage, center)
    dev = per_kind(s_dev, fi == 1)
    tag = f"{pooling} {','.join(map(str, layers))} {basis} s{shrinkage} {center}"
    print(f"{tag:36s} CV: prompts {cvm['text'][0]:.3f} pairs {cvm['pair'][0]:.3f} tpr5 {cvm['pair'][1]:.3f} | "
          f"dev: prompts {dev['text'][0]:.3f} pairs {dev['pair'][0]:.3f} tpr5 {dev['pair'][1]:.3f}", flush=True)
    return cvm, dev

which = sys.argv[2] if len(sys.argv) > 2 else "main"
if which == "main":
    for pooling, layers in itertools.product(["mean", "response"], [(16,), (20,), (16, 20)]):
        for basis in ("shared", "kind"):
            evaluate(pooling, layers, basis)
    for basis in ("shared", "kind"):
        evaluate("mean+response", (20,), basis)
        evaluate("last", (20,), basis)
        evaluate("mean", (12,), basis)
elif which == "shrink":
    for pooling in ("mean", "response"):
        for basis in ("shared", "kind"):
            for shr in (0.1, 0.3, 0.5, 0.7, 0.9):
                evaluate(pooling, (20,), basis, shr)
else:
    for spec in which.split(";"):
        p, l, b, s = spec.split()
        evaluate(p, tuple(int(x) for x in l.split(",")), b, float(s))

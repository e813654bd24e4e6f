"""Variants on the cached random subsample, 256 vs 512 tokens on the SAME items.
Grouped 5-fold CV over calibration+dev items (folds by the data's `group`) and the calibration->dev split.
Fits with app.core.subspace.Subspace (the code saft fit uses). Writes JSON rows to argv[1]."""
import sys, json, hashlib, itertools
from pathlib import Path
import numpy as np
sys.path.insert(0, "/work/notes/emb"); sys.path.insert(0, "/work/main")
from analyze import load, feats
from subspace_kind import Subspace  # app/core/subspace.py + the per-kind basis (patches/my-subspace.patch)
from app.core.quality import quality

LENGTHS = (512,) if len(sys.argv) > 2 and sys.argv[2] == "512only" else (256, 512)
caches = {L: load(f"/work/notes/emb/L12-16-20_M{L}") for L in LENGTHS}
keys = [set(zip(D["fileidx"].tolist(), D["lines"].tolist())) for D in caches.values()]
common = set.intersection(*keys)
for L, D in caches.items():
    m = np.array([(f, l) in common for f, l in zip(D["fileidx"].tolist(), D["lines"].tolist())])
    order = np.lexsort((D["lines"][m], D["fileidx"][m]))
    caches[L] = {k: (v[m][order] if isinstance(v, np.ndarray) else v) for k, v in D.items()}
D0 = caches[LENGTHS[0]]
groups = {}
for fi, name in enumerate(("calibration", "dev_eval")):
    for n, raw in enumerate(Path(f"/work/shared/data/{name}.jsonl").read_bytes().splitlines(), 1):
        if raw.strip():
            groups[(fi, n)] = json.loads(raw).get("group", f"{fi}-{n}")
G = np.array([groups[(f, l)] for f, l in zip(D0["fileidx"], D0["lines"])])
fold = np.array([int(hashlib.sha256(g.encode()).hexdigest()[:8], 16) % 5 for g in G])
y, kinds, fi = D0["labels"], D0["item_kinds"], D0["fileidx"]
counts = {f"{['cal', 'dev'][f]}/{k}/{l}": int(((fi == f) & (kinds == k) & (y == l)).sum()) for f in (0, 1) for k in ("pair", "text") for l in (0, 1)}
print(counts)

def fit_score(X, trm, tem, basis, shrinkage, normalize=False):
    sub = Subspace(method="lda", center="kind", shrinkage=shrinkage, basis=basis).fit(X[trm], kinds[trm].tolist(), y[trm].tolist())
    s = sub.score_samples(X[tem], kinds[tem].tolist())
    if normalize:  # put each fold's scores on its own training benign scale, so the 5 folds can be pooled
        ref = sub.score_samples(X[trm], kinds[trm].tolist())
        for kind in ("text", "pair"):
            b = ref[(kinds[trm] == kind) & (y[trm] == 0)]
            mk = kinds[tem] == kind
            s[mk] = (s[mk] - b.mean()) / b.std()
    return s

def per_kind(s, m):
    out = {}
    for kind in ("text", "pair"):
        mk = m & (kinds == kind)
        q = quality(y[mk], s[mk], float("inf"))
        out[kind] = (q["auroc"], q["tpr_at_5pct_fpr"])
    return out

rows = []
def evaluate(maxlen, pooling, layers, basis, shrinkage=0.5):
    X = feats(caches[maxlen], pooling, layers)
    s = np.empty(len(y))
    per_fold = []
    for f in range(5):
        s[fold == f] = fit_score(X, fold != f, fold == f, basis, shrinkage, normalize=True)
        per_fold.append(per_kind(s, fold == f))
    pooled = per_kind(s, np.ones(len(y), bool))
    cv = {k: np.mean([p[k] for p in per_fold], axis=0).tolist() for k in ("text", "pair")}
    cv_tpr_sd = float(np.std([p["pair"][1] for p in per_fold]))
    sd = np.full(len(y), np.nan)
    sd[fi == 1] = fit_score(X, fi == 0, fi == 1, basis, shrinkage)
    dev = per_kind(sd, fi == 1)
    row = dict(max_length=maxlen, pooling=pooling, layers=list(layers), basis=basis, shrinkage=shrinkage,
               cv_prompts_auroc=cv["text"][0], cv_pairs_auroc=cv["pair"][0], cv_pairs_tpr5=cv["pair"][1], cv_pairs_tpr5_fold_sd=cv_tpr_sd,
               pooled_oof_pairs_auroc=pooled["pair"][0], pooled_oof_pairs_tpr5=pooled["pair"][1], pooled_oof_prompts_auroc=pooled["text"][0],
               dev_prompts_auroc=dev["text"][0], dev_pairs_auroc=dev["pair"][0], dev_pairs_tpr5=dev["pair"][1])
    rows.append(row)
    print(f"{maxlen} {pooling:13s} {','.join(map(str, layers)):6s} {basis:6s} s{shrinkage}  CV prompts {cv['text'][0]:.3f} pairs {cv['pair'][0]:.3f} "
          f"tpr5 {cv['pair'][1]:.3f}±{cv_tpr_sd:.3f} | pooled OOF pairs {pooled['pair'][0]:.3f} tpr5 {pooled['pair'][1]:.3f} | dev prompts {dev['text'][0]:.3f} pairs {dev['pair'][0]:.3f} tpr5 {dev['pair'][1]:.3f}", flush=True)

for maxlen in LENGTHS:
    for pooling, layers, basis in itertools.product(["mean", "response"], [(16,), (20,), (16, 20)], ["shared", "kind"]):
        evaluate(maxlen, pooling, layers, basis)
    for basis in ("shared", "kind"):
        evaluate(maxlen, "mean+response", (20,), basis)
        evaluate(maxlen, "last", (20,), basis)
    for shr in (0.2, 0.8):
        evaluate(maxlen, "mean", (20,), "kind", shr)
        evaluate(maxlen, "response", (20,), "kind", shr)
Path(sys.argv[1]).write_text(json.dumps({"counts": counts, "rows": rows}, indent=1))

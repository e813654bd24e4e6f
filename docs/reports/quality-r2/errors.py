import sys, collections
import numpy as np
sys.path.insert(0, "/work/notes/emb"); sys.path.insert(0, "/work/main")
exec(open("/work/notes/emb/analyze3.py").read().split("which = sys.argv[2]")[0])
pm = kinds == "pair"
X = feats(D, "mean", (20,))
s = np.empty(len(y))
for f in range(5):
    s[fold == f] = fit_score(X, fold != f, fold == f, "shared", 0.5)
# per fold: threshold at 5% FPR on benign pairs of that fold; collect FPs and FNs
fp, fn, neg, pos = collections.Counter(), collections.Counter(), collections.Counter(), collections.Counter()
for f in range(5):
    m = pm & (fold == f)
    t = np.quantile(s[m & (y == 0)], 0.95)
    for i in np.flatnonzero(m):
        (neg if y[i] == 0 else pos)[src[i]] += 1
        if y[i] == 0 and s[i] > t: fp[src[i]] += 1
        if y[i] == 1 and s[i] <= t: fn[src[i]] += 1
print("benign pairs above the 5%-FPR threshold, by source:", {k: f"{fp[k]}/{neg[k]}" for k in neg})
print("harmful pairs missed, by source:", {k: f"{fn[k]}/{pos[k]}" for k in pos})
nt = D["n_tokens"]
print("missed harmful: median tokens", np.median([nt[i] for i in range(len(y)) if pm[i] and y[i]==1]))
t_all = {}
for f in range(5):
    m = pm & (fold == f)
    t_all[f] = np.quantile(s[m & (y == 0)], 0.95)
hit = np.array([s[i] > t_all[fold[i]] for i in range(len(y))])
for lo, hi in ((0, 256), (256, 400), (400, 600), (600, 5000)):
    mh = pm & (y == 1) & (nt > lo) & (nt <= hi)
    mb = pm & (y == 0) & (nt > lo) & (nt <= hi)
    print(f"tokens ({lo},{hi}]: harmful n={mh.sum()} caught {hit[mh].mean():.2f} | benign n={mb.sum()} flagged {hit[mb].mean():.2f}")

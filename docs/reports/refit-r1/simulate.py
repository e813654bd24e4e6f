"""Simulated users refitting on their own data (issue 19): which refit strategy helps, measured, not assumed.

For each user set (single sources, and mixtures such as benign pairs of one source with 5–10% harmful pairs of
another), the *active default* is the product's default fitted on the pool without the user set's families (the
user's data comes from sources the shipped version never saw), its τ per kind at 5% FPR of its own
source-held-out scores, as ``saft fit`` sets it. The user set is split by group into an upload (half) and a
held-back half; each strategy refits on the upload and is scored on the held-back half:

- default: the active version, unchanged;
- saft: the paper's unlabeled SAFT score fitted on the upload alone, τ dropping its top 10% (the old refit);
- anchored(ω): the stored statistics plus the upload pseudo-labelled by the active version's verdicts, as ω
  sources; τ carried over (``app.core.anchoring.carry_thresholds``);
- labelled(ω): the stored statistics plus the labelled upload as ω sources (τ carried, or at 5% FPR of the
  upload's labelled lines);
- partial(m, ω): m labelled upload lines as ω sources, the rest pseudo-labelled;
- replace: a discriminant on the labelled upload alone.

    .venv/bin/python docs/reports/refit-r1/simulate.py --pool /work/cache/pool-resp16.npz --out docs/reports/refit-r1/results.json

The pool file comes from dump_pool.py (every valid pool line with its committed-default embedding).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.core.anchoring import AnchorWeights, GuardBounds, carry_thresholds, combined_accumulator, compare, guard, pseudo_labels
from app.core.crossval import EmbeddedPool, crossval
from app.core.pipeline import FitOptions
from sklearn.metrics import roc_auc_score as auroc

from app.core.quality import ThresholdPolicy, choose_thresholds
from app.core.subspace import FitError, MomentAccumulator, Subspace

FAMILIES = json.loads(Path("docs/reports/quality-r3/families.json").read_text())
FAMILY_OF = {s: f for f, members in FAMILIES.items() if not f.startswith("_") for s in members}
OPTIONS = FitOptions()


def lda() -> Subspace:
    return Subspace(k=1, method="lda", center=OPTIONS.center, standardize=OPTIONS.standardize,  # type: ignore[arg-type]
                    shrinkage=OPTIONS.shrinkage, balance=OPTIONS.balance)  # type: ignore[arg-type]


# (name, [(source, label or None for both, share of the set or None for all rows)])
USER_SETS: list[tuple[str, list[tuple[str, int | None, float | None]]]] = [
    ("pairs: rd_alpaca_harmless + 10% rd_jbb_ablation harmful", [("rd_alpaca_harmless", 0, None), ("rd_jbb_ablation", 1, 0.10)]),
    ("pairs: alpaca_safety_topics + 5% latent_jailbreak harmful", [("alpaca_safety_topics", 0, None), ("latent_jailbreak", 1, 0.05)]),
    ("pairs: alpaca_eval_outputs + 10% gptfuzz harmful", [("alpaca_eval_outputs", 0, None), ("gptfuzz_labeled_responses", 1, 0.10)]),
    ("pairs: diasafety (both labels)", [("diasafety", None, None)]),
    ("pairs: jbb_artifacts_jbc (both labels)", [("jbb_artifacts_jbc", None, None)]),
    ("pairs: stl_harmful_q_safe_answer (benign only)", [("stl_harmful_q_safe_answer", 0, None)]),
    ("prompts: coconot_contrast + 10% coconot_unsafe", [("coconot_contrast", 0, None), ("coconot_unsafe", 1, 0.10)]),
    ("prompts: wizardlm_testset + gsm8k + 8% strongreject", [("wizardlm_testset", 0, None), ("gsm8k", 0, None), ("strongreject", 1, 0.08)]),
    ("prompts: cybermetric (benign only)", [("cybermetric", 0, None)]),
    ("prompts: consumer_health + medquad questions (benign only)", [("consumer_health_questions", 0, None), ("medquad_questions", 0, None)]),
    ("texts: implicit_hate (both labels)", [("implicit_hate", None, None)]),
    ("texts: hatecheck (both labels)", [("hatecheck", None, None)]),
    ("mixed: oktest prompts + ag_news texts + 8% advbench + 8% stormfront hate", [
        ("oktest", 0, None), ("ag_news", 0, None), ("advbench", 1, 0.08), ("stormfront_hate_speech", 1, 0.08)]),
]


def pick(pool: dict[str, np.ndarray], spec: list[tuple[str, int | None, float | None]], rng: np.random.Generator) -> np.ndarray:
    """Row indices of a user set: whole benign sources, harmful ones sampled to the given share of the set."""
    sources, labels = pool["sources"], pool["labels"]
    base = [np.flatnonzero((sources == s) & ((labels == lab) if lab is not None else True)) for s, lab, share in spec if share is None]
    n_base = sum(len(b) for b in base)
    extra = []
    for s, lab, share in spec:
        if share is not None:
            rows = np.flatnonzero((sources == s) & (labels == lab))
            want = min(len(rows), max(2, round(share * n_base / (1 - share))))
            extra.append(rng.choice(rows, want, replace=False))
    return np.sort(np.concatenate(base + extra))


def split_by_group(rows: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Upload and held-back halves; a group is on one side only."""
    uniq = np.unique(groups[rows])
    up = set(rng.permutation(uniq)[: len(uniq) // 2].tolist())
    mask = np.asarray([g in up for g in groups[rows]])
    return rows[mask], rows[~mask]


def taus_of(thresholds: dict[str, float], overall: float, kinds: Sequence[str]) -> np.ndarray:
    return np.asarray([thresholds.get(k, overall) for k in kinds])


def held_back_metrics(y: np.ndarray, scores: np.ndarray, taus: np.ndarray) -> dict[str, Any]:
    drop = scores >= taus
    both = 0 < y.sum() < y.size
    return {"auroc": float(auroc(y, scores)) if both else None, "drop_share": float(drop.mean()),
            "fpr": float(drop[y == 0].mean()) if (y == 0).any() else None,
            "recall": float(drop[y == 1].mean()) if (y == 1).any() else None}


def active_default(X: np.ndarray, pool: dict[str, np.ndarray], kinds_all: list[str], prior_rows: np.ndarray) -> tuple[Subspace, float, dict[str, float]]:
    """The default fitted without the user's families, τ at 5% FPR of its source-held-out scores (as ``saft fit``)."""
    acc = MomentAccumulator(X.shape[1], max_cells=1024)
    acc.update(X[prior_rows], [kinds_all[i] for i in prior_rows], pool["labels"][prior_rows].tolist(), pool["sources"][prior_rows].tolist())
    default = lda().fit_moments(acc)
    sub_pool = EmbeddedPool(X[prior_rows], pool["labels"][prior_rows], [kinds_all[i] for i in prior_rows],
                            pool["kinds"][prior_rows].tolist(), pool["sources"][prior_rows].tolist(), pool["groups"][prior_rows].tolist())
    held = crossval(sub_pool, FitOptions(cross_fit="none"), by="source")["scores"]
    overall, thresholds = choose_thresholds(held, pool["labels"][prior_rows], sub_pool.item_kinds, ThresholdPolicy("fpr", 0.05))
    return default, overall, thresholds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    z = np.load(args.pool)
    pool = {k: z[k] for k in ("labels", "item_kinds", "kinds", "sources", "groups")}
    X = z["X"].astype(np.float64)
    kinds_all = pool["item_kinds"].tolist()
    results = []
    priors: dict[str, Any] = {}  # the active default of a user set does not depend on the seed
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        for name, spec in USER_SETS:
            user = pick(pool, spec, rng)
            fams = {FAMILY_OF.get(s, s) for s, _, _ in spec}
            out_sources = {s for s in set(pool["sources"].tolist()) if FAMILY_OF.get(s, s) in fams}
            prior_rows = np.flatnonzero(~np.isin(pool["sources"], list(out_sources)))
            if name not in priors:
                priors[name] = active_default(X, pool, kinds_all, prior_rows)
            default, overall, thresholds = priors[name]
            stats = default.statistics_
            upload, back = split_by_group(user, pool["groups"], rng)
            ku, kb = [kinds_all[i] for i in upload], [kinds_all[i] for i in back]
            yu, yb = pool["labels"][upload], pool["labels"][back]
            s_up = default.score_samples(X[upload], ku)
            t_up = taus_of(thresholds, overall, ku)
            pl = pseudo_labels(s_up, t_up)
            entry: dict[str, Any] = {"user_set": name, "seed": seed, "n_upload": int(upload.size), "n_held_back": int(back.size),
                                     "harmful_share": float(np.mean(pool["labels"][user])), "strategies": {}}

            def record(label: str, sub: Subspace, taus_by_kind: dict[str, float], labelled_upload: np.ndarray | None = None) -> None:
                sb = sub.score_samples(X[back], kb)
                m = held_back_metrics(yb, sb, taus_of(taus_by_kind, overall, kb))
                su = sub.score_samples(X[upload], ku)
                cmp = compare(s_up, t_up, su, taus_of(taus_by_kind, overall, ku), labelled_upload)
                m["guard"] = guard(cmp, GuardBounds())
                m["agreement_on_upload"] = cmp["agreement"]
                entry["strategies"][label] = m

            record("default", default, thresholds)
            # The paper's SAFT refit on the upload alone, τ dropping its top 10%.
            try:
                saft = Subspace(k=1, method="saft", center="kind").fit(X[upload], ku)
                s_saft = saft.score_samples(X[upload], ku)
                o, t = choose_thresholds(s_saft, None, ku, ThresholdPolicy("drop_rate", 0.1))
                record("saft", saft, {**t, **{k: o for k in set(kb) - set(t)}})
            except FitError as err:
                entry["strategies"]["saft"] = {"error": str(err)}
            for w in (0.1, 0.25, 0.5):
                acc_u = combined_accumulator(stats, X[upload], ku, pl, [True] * upload.size, AnchorWeights(pseudo=w))
                sub = lda().fit_moments(acc_u)
                record(f"anchored(pseudo={w:g})", sub, carry_thresholds(default, sub, stats, thresholds))
            # Only the rows the active version keeps, as benign: the user's own format taught as benign.
            keep = np.flatnonzero(pl == 0)
            for w in (0.5,):
                acc_b = combined_accumulator(stats, X[upload][keep], [ku[i] for i in keep], pl[keep], [True] * keep.size,
                                             AnchorWeights(pseudo=w))
                sub = lda().fit_moments(acc_b)
                record(f"anchored(kept-as-benign={w:g})", sub, carry_thresholds(default, sub, stats, thresholds))
            if 0 < yu.sum() < yu.size:
                for w in (4.0, 16.0, 32.0):
                    acc_l = combined_accumulator(stats, X[upload], ku, yu, [False] * upload.size, AnchorWeights(labelled=w))
                    sub = lda().fit_moments(acc_l)
                    record(f"labelled({w:g})", sub, carry_thresholds(default, sub, stats, thresholds), yu)
                    if w == 16.0:
                        s_l = sub.score_samples(X[upload], ku)
                        try:
                            o2, t2 = choose_thresholds(s_l, yu, ku, ThresholdPolicy("fpr", 0.05))
                            record(f"labelled({w:g}), tau fpr:0.05 on upload", sub, t2, yu)
                        except Exception as err:  # noqa: BLE001
                            entry["strategies"]["labelled(16), tau fpr:0.05 on upload"] = {"error": str(err)}
                for m_lab in (100, 200, 300):
                    if m_lab >= upload.size:
                        continue
                    chosen = rng.choice(upload.size, m_lab, replace=False)
                    is_pseudo = np.ones(upload.size, dtype=bool)
                    is_pseudo[chosen] = False
                    if not 0 < yu[chosen].sum() < m_lab:
                        continue
                    mixed = np.where(is_pseudo, pl, yu)
                    for w in (16.0, 32.0):
                        acc_p = combined_accumulator(stats, X[upload], ku, mixed, is_pseudo, AnchorWeights(labelled=w, pseudo=1.0))
                        sub = lda().fit_moments(acc_p)
                        record(f"partial({m_lab},{w:g})", sub, carry_thresholds(default, sub, stats, thresholds),
                               np.where(is_pseudo, -1, yu))
                try:
                    rep = lda().fit(X[upload], ku, yu.tolist(), ["upload"] * upload.size)
                    s_r = rep.score_samples(X[upload], ku)
                    o3, t3 = choose_thresholds(s_r, yu, ku, ThresholdPolicy("fpr", 0.05))
                    record("replace (labelled upload alone)", rep, {**t3, **{k: o3 for k in set(kb) - set(t3)}}, yu)
                except FitError as err:
                    entry["strategies"]["replace (labelled upload alone)"] = {"error": str(err)}
            results.append(entry)
            d = entry["strategies"]["default"]
            print(f"{seed} {name[:60]:60} default auroc={d['auroc']} drop={d['drop_share']:.3f}", flush=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

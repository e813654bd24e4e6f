"""Source-held-out evaluation: how a fit does on data from sources it was never fitted on.

Owns the folds and their report. Each source (or each family of similar sources) is held out in turn: the
subspace is fitted on every other one with the same options as ``saft fit``, its per-kind τ chosen by the
fit's policy on those training items, and the held-out items are scored. Near-duplicates share a ``group``;
a group never straddles a fold (a held-out item's group is left out of that fold's training too). Works on
embedded vectors only: numpy, no model, no I/O.

Must not: read files, embed or write the report (``saft crossval`` in ``app.cli`` does), or fit, choose τ or measure
otherwise than ``app.core.subspace`` and ``app.core.quality`` do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from app.core.pipeline import FitOptions
from app.core.quality import ThresholdError, choose_thresholds, grouped_quality
from app.core.subspace import FitError, MomentAccumulator, Subspace

FoldBy = Literal["source", "family"]


@dataclass
class EmbeddedPool:
    """Labelled, embedded lines: one row each."""

    vectors: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,) 0/1
    item_kinds: list[str]  # text / pair: what the subspace centers and thresholds by
    kinds: list[str]  # the data's own kind field where present (prompt / text / pair): what is reported
    sources: list[str]
    groups: list[str]


def make_subspace(options: FitOptions) -> Subspace:
    """The (unfitted) subspace ``saft fit`` would fit with these options on labelled data."""
    opts = options.resolved(labelled=True)
    return Subspace(k=opts.k, method=opts.method, center=opts.center, standardize=opts.standardize,  # type: ignore[arg-type]  # resolved(): "auto" is decided by now
                    shrinkage=opts.shrinkage, balance=opts.balance, nuisance=opts.nuisance)


def fit_subspace(options: FitOptions, X: np.ndarray, item_kinds: Sequence[str], labels: Sequence[int], sources: Sequence[str]) -> Subspace:
    """The subspace ``saft fit`` would publish for these rows (labelled)."""
    return make_subspace(options).fit(X, item_kinds, list(labels), sources)


def crossval(
    pool: EmbeddedPool,
    options: FitOptions,
    *,
    by: FoldBy = "source",
    families: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Hold out each source (``by="source"``) or family (``"family"``: ``families`` maps source → family; a
    source it does not name is a family of its own) in turn; report the pooled out-of-fold quality per kind
    and, per source, the share dropped (benign items) and caught (harmful ones) at the fold's τ.

    The calibration moments are summed once per (kind, label, source) cell; a fold is every cell but the
    held-out sources', less the rows of its near-duplicate groups, so a fold costs one solve, not a pass."""
    if by not in ("source", "family"):
        raise FitError(f"crossval: by must be 'source' or 'family', got {by!r}")
    policy = options.resolved(labelled=True).policy
    assert policy is not None
    sources = np.asarray(pool.sources)
    units = sources if by == "source" else np.asarray([(families or {}).get(s, s) for s in pool.sources])
    groups = np.asarray(pool.groups)
    item_kinds = np.asarray(pool.item_kinds)
    labels = np.asarray(pool.labels)
    if len(set(units.tolist())) < 2:
        raise FitError(f"crossval needs at least 2 {by}s; the data has {len(set(units.tolist()))} (give each line a 'source')")
    acc = MomentAccumulator(pool.vectors.shape[1], max_cells=1024)
    acc.update(pool.vectors, item_kinds.tolist(), labels.tolist(), sources.tolist())

    group_ids = np.unique(groups, return_inverse=True)[1]  # integers: a fold's group test is then one lookup

    def fit_without(held: np.ndarray) -> tuple[Subspace, np.ndarray]:
        """The fit on every row but ``held`` and their near-duplicates (whole groups), and its training mask."""
        out_groups = np.zeros(group_ids.max() + 1, dtype=bool)
        out_groups[group_ids[held]] = True
        train = ~held & ~out_groups[group_ids]
        near = ~held & ~train
        fold = acc.without(set(sources[held].tolist()))
        if near.any():  # near-duplicates of held-out items in other sources: out of this fold's training too
            fold = fold.minus(pool.vectors[near], item_kinds[near].tolist(), labels[near].tolist(), sources[near].tolist())
        if len(set(labels[train].tolist())) < 2:
            raise FitError(f"crossval: without {by} {sorted(set(units[held].tolist()))} the training data has one label only")
        return make_subspace(options).fit_moments(fold), train

    cross_fit = options.cross_fit == "source"
    unit_ids = {u: units == u for u in sorted(set(units.tolist()))}  # one boolean mask per unit, computed once
    scores = np.full(len(labels), np.nan)
    taus = np.full(len(labels), np.nan)
    folds = []
    for unit, test in unit_ids.items():
        sub, train = fit_without(test)
        all_scores = sub.score_samples(pool.vectors, item_kinds.tolist())
        basis = all_scores
        if cross_fit:  # τ as the product chooses it: on the training sources' own held-out scores (nested)
            basis = np.full(len(labels), np.nan)
            for inner in sorted(set(units[train].tolist())):
                held = test | unit_ids[inner]
                try:
                    inner_sub, _ = fit_without(held)
                except FitError:  # too few sources left for this pair held out: its rows set no τ
                    continue
                rows = train & unit_ids[inner]
                basis[rows] = inner_sub.score_samples(pool.vectors[rows], item_kinds[rows].tolist())
        fold_train = train & np.isfinite(basis)
        try:
            overall, by_kind = choose_thresholds(basis[fold_train], labels[fold_train], item_kinds[fold_train].tolist(), policy)
        except ThresholdError:  # too few sources for nested held-out scores of both labels: the fold's own scores
            overall, by_kind = choose_thresholds(all_scores[train], labels[train], item_kinds[train].tolist(), policy)
        scores[test] = all_scores[test]
        taus[test] = [by_kind.get(k, overall) for k in item_kinds[test]]
        folds.append({"held_out": unit, "n_test": int(test.sum()), "n_train": int(train.sum()),
                      "n_left_out_near_duplicates": int((~test & ~train).sum()), "thresholds": by_kind})
        if progress is not None:
            progress(unit)
    metrics = grouped_quality(labels, scores, taus, {"kind": pool.kinds, "source": pool.sources})
    return {"by": by, "n_folds": len(folds), "n": len(labels), "metrics": metrics, "folds": folds,
            "scores": scores, "thresholds": taus, **worst_sources(metrics["by_source"])}


def worst_sources(by_source: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The benign source with the largest share dropped and the harmful one with the smallest share caught."""
    benign = [(m["fpr_at_threshold"], s) for s, m in by_source.items() if m["n"] > m["n_harmful"]]
    harmful = [(m["recall"], s) for s, m in by_source.items() if m["n_harmful"] > 0]
    out: dict[str, Any] = {}
    if benign:
        rate, source = max(benign)
        out["worst_benign_source"] = {"source": source, "dropped": rate}
    if harmful:
        rate, source = min(harmful)
        out["worst_harmful_source"] = {"source": source, "caught": rate}
    return out

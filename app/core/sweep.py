"""Choose layer(s), pooling, method and k by measurement: embed once, fit every combination, rank.

Each file is embedded once for all requested layers and poolings; every combination is then a
cheap fit on stored vectors. Ranked by the worst per-kind AUROC (a default must hold on every
format, not just on average).

Owns: ``EmbeddedSet``/``embed_set``, the group-wise hold-out (``holdout_mask``) and ``run_sweep``. Must not: read
files, print or write reports (``saft sweep`` in ``app.cli`` does), store versions, or fit and measure otherwise than
``Subspace`` and ``app.core.quality`` do.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from app.core.embedding import BatchLimits, Embedder, EmbeddingConfig, Pooling
from app.core.pipeline import Line, Progress, chunks
from app.core.quality import quality
from app.core.subspace import FitError, Subspace


@dataclass
class EmbeddedSet:
    """Stored vectors of one labelled file: {pooling: (n, n_layers, hidden)} plus labels and kinds."""

    vectors: dict[str, np.ndarray]
    layers: tuple[int, ...]
    labels: np.ndarray
    item_kinds: list[str]
    kinds: np.ndarray  # the data's own 'kind' field where present (for per-kind quality)
    groups: list[str]

    def subset(self, mask: np.ndarray) -> EmbeddedSet:
        idx = np.flatnonzero(mask)
        return EmbeddedSet(
            {p: v[idx] for p, v in self.vectors.items()}, self.layers, self.labels[idx],
            [self.item_kinds[i] for i in idx], self.kinds[idx], [self.groups[i] for i in idx],
        )

    def features(self, pooling: str, layers: Sequence[int]) -> np.ndarray:
        cols = [self.layers.index(layer) for layer in layers]
        v = self.vectors[pooling][:, cols]
        return v.reshape(v.shape[0], -1)


def embed_set(
    embedder: Embedder,
    lines: Iterable[Line],
    layers: Sequence[int],
    poolings: Sequence[Pooling],
    base: EmbeddingConfig,
    *,
    limits: BatchLimits | None = None,
    progress: Progress | None = None,
) -> EmbeddedSet:
    """Embed labelled lines once for every layer and pooling of the sweep."""
    absolute = embedder.normalize_layers(layers)
    parts: dict[str, list[np.ndarray]] = {p: [] for p in poolings}
    labels: list[int] = []
    item_kinds: list[str] = []
    kinds: list[str] = []
    groups: list[str] = []
    for chunk in chunks(lines, 256):
        for line in chunk:
            if line.item is None or line.label is None:
                raise FitError(f"line {line.number}: {line.error or 'label: missing (a sweep needs labels 0/1)'}")
        encoded = embedder.encode_items([line.item for line in chunk], base)
        out = {p: np.empty((len(chunk), len(absolute), embedder.hidden_size), np.float32) for p in poolings}
        for idx in (limits or embedder.batch_limits).plan([len(e.input_ids) for e in encoded]):
            pooled = embedder.forward_multi([encoded[i] for i in idx], absolute, poolings)
            for p in poolings:
                out[p][idx] = pooled[p]
        for p in poolings:
            parts[p].append(out[p])
        for line in chunk:
            obj = line.obj or {}
            labels.append(int(line.label))
            item_kinds.append(line.item.kind)
            kinds.append(str(obj.get("kind", line.item.kind)))
            groups.append(str(obj.get("group", obj.get("id", line.number))))
        if progress is not None:
            progress(len(chunk))
    if not labels:
        raise FitError("no lines to sweep over")
    return EmbeddedSet({p: np.concatenate(v) for p, v in parts.items()}, absolute, np.asarray(labels), item_kinds,
                       np.asarray(kinds), groups)


def holdout_mask(groups: Sequence[str], fraction: float = 0.25) -> np.ndarray:
    """True for a deterministic ``fraction`` of groups (whole groups, so near-duplicates never straddle)."""
    return np.array([int(hashlib.sha256(g.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction for g in groups])


def run_sweep(
    train: EmbeddedSet,
    test: EmbeddedSet,
    *,
    layer_sets: Sequence[Sequence[int]],
    poolings: Sequence[str],
    methods: Sequence[str],
    ks: Sequence[int],
    centers: Sequence[str],
    shrinkages: Sequence[float] = (0.5,),
) -> list[dict]:
    """Fit every combination on ``train`` and measure it on ``test``; best first."""
    rows = []
    for layers, pooling, method, center in itertools.product(layer_sets, poolings, methods, centers):
        Xtr, Xte = train.features(pooling, layers), test.features(pooling, layers)
        variants = [(k, 0.0) for k in ks] if method == "saft" else [(1, s) for s in shrinkages]
        for k, shrinkage in variants:
            try:
                sub = Subspace(k=k, method=method, center=center, shrinkage=shrinkage).fit(  # type: ignore[arg-type]  # CLI words for Literal fields, unchecked (FitParams, step 3)
                    Xtr, train.item_kinds, train.labels.tolist() if method == "lda" else None
                )
            except FitError as err:
                rows.append({"layers": list(layers), "pooling": pooling, "method": method, "k": k, "center": center,
                             "shrinkage": shrinkage, "error": str(err)})
                continue
            s = sub.score_samples(Xte, test.item_kinds)
            per_kind = {}
            for kind in sorted(set(test.kinds.tolist())):
                m = test.kinds == kind
                q = quality(test.labels[m], s[m], float("inf"))
                per_kind[kind] = {"auroc": q.get("auroc"), "tpr_at_5pct_fpr": q.get("tpr_at_5pct_fpr")}
            aurocs = [v["auroc"] for v in per_kind.values() if v["auroc"] is not None]
            rows.append({
                "layers": list(layers), "pooling": pooling, "method": method, "k": k, "center": center,
                "shrinkage": shrinkage, "worst_kind_auroc": min(aurocs) if aurocs else None, "by_kind": per_kind,
            })
    return sorted(rows, key=lambda r: -(r.get("worst_kind_auroc") or -1.0))

"""Self-contained HTML reports of a fit or an evaluation: score histograms, ROC and PR curves, τ, and
the calibration of probabilities (reliability curve, expected calibration error) where a version has one.

Plots are rendered with matplotlib (Agg) into inline PNGs so the file can be mailed or archived.

Owns: ``write_report`` (one HTML file, written atomically) and its plots. Must not: score, fit or choose τ, or
compute the quality table it shows (callers pass ``app.core.quality``'s metrics); it writes only the file it is given.
"""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from app.core.calibration import expected_calibration_error, reliability_curve

_METRIC_COLUMNS = ("n", "n_harmful", "auroc", "auprc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "precision", "recall", "f1", "fpr_at_threshold", "drop_rate")


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _histograms(scores: np.ndarray, labels: np.ndarray | None, kinds: np.ndarray, threshold: np.ndarray) -> str:
    groups = sorted(set(kinds.tolist()))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], groups, strict=True):
        mask = kinds == kind
        bins = np.histogram_bin_edges(scores[mask], bins=50)
        if labels is None:
            ax.hist(scores[mask], bins=bins, color="#4c72b0", alpha=0.8, label="unlabelled")
        else:
            for lab, color, name in ((0, "#4c72b0", "benign (0)"), (1, "#c44e52", "harmful (1)")):
                sel = mask & (labels == lab)
                if sel.any():
                    ax.hist(scores[sel], bins=bins, color=color, alpha=0.6, label=f"{name}, n={int(sel.sum())}")
        for tau in sorted(set(threshold[mask].tolist())):  # the τ(s) its items were decided by
            ax.axvline(tau, color="black", linestyle="--", label=f"τ = {tau:.4g}")
        ax.set_title(f"score distribution: {kind}")
        ax.set_xlabel("score")
        ax.legend(fontsize=8)
    return _png(fig)


def _curves(scores: np.ndarray, labels: np.ndarray, kinds: np.ndarray, threshold: np.ndarray) -> str:
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in ["all", *sorted(set(kinds.tolist()))]:
        mask = np.ones_like(labels, dtype=bool) if kind == "all" else kinds == kind
        y, s = labels[mask], scores[mask]
        if len(set(y.tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        precision, recall, _ = precision_recall_curve(y, s)
        (line,) = roc_ax.plot(fpr, tpr, label=kind)
        pr_ax.plot(recall, precision, label=kind, color=line.get_color())
        dropped = s > threshold[mask]
        roc_ax.scatter([(dropped & (y == 0)).sum() / max((y == 0).sum(), 1)], [(dropped & (y == 1)).sum() / max(y.sum(), 1)],
                       marker="o", s=25, color=line.get_color())
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_ax.set(title="ROC (dots: τ)", xlabel="false-positive rate", ylabel="true-positive rate")
    pr_ax.set(title="precision-recall", xlabel="recall", ylabel="precision")
    roc_ax.legend(fontsize=8)
    pr_ax.legend(fontsize=8)
    return _png(fig)


def _reliability(probabilities: np.ndarray, labels: np.ndarray, kinds: np.ndarray) -> tuple[str, str]:
    """The ECE table and the reliability plot (observed harmful fraction against mean predicted probability, per bin)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    rows = []
    for kind in ["all", *sorted(set(kinds.tolist()))]:
        mask = np.ones_like(labels, dtype=bool) if kind == "all" else kinds == kind
        p, y = probabilities[mask], labels[mask]
        curve = reliability_curve(p, y)
        filled = [i for i, n in enumerate(curve["count"]) if n]
        ax.plot([curve["mean_predicted"][i] for i in filled], [curve["observed"][i] for i in filled], marker="o", label=kind)
        ece = expected_calibration_error(p, y)
        rows.append(f"<tr><th>{html.escape(str(kind))}</th><td>{int(mask.sum())}</td><td>{ece:.4f}</td></tr>")
    ax.set(title="reliability (10 equal-width bins)", xlabel="mean predicted P(harmful)", ylabel="observed harmful fraction",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    table = f"<table><tr><th>kind</th><th>n</th><th>expected calibration error</th></tr>{''.join(rows)}</table>"
    return table, _png(fig)


def _table(report: dict[str, Any]) -> str:
    rows = []
    for section, content in report.items():
        entries = {"overall": content} if section == "overall" else content
        for key, metrics in entries.items():
            cells = "".join(
                f"<td>{metrics[c]:.3f}</td>" if isinstance(metrics.get(c), float) else f"<td>{metrics.get(c, '–')}</td>"
                for c in _METRIC_COLUMNS
            )
            rows.append(f"<tr><th>{html.escape(section)}</th><th>{html.escape(str(key))}</th>{cells}</tr>")
    head = "".join(f"<th>{c}</th>" for c in _METRIC_COLUMNS)
    return f"<table><tr><th>group</th><th>value</th>{head}</tr>{''.join(rows)}</table>"


def write_report(
    path: Path,
    *,
    title: str,
    summary: dict[str, Any],
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray | None,
    kinds: Sequence[str],
    threshold: float | Sequence[float] | np.ndarray,
    metrics: dict[str, Any] | None,
    probabilities: Sequence[float] | np.ndarray | None = None,
) -> Path:
    """Write the HTML report atomically and return its path; ``threshold`` is one τ or each item's own.

    With ``probabilities`` (each item's calibrated P(harmful)) and labels, a calibration section too.
    """
    s = np.asarray(scores, dtype=np.float64)
    taus = np.broadcast_to(np.asarray(threshold, dtype=np.float64), s.shape)
    y = None if labels is None else np.asarray(labels, dtype=int)
    k = np.asarray(kinds)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<table>" + "".join(f"<tr><th>{html.escape(str(a))}</th><td>{html.escape(str(b))}</td></tr>" for a, b in summary.items()) + "</table>",
        "<h2>Scores</h2>",
        f'<img alt="score histograms" src="data:image/png;base64,{_histograms(s, y, k, taus)}">',
    ]
    if y is not None and metrics:
        parts += [
            "<h2>Quality</h2>",
            _table(metrics),
            f'<img alt="ROC and PR curves" src="data:image/png;base64,{_curves(s, y, k, taus)}">',
        ]
    if y is not None and probabilities is not None:
        ece_table, plot = _reliability(np.asarray(probabilities, dtype=np.float64), y, k)
        parts += ["<h2>Calibration of P(harmful)</h2>", ece_table,
                  f'<img alt="reliability curve" src="data:image/png;base64,{plot}">']
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        "th{background:#f4f4f4;text-align:left}img{max-width:100%}"
    )
    doc = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(doc)
    os.replace(tmp, path)
    return path

"""Source-held-out evaluation, source-balanced fitting, per-kind thresholds and embedding files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import app as cli
from app.core.crossval import EmbeddedPool, crossval, fit_subspace
from app.core.embedstore import EmbeddingFile, EmbeddingFileError
from app.core.pipeline import FitOptions
from app.core.quality import ThresholdPolicy, choose_thresholds
from app.core.subspace import FitError, MomentAccumulator, Subspace
from tests.support import DATA_DIR, write_jsonl


def _synthetic(seed: int = 0) -> EmbeddedPool:
    """Four sources; harm along dim 0; each source also sits at its own offset along dim 1, which a
    discriminant can learn as a shortcut when one benign and one harmful source dominate."""
    rng = np.random.default_rng(seed)
    rows = []
    for source, label, n, offset in (("big_benign", 0, 400, 2.0), ("big_harmful", 1, 400, -2.0),
                                     ("small_benign", 0, 40, -2.0), ("small_harmful", 1, 40, 2.0)):
        X = rng.normal(size=(n, 6))
        X[:, 0] += 1.5 * label
        X[:, 1] += offset
        rows += [(x, label, source, f"{source}-{i}") for i, x in enumerate(X)]
    vectors = np.stack([r[0] for r in rows]).astype(np.float32)
    labels = np.array([r[1] for r in rows])
    return EmbeddedPool(vectors, labels, ["text"] * len(rows), ["prompt"] * len(rows), [r[2] for r in rows], [r[3] for r in rows])


def test_source_balance_makes_a_small_source_weigh_as_much_as_a_big_one() -> None:
    pool = _synthetic()
    X, y, src = pool.vectors, pool.labels, pool.sources
    item = Subspace(method="lda", shrinkage=0.0).fit(X, pool.item_kinds, y.tolist(), src)
    balanced = Subspace(method="lda", shrinkage=0.0, balance="source").fit(X, pool.item_kinds, y.tolist(), src)
    # Item weighting follows the big sources' offset (dim 1); balancing cancels it (the small sources sit the other way).
    assert abs(item.components_[0, 1]) > 0.5
    assert abs(balanced.components_[0, 1]) < 0.1 and abs(balanced.components_[0, 0]) > 0.95
    # Every source carries the same total weight within its label, and each label keeps its total.
    acc = MomentAccumulator(X.shape[1])
    acc.update(X, pool.item_kinds, y.tolist(), src)
    w = acc.weights("source")
    totals = {key: w[key] * m.n for key, m in acc.groups.items()}
    assert totals[("text", 0, "big_benign")] == pytest.approx(totals[("text", 0, "small_benign")]) == pytest.approx(220.0)
    assert totals[("text", 1, "big_harmful")] == pytest.approx(totals[("text", 1, "small_harmful")]) == pytest.approx(220.0)
    assert set(acc.weights("item").values()) == {1.0}


def test_nuisance_directions_of_benign_sources_are_projected_out() -> None:
    pool = _synthetic()
    sub = Subspace(method="lda", shrinkage=0.5, nuisance=1).fit(pool.vectors, pool.item_kinds, pool.labels.tolist(), pool.sources)
    # The two benign sources differ along dim 1 only (in expectation): the direction keeps (almost) nothing of it.
    assert abs(sub.components_[0, 1]) < 0.1
    with pytest.raises(FitError, match="benign sources"):
        Subspace(method="lda", nuisance=2).fit(pool.vectors, pool.item_kinds, pool.labels.tolist(), pool.sources)


def test_accumulator_without_a_source_equals_a_fit_on_the_rest() -> None:
    pool = _synthetic()
    acc = MomentAccumulator(pool.vectors.shape[1])
    acc.update(pool.vectors, pool.item_kinds, pool.labels.tolist(), pool.sources)
    keep = np.asarray(pool.sources) != "small_harmful"
    a = Subspace(method="lda", balance="source").fit_moments(acc.without({"small_harmful"}))
    b = Subspace(method="lda", balance="source").fit(pool.vectors[keep], [k for k, m in zip(pool.item_kinds, keep, strict=True) if m],
                                                     pool.labels[keep].tolist(), [s for s, m in zip(pool.sources, keep, strict=True) if m])
    np.testing.assert_allclose(a.score_samples(pool.vectors), b.score_samples(pool.vectors), rtol=1e-4, atol=1e-4)
    assert acc.counts() == {"text/0": 440, "text/1": 440} and acc.source_counts()["big_benign"] == 400


def test_thresholds_are_chosen_per_kind_by_the_policy() -> None:
    rng = np.random.default_rng(1)
    scores = np.r_[rng.normal(0, 1, 500), rng.normal(5, 1, 500)]  # the pair kind's scores sit higher
    labels = np.r_[np.zeros(400), np.ones(100), np.zeros(400), np.ones(100)].astype(int)
    kinds = ["text"] * 500 + ["pair"] * 500
    overall, by_kind = choose_thresholds(scores, labels, kinds, ThresholdPolicy("fpr", 0.05))
    assert set(by_kind) == {"text", "pair"} and by_kind["pair"] > by_kind["text"] + 3
    for kind, lo in (("text", 0), ("pair", 500)):
        benign = scores[lo:lo + 400]
        assert np.mean(benign > by_kind[kind]) <= 0.05
    # A kind with one class only gets no τ of its own (the single τ decides it).
    _, partial = choose_thresholds(scores[:600], labels[:600], kinds[:600], ThresholdPolicy("fpr", 0.05))
    assert set(partial) == {"text"} and overall != by_kind["text"]


def test_crossval_holds_out_each_source_and_never_splits_a_group() -> None:
    pool = _synthetic()
    pool.groups[0] = pool.groups[400] = "shared"  # one near-duplicate pair across two sources
    result = crossval(pool, FitOptions(method="lda", balance="source"), by="source")
    assert result["n_folds"] == 4 and np.isfinite(result["scores"]).all()
    folds = {f["held_out"]: f for f in result["folds"]}
    assert folds["big_benign"]["n_left_out_near_duplicates"] == 1 and folds["small_benign"]["n_left_out_near_duplicates"] == 0
    by_source = result["metrics"]["by_source"]
    assert set(by_source) == {"big_benign", "big_harmful", "small_benign", "small_harmful"}
    # The benign source with the most dropped and the harmful one with the fewest caught are named.
    worst = max((m["fpr_at_threshold"], s) for s, m in by_source.items() if m["n_harmful"] == 0)
    assert result["worst_benign_source"] == {"source": worst[1], "dropped": worst[0]}
    assert result["metrics"]["by_kind"]["prompt"]["auroc"] > 0.6
    families = crossval(pool, FitOptions(method="lda"), by="family", families={"big_benign": "big", "big_harmful": "big"})
    assert families["n_folds"] == 3
    with pytest.raises(FitError, match="one label only"):
        crossval(pool, FitOptions(method="lda"), by="family", families={"big_harmful": "h", "small_harmful": "h"})


def test_fit_subspace_matches_the_subspace_fit_options_describe() -> None:
    pool = _synthetic()
    sub = fit_subspace(FitOptions(balance="source", nuisance=1, shrinkage=0.3), pool.vectors, pool.item_kinds, pool.labels, pool.sources)
    assert sub.get_params() == {"k": 1, "method": "lda", "center": "kind", "standardize": True, "shrinkage": 0.3,
                                "balance": "source", "nuisance": 1}


def test_embedding_file_refuses_other_weights_or_config(tmp_path: Path) -> None:
    from app.core.embedding import EmbeddingConfig

    config = EmbeddingConfig(layers=(20,), pooling="mean", template="judge", max_length=512)
    store = EmbeddingFile("abc", config)
    store.add("k1", np.arange(4, dtype=np.float32), 7, False)
    path = store.save(tmp_path / "e.npz")
    back = EmbeddingFile.load(path, "abc", config)
    row = back.get("k1")
    assert row is not None and row[1:] == (7, False) and np.array_equal(row[0], np.arange(4))
    with pytest.raises(EmbeddingFileError, match="weights"):
        EmbeddingFile.load(path, "other", config)
    with pytest.raises(EmbeddingFileError, match="embedding"):
        EmbeddingFile.load(path, "abc", EmbeddingConfig(layers=(16,), pooling="mean", template="judge", max_length=512))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(EmbeddingFileError, match="not a readable"):
        EmbeddingFile.load(tmp_path / "bad.npz", "abc", config)


def _small_pool_files(tmp_path: Path) -> list[Path]:
    """Real rows of four sources (two benign, two harmful, prompts only) from the shared data."""
    wanted = {"alpaca_instructions": 10, "advbench": 10, "oktest": 8, "harmfulqa": 8}
    rows: dict[str, list[dict]] = {s: [] for s in wanted}
    for name in ("calibration", "extra_sources"):
        for line in (DATA_DIR / f"{name}.jsonl").open():
            r = json.loads(line)
            if r["source"] in wanted and len(rows[r["source"]]) < wanted[r["source"]]:
                rows[r["source"]].append(r)
    return [write_jsonl(tmp_path / "a.jsonl", rows["alpaca_instructions"] + rows["advbench"]),
            write_jsonl(tmp_path / "b.jsonl", rows["oktest"] + rows["harmfulqa"] + ["{not json"])]


def test_cli_crossval_reports_per_kind_and_per_source_and_reuses_its_embeddings(tmp_path: Path) -> None:
    files = _small_pool_files(tmp_path)
    args = ["crossval", *map(str, files), "--layers", "8", "--max-length", "64", "--embeddings", str(tmp_path / "emb.npz"),
            "--json", str(tmp_path / "cv.json"), "--report", str(tmp_path / "cv.html"), "--balance", "source"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    result = json.loads((tmp_path / "cv.json").read_text())
    assert result["n_folds"] == 4 and result["n"] == 36
    assert result["rejected"]["count"] == 1 and "b.jsonl line 17" in result["rejected"]["lines"][0]
    assert set(result["metrics"]["by_source"]) == {"alpaca_instructions", "advbench", "oktest", "harmfulqa"}
    assert 0.0 <= result["metrics"]["by_kind"]["prompt"]["auroc"] <= 1.0
    assert result["fit"]["balance"] == "source" and result["embedding"]["layers"] == [8]
    assert "worst_harmful_source" in result and (tmp_path / "cv.html").stat().st_size > 1000
    # Second run: every line comes from the embedding file (no model pass), same numbers.
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert "embedded and added" not in second.output
    assert json.loads((tmp_path / "cv.json").read_text())["metrics"] == result["metrics"]


def test_cross_fitted_tau_is_chosen_on_held_out_scores_and_drops_fewer_benign_items_of_new_sources() -> None:
    rng = np.random.default_rng(3)
    rows = []
    for s in range(6):  # six sources per label, each at its own offset: a new source's benign items score higher
        for label in (0, 1):
            X = rng.normal(size=(60, 5))
            X[:, 0] += 2.0 * label
            X[:, 1:] += rng.normal(scale=1.5, size=4)
            rows += [(x, label, f"src{s}-{label}") for x in X]
    pool = EmbeddedPool(np.stack([r[0] for r in rows]).astype(np.float32), np.array([r[1] for r in rows]),
                        ["text"] * len(rows), ["prompt"] * len(rows), [r[2] for r in rows], [str(i) for i in range(len(rows))])
    plain = crossval(pool, FitOptions(method="lda", balance="source", cross_fit="none"), by="source")
    nested = crossval(pool, FitOptions(method="lda", balance="source", cross_fit="source"), by="source")
    assert np.allclose(plain["scores"], nested["scores"])  # the same held-out scores; only τ differs
    fpr = lambda r: r["metrics"]["by_kind"]["prompt"]["fpr_at_threshold"]
    assert fpr(nested) < fpr(plain)  # in-sample τ underestimates a new source's benign scores
    assert all(f["thresholds"]["text"] > g["thresholds"]["text"] for f, g in zip(nested["folds"], plain["folds"], strict=True))

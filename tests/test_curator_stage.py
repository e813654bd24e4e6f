"""``SaftScore`` in NeMo Curator: the README pipeline (``RayDataExecutor`` on a local 2-CPU Ray cluster, one actor)
keeps what ``saft filter`` keeps, and the stage's columns, on every row of real ``DocumentBatch``es read by Curator's
reader, are ``saft filter``'s scores and verdicts, which Curator's ``Filter`` acts on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from nemo_curator.stages.text.filters import Filter
from nemo_curator.stages.text.io.reader.jsonl import JsonlReaderStage
from nemo_curator.tasks import DocumentBatch

from app.core.items import ItemError
from app.integrations.curator_stage import SaftScore, keep
from app.integrations.local import VERDICT_FIELDS
from tests.support import readme_example, saft_filter_reference, write_data

pytestmark = pytest.mark.slow  # a Ray cluster and a model in its actor


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("curator")
    write_data(root)
    return root


@pytest.fixture(scope="module")
def reference(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return saft_filter_reference(root / "data", tmp_path_factory.mktemp("saft-filter"))


@pytest.fixture(scope="module")
def readme_run(root: Path) -> list[dict[str, Any]]:
    """The README's Curator example, as written, run in ``root`` on a small local cluster started here (the
    executor joins it, and shuts it down when the pipeline is done)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cwd = os.getcwd()
    os.chdir(root)  # first: Ray's workers start in the driver's directory, and the example's paths are relative
    try:
        ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
        exec(compile(readme_example("curator"), "README.md", "exec"), {})  # noqa: S102 (on the cluster started above)
    finally:
        os.chdir(cwd)
        ray.shutdown()
    return [json.loads(line) for path in sorted((root / "out" / "kept").glob("*.jsonl")) for line in path.read_text().splitlines()]


def _close(value: float | None, expected: float | None) -> bool:
    return value == expected if expected is None else value == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_readme_pipeline_keeps_what_saft_filter_keeps(readme_run: list[dict], reference: dict) -> None:
    assert {row["id"] for row in readme_run} == {i for i, r in reference.items() if r["bucket"] == "kept"}
    for row in readme_run:
        ref = reference[row["id"]]
        assert row["saft_verdict"] == "keep" and row["saft_error"] is None
        assert _close(row["saft_score"], ref["score"]) and _close(row["saft_probability"], ref["probability"])
        assert row["saft_threshold"] == pytest.approx(ref["threshold"], rel=1e-9)  # JSON through pandas: 10 digits


@pytest.fixture(scope="module")
def stage() -> SaftScore:
    stage = SaftScore()
    stage.setup()
    return stage


def _batches(root: Path) -> list[DocumentBatch]:
    """Each data file as Curator's reader reads it (a pyarrow table); the dev lines then as a pandas frame in reverse
    order, whose index is not a range (as after an upstream ``Filter``) and is no column of the row."""
    reader = JsonlReaderStage()
    chat, items = (DocumentBatch(dataset_name="t", data=reader.read_data([str(root / "data" / name)])) for name in ("chat.jsonl", "items.jsonl"))
    return [chat, DocumentBatch(dataset_name="t", data=items.to_pandas().iloc[::-1])]


def test_stage_columns_on_every_row_are_saft_filters_and_filter_acts_on_them(stage: SaftScore, root: Path, reference: dict) -> None:
    batches = _batches(root)
    scored = stage.process_batch(batches)
    assert [len(b.data) for b in scored] == [len(b.data) for b in batches]
    for before, after in zip(batches, scored, strict=True):
        df = after.to_pandas()
        assert list(df.columns) == [*before.get_columns(), *VERDICT_FIELDS]
        for row in df.to_dict("records"):
            ref = reference[row["id"]]
            if ref["bucket"] == "rejected":
                assert row["saft_verdict"] == "rejected" and row["saft_error"] == ref["error"] and pd.isna(row["saft_score"])
                continue
            assert row["saft_verdict"] == ref["verdict"] and pd.isna(row["saft_error"])
            assert _close(row["saft_score"], ref["score"]) and _close(row["saft_probability"], ref["probability"])
            assert row["saft_threshold"] == ref["threshold"]
        kept = Filter(filter_fn=keep, filter_field="saft_verdict").process(after).to_pandas()
        rest = Filter(filter_fn=keep, filter_field="saft_verdict", invert=True).process(after).to_pandas()
        assert set(kept["id"]) == {i for i in df["id"] if reference[i]["bucket"] == "kept"}
        assert set(rest["id"]) == set(df["id"]) - set(kept["id"])


def test_process_before_setup_and_unknown_shape_are_refused() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        SaftScore().process(DocumentBatch(dataset_name="t", data=pd.DataFrame({"text": ["hi"]})))
    with pytest.raises(ItemError, match="shape"):
        SaftScore(shape="csv")

"""``SaftFilter`` in real datatrove pipelines (``LocalPipelineExecutor``, one task) over short ``../shared/data`` lines,
chat rows and invalid rows: it keeps, drops and rejects what ``saft filter`` does, with its scores in the metadata."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import pytest
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from app.core.items import ItemError, parse_sample
from app.integrations.datatrove_filter import SaftFilter, document_row, row_adapter
from tests.support import readme_example, saft_filter_reference, write_data


def _documents(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(folder.glob("*.jsonl.gz")) for line in gzip.open(path, "rt")]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("datatrove")
    write_data(root)
    return root


@pytest.fixture(scope="module")
def reference(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return saft_filter_reference(root / "data", tmp_path_factory.mktemp("saft-filter"))


@pytest.fixture(scope="module")
def readme_run(root: Path) -> Path:
    """The README's datatrove example, as written, run in ``root`` (beside ``data/``)."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        exec(compile(readme_example("datatrove"), "README.md", "exec"), {})  # noqa: S102 (in this process: one model load)
    finally:
        os.chdir(cwd)
    return root / "out"


def test_readme_example_keeps_drops_and_rejects_what_saft_filter_does(readme_run: Path, reference: dict) -> None:
    kept = _documents(readme_run / "kept")
    excluded = _documents(readme_run / "dropped")
    assert {d["id"] for d in kept} == {i for i, r in reference.items() if r["bucket"] == "kept"}
    reasons = {d["id"]: d["metadata"]["filter_reason"] for d in excluded}
    assert reasons == {i: {"dropped": "harmful", "rejected": "invalid"}[r["bucket"]]
                       for i, r in reference.items() if r["bucket"] != "kept"}
    assert {"harmful", "invalid"} <= set(reasons.values()) and kept  # the sample has all three outcomes


def test_scores_in_metadata_are_saft_filters(readme_run: Path, reference: dict) -> None:
    for doc in _documents(readme_run / "kept") + _documents(readme_run / "dropped"):
        meta, ref = doc["metadata"], reference[doc["id"]]
        if ref["bucket"] == "rejected":
            assert meta["saft_verdict"] == "rejected" and "saft_score" not in meta
            # The same reason; a row of no shape lists its keys, and datatrove's reader adds file_path to them.
            assert meta["saft_error"] == ref["error"] or meta["saft_error"].split(":")[0] == ref["error"].split(":")[0] == "item"
            continue
        assert meta["saft_verdict"] == ref["verdict"]
        assert meta["saft_score"] == pytest.approx(ref["score"], rel=1e-4, abs=1e-5)
        assert meta["saft_probability"] == pytest.approx(ref["probability"], rel=1e-4, abs=1e-6)
        assert meta["saft_threshold"] == ref["threshold"]
        assert meta["saft_kind"] == ("pair" if "response" in meta or "messages" in meta else "text")


def test_chat_rows_without_text_are_read_whole_and_given_a_readable_text(readme_run: Path) -> None:
    chats = [d for d in _documents(readme_run / "kept") + _documents(readme_run / "dropped") if d["id"].startswith("m-")]
    assert len(chats) == 2
    for doc in chats:
        assert doc["metadata"]["messages"][1]["role"] == "assistant" and doc["metadata"]["text"] is None
        assert doc["text"].startswith("### Instruction:\n" + doc["metadata"]["messages"][0]["content"])


def test_default_reader_in_small_batches_gives_the_same_verdicts(root: Path, reference: dict, tmp_path: Path) -> None:
    """datatrove's own adapter (text out of the row, the rest metadata) on the first 7 dev lines, in batches of 4."""
    LocalPipelineExecutor(pipeline=[JsonlReader(str(root / "data"), glob_pattern="items.jsonl", limit=7), SaftFilter(batch_size=4),
                                    JsonlWriter(str(tmp_path / "kept"))], tasks=1, logging_dir=str(tmp_path / "logs")).run()
    first = [json.loads(line)["id"] for line in (root / "data" / "items.jsonl").read_text().splitlines()[:7]]
    kept = {i for i in first if reference[i]["bucket"] == "kept"}
    assert {d["id"] for d in _documents(tmp_path / "kept")} == kept and 0 < len(kept) < 7


def test_document_row_is_the_row_either_adapter_read() -> None:
    """Both adapters' documents read back as their rows, so every shape is scored as ``saft filter`` scores it."""
    rows = [{"id": "a", "text": "t", "prompt": "t"}, {"id": "b", "text": "### x", "prompt": "p", "response": "r"},
            {"id": "c", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"id": "d", "prompt": "p", "chosen": "c", "rejected": "r"}, {"id": "e", "conversations": [{"from": "human", "value": "hi"}]}]
    for reader in (JsonlReader("unused/"), JsonlReader("unused/", adapter=row_adapter)):
        for row in rows:
            doc = reader.get_document_from_dict(dict(row), "file.jsonl", 0)
            if doc is None:  # the default adapter hands a row without a text to the reader, which skips it
                assert "text" not in row and reader.adapter == reader._default_adapter
                continue
            assert doc.id == row["id"] and doc.text
            assert parse_sample(document_row(doc)) == parse_sample(row)


def test_unknown_shape_is_refused_when_the_pipeline_is_built() -> None:
    with pytest.raises(ItemError, match="shape"):
        SaftFilter(shape="csv")

"""Files as they are stored: the same rows read back as the same records, numbered as the file numbers them, in
every format; a file that cannot be read names itself, a record that cannot be read is only that record's error."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from app.core.items import ItemError, parse_item
from app.core.lines import (
    SAFT_COLUMNS,
    LineSplitter,
    Record,
    RecordFileError,
    data_files,
    fragment_records,
    fragments,
    jsonl_records,
    open_records,
    record_format,
    row_count,
    table_schema,
    write_parquet_rows,
)


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _objects(records: list[Record]) -> list[tuple[int, Any]]:
    """(number, decoded object) of each record: JSONL payloads are the stored line, decoded downstream."""
    out = []
    for number, payload, error in records:
        assert error is None
        out.append((number, orjson.loads(payload) if isinstance(payload, bytes) else payload))
    return out


def _table(rows: list[dict]) -> pa.Table:
    """Rows as a table with every key any row has (``Table.from_pylist`` takes its columns from row 1 only)."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in names})


def _write_every_format(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    data = _jsonl(rows)
    paths = {
        "jsonl": tmp_path / "set.jsonl",
        "jsonl.gz": tmp_path / "set.jsonl.gz",
        "jsonl.zst": tmp_path / "set.jsonl.zst",
        "json": tmp_path / "set.json",
        "json.gz": tmp_path / "set.json.gz",
        "parquet": tmp_path / "set.parquet",
    }
    paths["jsonl"].write_bytes(data)
    paths["jsonl.gz"].write_bytes(gzip.compress(data))
    paths["jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress(data))
    paths["json"].write_bytes(json.dumps(rows).encode())
    paths["json.gz"].write_bytes(gzip.compress(json.dumps(rows).encode()))
    pq.write_table(_table(rows), paths["parquet"], row_group_size=7)  # several row groups
    return paths


def test_every_format_reads_the_same_records(tmp_path: Path, calibration_rows: list[dict]) -> None:
    rows = calibration_rows
    assert {r["kind"] for r in rows} == {"prompt", "pair"} and any("truncated" in r for r in rows)
    expected = list(enumerate(rows, start=1))
    for name, path in _write_every_format(tmp_path, rows).items():
        records = list(open_records(path))
        # A Parquet column holds null where a row lacks the key; it reads back as the absent key it was.
        assert _objects(records) == expected, name
        assert [parse_item(obj) for _, obj in _objects(records)] == [parse_item(r) for r in rows], name
    assert pq.ParquetFile(tmp_path / "set.parquet").metadata.num_row_groups == -(-len(rows) // 7)


def test_jsonl_numbers_match_the_file(tmp_path: Path, calibration_rows: list[dict]) -> None:
    a, b, c = (json.dumps(r).encode() for r in calibration_rows[:3])
    data = b"\xef\xbb\xbf" + a + b"\r\n\n   \n" + b + b"\n\n" + c  # a BOM, CRLF, blank lines, no final newline
    for path, blob in [(tmp_path / "x.jsonl", data), (tmp_path / "x.jsonl.gz", gzip.compress(data)),
                       (tmp_path / "x.jsonl.zst", zstandard.ZstdCompressor().compress(data))]:
        path.write_bytes(blob)
        assert list(open_records(path)) == [Record(1, a, None), Record(4, b, None), Record(6, c, None)]
    assert list(jsonl_records([a.decode() + "\n", "\n", b.decode()])) == [Record(1, a, None), Record(3, b, None)]
    # A line that is not JSON is still a record: decoding it, and refusing it, is that line's business downstream.
    (tmp_path / "bad.jsonl").write_bytes(a + b"\n{not json\n" + b + b"\n")
    assert [r.number for r in open_records(tmp_path / "bad.jsonl")] == [1, 2, 3]


def test_the_splitter_gives_the_same_records_however_the_bytes_are_cut(calibration_rows: list[dict]) -> None:
    """/filter feeds upload chunks, a file gives lines: the records are the same for every cut of the same bytes,
    and a line over the limit is one error record at its own number, its bytes dropped as they come."""
    a, b, c = (json.dumps(r).encode() for r in calibration_rows[:3])
    limit = max(len(a), len(b), len(c)) + 2
    long = b'{"text": "' + b"x" * limit + b'"}'
    data = b"\xef\xbb\xbf" + a + b"\r\n\n" + long + b"\n" + b + b"\n   \n" + c
    expected = [Record(1, a, None), Record(3, None, f"line: longer than the limit of {limit} bytes"), Record(4, b, None),
                Record(6, c, None)]
    for size in (1, 2, 7, 64, limit - 1, limit + 1, len(data)):
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        assert list(jsonl_records(pieces, max_line_bytes=limit)) == expected, size
    splitter = LineSplitter(max_line_bytes=10)
    assert list(splitter.feed(b"x" * 11)) == [Record(1, None, "line: longer than the limit of 10 bytes")]
    assert list(splitter.feed(b"y" * 1000)) == [] and len(splitter._buffer) == 0  # dropped, not kept
    assert list(splitter.feed(b"z\n{}")) == [] and list(splitter.finish()) == [Record(2, b"{}", None)]


def test_compressed_round_trips(tmp_path: Path, calibration_rows: list[dict]) -> None:
    first, second = _jsonl(calibration_rows[:10]), _jsonl(calibration_rows[10:])
    # zstd streams written in pieces (zstdmt, appends) hold several frames: all of them are read.
    zc = zstandard.ZstdCompressor(level=3)
    (tmp_path / "multi.jsonl.zst").write_bytes(zc.compress(first) + zc.compress(second))
    with gzip.open(tmp_path / "multi.jsonl.gz", "wb") as fh:
        fh.write(first)
    with gzip.open(tmp_path / "multi.jsonl.gz", "ab") as fh:
        fh.write(second)
    for name in ("multi.jsonl.zst", "multi.jsonl.gz"):
        assert _objects(list(open_records(tmp_path / name))) == list(enumerate(calibration_rows, start=1)), name


def test_a_corrupt_stream_names_the_file_and_the_last_good_line(tmp_path: Path, calibration_rows: list[dict]) -> None:
    blob = gzip.compress(_jsonl(calibration_rows * 20))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    seen = []
    with pytest.raises(RecordFileError) as info:
        for record in open_records(path):
            seen.append(record.number)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: cannot be read after line {seen[-1]}")
    assert seen == list(range(1, len(seen) + 1)) and len(seen) > 10


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"text": "one"}\n{"text": "two"}\n', "is not valid JSON"),
        (b'{"text": "one"}', "must hold a top-level JSON array of records, got dict"),
        (b"[1, 2", "is not valid JSON"),
    ],
)
def test_a_bad_json_file_is_named(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "set.json"
    path.write_bytes(content)
    with pytest.raises(RecordFileError) as info:
        list(open_records(path))
    assert str(info.value).startswith(f"{path}: ")
    assert words in str(info.value)
    assert ".jsonl" in info.value.message


def test_json_elements_that_are_not_objects_are_their_own_errors(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_bytes(b'[{"text": "one"}, [1, 2], "three", {"prompt": "four"}]')
    assert list(open_records(path)) == [
        Record(1, {"text": "one"}, None),
        Record(2, None, "item: must be a JSON object, got list"),
        Record(3, None, "item: must be a JSON object, got str"),
        Record(4, {"prompt": "four"}, None),
    ]


def test_unknown_and_unreadable_files_are_named(tmp_path: Path) -> None:
    assert record_format("a/b.JSONL.ZST") == ("jsonl", "zstd")
    assert record_format("b.json.gz") == ("json", "gzip")
    assert record_format("b.parquet") == ("parquet", None)
    assert record_format("b.arrow") == ("arrow", None)
    for name in ("set.csv", "set", "set.parquet.gz", "set.gz", "set.arrow.zst"):
        with pytest.raises(RecordFileError) as info:
            list(open_records(tmp_path / name))
        assert str(info.value) == f"{tmp_path / name}: unknown file type; saft reads .jsonl, .jsonl.gz, .jsonl.zst, " \
            ".json, .json.gz, .json.zst, .parquet, .arrow and a directory written by datasets' Dataset.save_to_disk"
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b'{"text": "not parquet"}\n')
    with pytest.raises(RecordFileError) as info:
        list(open_records(fake))
    assert str(info.value).startswith(f"{fake}: is not a readable Parquet file")


def test_parquet_value_types_that_drift_fail_per_row(tmp_path: Path) -> None:
    table = pa.table({
        "prompt": pa.array(["p1", "p2", "p3", "p4"]),
        "response": pa.array([b"bytes, not text", None, b"", None], pa.binary()),
        "text": pa.array([None, None, None, 4], pa.int64()),
    })
    path = tmp_path / "drift.parquet"
    pq.write_table(table, path)
    records = list(open_records(path))
    assert records == [
        Record(1, {"prompt": "p1", "response": b"bytes, not text"}, None),
        Record(2, {"prompt": "p2"}, None),
        Record(3, {"prompt": "p3", "response": b""}, None),
        Record(4, {"prompt": "p4", "text": 4}, None),
    ]
    outcomes = []
    for record in records:
        try:
            outcomes.append(parse_item(record.payload).turns)
        except ItemError as err:
            outcomes.append(str(err))
    assert outcomes == [
        "response: must be a string, got bytes",
        (("user", "p2"),),
        "response: must be a string, got bytes",
        "text: differs from 'prompt' and there is no response: pass shape='text' or shape='prompt' to say which one is the sample",
    ]


def test_a_parquet_value_python_cannot_hold_is_that_rows_error(tmp_path: Path) -> None:
    micros = [0, 2**62, 86400 * 10**6]  # the middle one is far past year 9999
    table = pa.table({"text": ["a", "b", "c"], "at": pa.array(micros, pa.timestamp("us"))})
    path = tmp_path / "stamps.parquet"
    pq.write_table(table, path)
    records = list(open_records(path))
    assert [r.number for r in records] == [1, 2, 3]
    assert records[0] == Record(1, {"text": "a", "at": dt.datetime(1970, 1, 1)}, None)
    assert records[1].payload is None and records[1].error is not None and records[1].error.startswith("at: cannot be read (")
    assert records[2] == Record(3, {"text": "c", "at": dt.datetime(1970, 1, 2)}, None)


def _output_rows(rows: list[dict]) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        verdict = ("keep", "drop", "rejected")[i % 3]
        out.append({**row, "saft_score": None if verdict == "rejected" else i / 10, "saft_verdict": verdict,
                    "saft_kind": "pair" if "response" in row else "text"})
    return out


def test_parquet_output_adds_the_three_columns(tmp_path: Path, calibration_rows: list[dict]) -> None:
    source = _write_every_format(tmp_path, calibration_rows)["parquet"]
    schema = pq.ParquetFile(source).schema_arrow
    out = tmp_path / "out" / "kept.parquet"
    out.parent.mkdir()
    rows = _output_rows([record.payload for record in open_records(source)])  # type: ignore[misc]
    assert write_parquet_rows(out, iter(rows), schema=schema) == len(rows)
    written = pq.read_table(out)
    assert written.schema.names == schema.names + list(SAFT_COLUMNS)
    assert written.schema.field("saft_score").type == pa.float64()
    assert written.schema.field("saft_verdict").type == pa.string()
    assert written.schema.field("label").type == schema.field("label").type  # the input's types are kept
    assert written.column("saft_verdict").to_pylist()[:3] == ["keep", "drop", "rejected"]
    assert written.column("saft_score").to_pylist()[:3] == [0.0, 0.1, None]
    assert _objects(list(open_records(out))) == list(enumerate(_without_none(rows), start=1))  # the rows, as written
    assert sorted(os.listdir(out.parent)) == ["kept.parquet"]  # no temporary file left behind
    # Without an input schema (JSONL in, Parquet out) the schema comes from all rows, so late columns are kept.
    late = [{"text": "a"}, {"text": "b", "response_note": "only here"}]
    write_parquet_rows(out, _output_rows(late))
    assert pq.read_table(out).column("response_note").to_pylist() == [None, "only here"]
    assert (out.stat().st_mode & 0o777) == 0o644


def _without_none(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if v is not None} for r in rows]


def test_parquet_output_is_atomic(tmp_path: Path, calibration_rows: list[dict]) -> None:
    out = tmp_path / "kept.parquet"
    write_parquet_rows(out, _output_rows(calibration_rows[:5]))
    before = out.read_bytes()
    schema = pq.read_schema(out)

    def rows_then_a_stranger():
        yield from _output_rows(calibration_rows[:5])
        yield {"text": "x", "saft_verdict": "keep", "surprise": 1}

    with pytest.raises(RecordFileError) as info:
        write_parquet_rows(out, rows_then_a_stranger(), schema=schema)
    assert str(info.value) == f"{out}: row 6 has column 'surprise', which the output schema lacks"
    with pytest.raises(RecordFileError, match="rows 1-1 do not fit the output schema"):
        write_parquet_rows(out, [{"text": "x", "label": "not an int", "saft_verdict": "keep"}], schema=schema)

    def rows_then_crash():
        yield from _output_rows(calibration_rows[:5])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_parquet_rows(out, rows_then_crash(), schema=schema)
    assert out.read_bytes() == before  # a failed write leaves the previous file whole
    assert sorted(os.listdir(tmp_path)) == ["kept.parquet"]


# Hugging Face datasets on disk: a directory written by Dataset.save_to_disk, and the .arrow files of datasets' cache.
# They are read with pyarrow alone; the datasets package (a dev dependency) only writes them here, and says what
# its own reader would give back.


def _saved(tmp_path: Path, name: str, dataset: Any, **save: Any) -> Path:
    path = tmp_path / name
    dataset.save_to_disk(str(path), **save)
    return path


def test_a_saved_dataset_reads_as_load_from_disk_gives_it(tmp_path: Path, calibration_rows: list[dict]) -> None:
    import datasets

    rows = calibration_rows
    whole = datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)})
    as_saved = _saved(tmp_path, "whole", whole, num_shards=3)
    assert len(data_files(as_saved)) == 3 and record_format(as_saved) == ("dataset", None)
    # Every row, numbered 1.. across the shards; a null (a key the row lacks) is an absent key, as in Parquet.
    assert _objects(list(open_records(as_saved))) == list(enumerate(rows, start=1))
    assert row_count(as_saved) == len(rows)
    # A shuffled selection is saved flattened: row N is load_from_disk(path)[N - 1], whatever order it holds.
    picked = whole.shuffle(seed=3).select(range(0, len(rows), 2))
    path = _saved(tmp_path, "picked", picked, num_shards=2)
    loaded = datasets.load_from_disk(str(path))
    expected = [(i + 1, {k: v for k, v in loaded[i].items() if v is not None}) for i in range(len(loaded))]
    assert _objects(list(open_records(path))) == expected and len(expected) == -(-len(rows) // 2)
    assert table_schema(path).names == loaded.column_names  # type: ignore[union-attr]
    # Its parts, read apart as the Ray engine reads them, are the same records.
    parts = fragments(path, min_rows=1)
    assert [p.path for p in parts] == data_files(path) and [p.first for p in parts] == [1, parts[0].rows + 1]
    assert [r for p in parts for r in fragment_records(p)] == list(open_records(path))


def test_parquet_parts_are_whole_row_groups_numbered_as_the_file(tmp_path: Path, calibration_rows: list[dict]) -> None:
    path = _write_every_format(tmp_path, calibration_rows)["parquet"]  # row groups of 7 rows
    parts = fragments(path, min_rows=10)
    assert [p.row_groups for p in parts][:2] == [(0, 1), (2, 3)]
    assert all(p.rows >= 10 for p in parts[:-1]) and sum(p.rows for p in parts) == len(calibration_rows)
    assert [p.first for p in parts] == [1 + sum(q.rows for q in parts[:i]) for i in range(len(parts))]
    assert [r for p in parts for r in fragment_records(p)] == list(open_records(path))
    assert row_count(path) == len(calibration_rows) and row_count(tmp_path / "set.jsonl") is None


def test_datasets_cache_files_and_feather_are_read(tmp_path: Path, calibration_rows: list[dict]) -> None:
    import datasets
    from pyarrow import feather

    source = tmp_path / "set.jsonl"
    source.write_bytes(_jsonl(calibration_rows))
    cached = datasets.load_dataset("json", data_files=str(source), cache_dir=str(tmp_path / "cache"), split="train")
    arrow = Path(cached.cache_files[0]["filename"])  # ~/.cache/huggingface/datasets/json/.../json-train.arrow, here
    assert arrow.suffix == ".arrow" and _objects(list(open_records(arrow))) == list(enumerate(calibration_rows, start=1))
    feather.write_feather(_table(calibration_rows[:5]), tmp_path / "five.arrow")  # an Arrow IPC *file*, not a stream
    assert _objects(list(open_records(tmp_path / "five.arrow"))) == list(enumerate(calibration_rows[:5], start=1))
    (tmp_path / "fake.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(RecordFileError, match="fake.arrow: is not an Arrow IPC stream or file"):
        list(open_records(tmp_path / "fake.arrow"))


def test_a_dataset_value_python_cannot_hold_is_that_rows_error(tmp_path: Path) -> None:
    import datasets

    micros = [0, 2**62, 86400 * 10**6]
    path = _saved(tmp_path, "stamps", datasets.Dataset.from_dict({"text": ["a", "b", "c"], "at": pa.array(micros, pa.timestamp("us"))}))
    records = list(open_records(path))
    assert records[0] == Record(1, {"text": "a", "at": dt.datetime(1970, 1, 1)}, None)
    assert records[1].payload is None and records[1].error is not None and records[1].error.startswith("at: cannot be read (")
    assert records[2] == Record(3, {"text": "c", "at": dt.datetime(1970, 1, 2)}, None)


def test_directories_that_are_not_one_saved_dataset_are_refused(tmp_path: Path) -> None:
    import datasets

    one = datasets.Dataset.from_dict({"text": ["a", "b"]})
    splits = _saved(tmp_path, "splits", datasets.DatasetDict({"train": one, "test": one}))
    with pytest.raises(RecordFileError) as info:
        list(open_records(splits))
    assert str(info.value) == f"{splits}: is a DatasetDict (splits: train, test); give one split's directory, e.g. {splits / 'train'}"
    assert [r.payload for r in open_records(splits / "test")] == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(RecordFileError, match="is a directory without state.json; saft reads .jsonl"):
        record_format(tmp_path)
    broken = _saved(tmp_path, "broken", one)
    data_files(broken)[0].unlink()
    with pytest.raises(RecordFileError, match="state.json names data file 'data-00000-of-00001.arrow', which the directory does not hold"):
        list(open_records(broken))
    with pytest.raises(RecordFileError, match="is jsonl, not a table"):
        fragments(tmp_path / "x.jsonl", min_rows=1)

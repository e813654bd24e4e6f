"""Input files as they are stored: one reader for every file format, numbering records as the file does.

Owns the suffix → format table, decompression (gzip, zstd), JSON-array and Parquet decoding, and the atomic
Parquet writer for outputs. It yields *records*, not items: decoding a JSONL line and validating any record
(``app.core.pipeline.parse_line`` / ``app.core.items.parse_item``) happen per record downstream, so a bad record is that
record's error and never the file's. It must not parse items, read labels or know about scores; only a file
that cannot be read at all (not JSON, not an array, not Parquet, a corrupt stream) raises ``RecordFileError``.

The API:

``open_records(path) -> Iterator[Record]``
    Every record of ``path`` in order. ``Record`` is a ``(number, payload, error)`` named tuple: ``number`` is
    1-based — the line of a JSONL file, the element of a JSON array, the row of a Parquet file; ``payload`` is
    the JSONL line as stored (``bytes``, without its line end, for the caller to decode, as before) or the
    decoded object (``dict``) of a JSON element or a Parquet row; ``error`` says why the record could not be
    read (``payload`` is then ``None``). Blank JSONL lines are counted but not yielded, so numbers keep matching
    the file. A Parquet null is an absent key (a table has no other way to say a row lacks a column), so
    converted JSONL reads back as the same objects. Formats, by suffix: ``.jsonl``, ``.json`` (a top-level
    array, read whole: use JSONL for sets that do not fit in memory), each optionally ``.gz`` or ``.zst``,
    ``.parquet`` (streamed by row group) and ``.arrow`` (an Arrow IPC stream or file, as Hugging Face ``datasets``
    writes its cache and ``save_to_disk`` shards); and a *directory* written by ``datasets``'
    ``Dataset.save_to_disk``: its ``data-*.arrow`` files in ``state.json``'s order, numbered on from one file to the
    next, so row N is ``load_from_disk(path)[N - 1]``. Arrow files are read with pyarrow (memory-mapped), so
    reading a saved dataset needs neither the ``datasets`` package nor the Hub.
``jsonl_records(stream) -> Iterator[Record]`` / ``LineSplitter``
    The same for an already open JSONL stream (uploads, stdin); ``LineSplitter`` is its splitter, fed piece by piece
    (``/filter`` feeds it an upload's chunks as they arrive), with an optional line-length limit.
``record_format(path) -> (format, compression)``
    What ``open_records`` would read ``path`` as; ``RecordFileError`` for a suffix it does not know, or a
    directory that is not a saved dataset (a ``DatasetDict`` is named as such, with its splits).
``fragments(path, min_rows) -> list[Fragment]`` / ``fragment_records(fragment) -> Iterator[Record]``
    A tabular input (Parquet, Arrow, a saved dataset) cut into parts that can be read apart — runs of whole row
    groups of at least ``min_rows`` rows, or one Arrow file each — with the number of each part's first row, so
    that parts read in parallel (the Ray engine) number their rows exactly as ``open_records`` does; it is their
    concatenation.
``row_count(path)`` / ``table_schema(path)`` / ``data_files(path)``
    A tabular input's rows (from metadata, for progress bars) and Arrow schema (outputs keep the input's types);
    the files that hold any input's bytes (what a digest of the input reads).
``write_parquet_rows(path, rows, extra_columns=SAFT_COLUMNS, *, schema=None) -> int``
    Output rows (input row + ``saft_score``, ``saft_verdict``, ``saft_kind``) as one Parquet file, written to a
    temporary file beside ``path`` and moved into place, so a reader never sees half a file.
    ``ParquetRowWriter(path, schema, extra_columns)`` does the same row by row, for several outputs of one pass.

pyarrow and zstandard are imported when a file needs them, never at import time.
"""

from __future__ import annotations

import gzip
import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, NamedTuple, Self

import orjson

if TYPE_CHECKING:
    import pyarrow as pa

Format = Literal["jsonl", "json", "parquet", "arrow", "dataset"]
Compression = Literal["gzip", "zstd"] | None

_FORMATS: Mapping[str, Format] = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
_COMPRESSIONS: Mapping[str, Compression] = {".gz": "gzip", ".zst": "zstd"}
SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst", ".parquet", ".arrow")
#: Formats held as Arrow tables: read by ``fragments`` / ``fragment_records``, never compressed by saft's suffixes.
TABULAR: tuple[Format, ...] = ("parquet", "arrow", "dataset")
_KNOWN = f"saft reads {', '.join(SUFFIXES)} and a directory written by datasets' Dataset.save_to_disk"

#: The columns an output row adds to its input row, as Arrow type aliases (``pyarrow.type_for_alias``).
SAFT_COLUMNS: Mapping[str, str] = {"saft_score": "double", "saft_verdict": "string", "saft_kind": "string"}

#: Rows per Arrow batch, read or written: bounds memory, not results.
BATCH_ROWS = 1024


class RecordFileError(ValueError):
    """A file that cannot be read as records at all; ``path`` names it."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)
        self.message = message


class Record(NamedTuple):
    """One stored record: its 1-based number, the raw line or decoded object, or why it could not be read."""

    number: int
    payload: bytes | dict[str, Any] | None
    error: str | None


def record_format(path: Path | str) -> tuple[Format, Compression]:
    """The format and compression ``path``'s suffixes name (``data.jsonl.zst`` → ``("jsonl", "zstd")``); a directory
    is ``("dataset", None)`` when ``datasets``' ``save_to_disk`` wrote it (it holds ``state.json``)."""
    if Path(path).is_dir():
        _dataset_state(Path(path))
        return "dataset", None
    suffixes = [s.lower() for s in Path(path).suffixes]
    compression = _COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression is not None:
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None or (fmt in TABULAR and compression is not None):
        raise RecordFileError(path, f"unknown file type; {_KNOWN}")
    return fmt, compression


class LineSplitter:
    """The one JSONL splitter: bytes fed in pieces of any size (a file's lines, an upload's chunks) → numbered
    ``Record`` s. Blank lines are counted, not yielded; a line's end (``\n``, ``\r\n``) and a UTF-8 byte order mark
    before the first line (Windows exports) are not part of it; a line longer than ``max_line_bytes`` becomes an error
    record at once (its bytes are dropped as they come, so a line without end cannot fill memory)."""

    def __init__(self, max_line_bytes: int | None = None) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        self._number = 0
        self._skipping = False  # inside an oversize line: drop bytes until its newline

    def _too_long(self) -> Record:
        return Record(self._number, None, f"line: longer than the limit of {self.max_line_bytes} bytes")

    def _line(self, raw: bytes) -> Iterator[Record]:
        self._number += 1
        if self.max_line_bytes is not None and len(raw) > self.max_line_bytes:  # as stored, like the check in ``feed``
            yield self._too_long()
            return
        if self._number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        raw = raw.removesuffix(b"\r")
        if raw.strip():
            yield Record(self._number, raw, None)

    def feed(self, data: bytes | str) -> Iterator[Record]:
        """The records completed by ``data``."""
        self._buffer += data.encode() if isinstance(data, str) else data
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if self.max_line_bytes is not None and len(self._buffer) > self.max_line_bytes and not self._skipping:
                    self._number += 1
                    self._skipping = True
                    yield self._too_long()
                if self._skipping:
                    self._buffer.clear()
                return
            raw = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            if self._skipping:
                self._skipping = False
                continue
            yield from self._line(raw)

    def finish(self) -> Iterator[Record]:
        """The last line, if the stream did not end with a newline."""
        if self._buffer and not self._skipping:
            yield from self._line(bytes(self._buffer))
        self._buffer.clear()


def jsonl_records(stream: Iterable[bytes | str], max_line_bytes: int | None = None) -> Iterator[Record]:
    """Every non-blank line of a JSONL stream as a ``Record`` (payload: the line's bytes, line end stripped), split by
    ``LineSplitter`` whatever the pieces ``stream`` yields (a file's lines, chunks)."""
    splitter = LineSplitter(max_line_bytes)
    for piece in stream:
        yield from splitter.feed(piece)
    yield from splitter.finish()


def open_records(path: Path | str) -> Iterator[Record]:
    """Every record of the file at ``path``, numbered as the file numbers them (see the module docstring)."""
    path = Path(path)
    fmt, compression = record_format(path)
    if fmt in TABULAR:
        for fragment in fragments(path, min_rows=1 << 62):  # one part per file: no part boundary inside a file
            yield from fragment_records(fragment)
        return
    with _open_binary(path, compression) as fh:
        if fmt == "json":
            yield from _json_records(path, _read_all(path, fh))
            return
        number = 0
        try:
            for record in jsonl_records(fh):
                number = record.number
                yield record
        except (OSError, EOFError, _zstd_error()) as err:
            raise RecordFileError(path, f"cannot be read after line {number}: {err}") from err


@contextmanager
def _open_binary(path: Path, compression: Compression) -> Iterator[BinaryIO]:
    if compression == "gzip":
        with gzip.open(path, "rb") as fh:
            yield fh  # type: ignore[misc]  # a GzipFile is a binary file, not a typing.BinaryIO subclass
    elif compression == "zstd":
        import zstandard

        with path.open("rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with io.BufferedReader(reader) as fh:
                yield fh
    else:
        with path.open("rb") as fh:
            yield fh


def _zstd_error() -> type[Exception]:
    try:
        import zstandard
    except ImportError:  # without zstandard no .zst file was opened, so none of its errors can occur
        return OSError
    return zstandard.ZstdError


def _read_all(path: Path, fh: BinaryIO) -> bytes:
    try:
        return fh.read()
    except (OSError, EOFError, _zstd_error()) as err:
        raise RecordFileError(path, f"cannot be read: {err}") from err


def _json_records(path: Path, data: bytes) -> Iterator[Record]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        raise RecordFileError(path, f"is not valid JSON ({err}); a file of one object per line is .jsonl") from err
    if not isinstance(value, list):
        raise RecordFileError(path, f"must hold a top-level JSON array of records, got {type(value).__name__}; "
                              "a file of one object per line is .jsonl")
    for number, element in enumerate(value, start=1):
        if isinstance(element, dict):
            yield Record(number, element, None)
        else:  # the same words parse_item uses, so a record reads alike whatever file it came from
            yield Record(number, None, f"item: must be a JSON object, got {type(element).__name__}")


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


class Fragment(NamedTuple):
    """A part of a tabular input that can be read on its own: row groups ``row_groups`` of the Parquet file ``path``,
    or (``row_groups`` None) the whole Arrow file ``path``; its ``rows`` rows are numbered from ``first``."""

    path: Path
    row_groups: tuple[int, ...] | None
    first: int
    rows: int


def fragments(path: Path | str, min_rows: int) -> list[Fragment]:
    """``path`` (Parquet, Arrow or a saved dataset) as consecutive parts, in order: runs of whole Parquet row groups,
    each closed once it holds ``min_rows`` rows (a row group is never split), or one part per Arrow file. Row counts
    come from the Parquet footer or the Arrow batches' headers (memory-mapped, no row is decoded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    fmt, _ = record_format(path)
    if fmt not in TABULAR:
        raise RecordFileError(path, f"is {fmt}, not a table: it has no parts to read apart")
    if fmt != "parquet":
        files = _dataset_files(path) if fmt == "dataset" else [path]
        parts, first = [], 1
        for file in files:
            rows = sum(batch.num_rows for batch in _arrow_batches(file, 0))
            parts.append(Fragment(file, None, first, rows))
            first += rows
        return parts
    try:
        with pq.ParquetFile(path) as parquet:
            sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
    except (pa.ArrowException, OSError) as err:
        raise RecordFileError(path, f"is not a readable Parquet file ({err})") from err
    out: list[Fragment] = []
    groups: list[int] = []
    first = rows = 0
    for i, size in enumerate(sizes):
        groups.append(i)
        rows += size
        if rows >= min_rows or i == len(sizes) - 1:
            out.append(Fragment(path, tuple(groups), first + 1, rows))
            first, groups, rows = first + rows, [], 0
    return out


def fragment_records(fragment: Fragment) -> Iterator[Record]:
    """Every row of one part as a ``Record``, numbered from ``fragment.first`` (``batch_rows``: nulls are absent keys,
    a value Python cannot hold is that row's error, not the file's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = fragment.first - 1
    if fragment.row_groups is None:
        batches = _arrow_batches(fragment.path, number)
    else:
        try:
            parquet = pq.ParquetFile(fragment.path)
        except (pa.ArrowException, OSError) as err:
            raise RecordFileError(fragment.path, f"is not a readable Parquet file ({err})") from err
        batches = parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=list(fragment.row_groups))
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as err:
            raise RecordFileError(fragment.path, f"cannot be read after row {number}: {err}") from err
        if batch is None:
            return
        for row in batch_rows(batch):
            number += 1
            yield Record(number, None, row) if isinstance(row, str) else Record(number, row, None)


def _arrow_batches(path: Path, before: int) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow file; ``before`` rows precede it (for the error's row number)."""
    import pyarrow as pa

    with _arrow_reader(path) as (_, batches):
        number = before
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as err:
                raise RecordFileError(path, f"cannot be read after row {number}: {err}") from err
            if batch is None:
                return
            number += batch.num_rows
            yield batch


@contextmanager
def _arrow_reader(path: Path) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
    """An Arrow IPC stream (what ``datasets`` writes) or IPC file (Feather v2), memory-mapped: its schema and batches."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
    except (pa.ArrowException, OSError) as err:
        raise RecordFileError(path, f"cannot be opened ({err})") from err
    with source:
        try:
            stream = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                file = pa.ipc.open_file(source)
            except (pa.ArrowException, OSError) as err:
                raise RecordFileError(path, f"is not an Arrow IPC stream or file ({err})") from err
            yield file.schema, (file.get_batch(i) for i in range(file.num_record_batches))
        else:
            yield stream.schema, iter(stream)


def _dataset_state(path: Path) -> dict[str, Any]:
    """A ``save_to_disk`` directory's ``state.json``; a directory that is something else is refused by name."""
    state = path / "state.json"
    if not state.is_file():
        splits = path / "dataset_dict.json"
        if splits.is_file():
            try:
                names = orjson.loads(splits.read_bytes()).get("splits", [])
            except (orjson.JSONDecodeError, AttributeError, OSError):
                names = []
            example = path / (names[0] if names else "train")
            raise RecordFileError(path, f"is a DatasetDict (splits: {', '.join(map(str, names)) or 'unknown'}); "
                                  f"give one split's directory, e.g. {example}")
        raise RecordFileError(path, f"is a directory without state.json; {_KNOWN}")
    try:
        value = orjson.loads(state.read_bytes())
    except (orjson.JSONDecodeError, OSError) as err:
        raise RecordFileError(path, f"state.json cannot be read ({err})") from err
    if not isinstance(value, dict) or not isinstance(value.get("_data_files"), list):
        raise RecordFileError(path, "state.json lists no _data_files; is this a datasets save_to_disk directory?")
    return value


def _dataset_files(path: Path) -> list[Path]:
    """A saved dataset's data files, in its rows' order (``state.json``'s ``_data_files``); each must exist."""
    state = _dataset_state(path)
    if state.get("_indices_data_files"):  # save_to_disk flattens a selection; an unflattened one is not rows in order
        raise RecordFileError(path, "holds an indices mapping; save it again after dataset.flatten_indices()")
    files = []
    for entry in state["_data_files"]:
        name = entry.get("filename") if isinstance(entry, dict) else None
        file = path / str(name)
        if not isinstance(name, str) or Path(name).name != name or not file.is_file():
            raise RecordFileError(path, f"state.json names data file {name!r}, which the directory does not hold")
        files.append(file)
    return files


def data_files(path: Path | str) -> list[Path]:
    """The files holding ``path``'s rows: the file itself, or a saved dataset's data files (what a digest reads)."""
    path = Path(path)
    return _dataset_files(path) if record_format(path)[0] == "dataset" else [path]


def row_count(path: Path | str) -> int | None:
    """The rows of a tabular input, from its metadata (no row decoded); None for JSON formats, which only a pass over
    the file can count."""
    if record_format(path)[0] not in TABULAR:
        return None
    return sum(f.rows for f in fragments(path, min_rows=1 << 62))


def table_schema(path: Path | str) -> pa.Schema | None:
    """The Arrow schema of a tabular input (a saved dataset's: its first data file's), metadata included, so outputs
    keep the input's column types (``datasets`` reads its ``Features`` back from it, and takes the saft_* columns
    it does not describe from their Arrow types); None for JSON formats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    fmt, _ = record_format(path)
    if fmt == "parquet":
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as err:
            raise RecordFileError(path, f"is not a readable Parquet file ({err})") from err
    elif fmt in TABULAR and (files := data_files(path)):
        with _arrow_reader(files[0]) as (schema, _):
            pass
    else:
        return None
    return schema


def batch_rows(batch: pa.RecordBatch) -> list[dict[str, Any] | str]:
    """A batch's rows as objects (nulls as absent keys, as ``open_records`` reads them); a row holding a value Python
    cannot represent is that row's error message. Also the Ray engine's reader of ``ray.data.read_parquet`` blocks."""
    try:
        return [_without_nulls(row) for row in batch.to_pylist()]
    except (ValueError, OverflowError, ArithmeticError):
        pass  # some row holds such a value: find it value by value, so only that row fails
    rows: list[dict[str, Any] | str] = []
    for i in range(batch.num_rows):
        row: dict[str, Any] = {}
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            try:
                row[name] = column[i].as_py()
            except (ValueError, OverflowError, ArithmeticError) as err:
                rows.append(f"{name}: cannot be read ({type(err).__name__}: {err})")
                break
        else:
            rows.append(_without_nulls(row))
    return rows


def write_parquet_rows(
    path: Path | str,
    rows: Iterable[Mapping[str, Any]],
    extra_columns: Mapping[str, str] = SAFT_COLUMNS,
    *,
    schema: pa.Schema | None = None,
) -> int:
    """Write ``rows`` to ``path`` as Parquet, atomically; returns the number of rows written.

    The schema is ``schema`` (pass the input file's ``ParquetFile.schema_arrow`` so the output keeps its
    types and streams in batches) or, without one, inferred from all rows, which are then held in memory;
    ``extra_columns`` (name → Arrow type alias) are appended to it, replacing input columns of the same name.
    A row's missing key is a null. A key the schema lacks or a value that does not fit its column raises
    ``RecordFileError`` (nothing is dropped silently), and the file at ``path`` is left as it was.
    """
    import pyarrow as pa

    path = Path(path)
    if schema is None:
        rows = list(rows)
        names = list(dict.fromkeys(k for r in rows for k in r if k not in extra_columns))  # from_pylist reads row 1 only
        try:
            schema = pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in names}).schema
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise RecordFileError(path, f"the rows do not fit one table (a key holds values of different types): {err}") from err
    with ParquetRowWriter(path, schema, extra_columns) as writer:
        for row in rows:
            writer.write(row)
    return writer.count


class ParquetRowWriter:
    """Rows written to one Parquet file as they come (in batches of ``BATCH_ROWS``), atomically: into a temporary
    file beside ``path`` that ``close()`` moves into place; an exception inside ``with`` (or ``abort()``) removes
    it and leaves ``path`` as it was. The schema is ``schema`` with ``extra_columns`` appended, as in
    ``write_parquet_rows``; use this one when several outputs are written from one pass over the input."""

    def __init__(self, path: Path | str, schema: pa.Schema, extra_columns: Mapping[str, str] = SAFT_COLUMNS) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        extra = [pa.field(name, pa.type_for_alias(alias)) for name, alias in extra_columns.items()]
        keep = [f for f in schema if f.name not in extra_columns]
        self.schema = pa.schema(keep + extra, metadata=schema.metadata)
        self.count = 0
        self._chunk: list[Mapping[str, Any]] = []
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._fh = os.fdopen(fd, "wb")
        try:
            os.fchmod(self._fh.fileno(), 0o644)  # mkstemp makes it 0600; outputs are read by others
            self._writer = pq.ParquetWriter(self._fh, self.schema)
        except BaseException:
            self._fh.close()
            Path(self._tmp).unlink(missing_ok=True)
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(self, row: Mapping[str, Any]) -> None:
        self._chunk.append(row)
        if len(self._chunk) == BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._chunk:
            self._writer.write_table(_table(self.path, self._chunk, self.schema, self.count))
            self.count += len(self._chunk)
            self._chunk = []

    def close(self) -> int:
        """Write what is left and move the file into place; returns the number of rows written."""
        try:
            self._flush()
            self._writer.close()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.count

    def abort(self) -> None:
        """Discard the temporary file; ``path`` is left as it was."""
        try:
            self._writer.close()  # closes an open writer (a no-op once closed), so nothing writes to the file later
        finally:
            self._fh.close()
            Path(self._tmp).unlink(missing_ok=True)


def _table(path: Path, chunk: list[Mapping[str, Any]], schema: pa.Schema, before: int) -> pa.Table:
    import pyarrow as pa

    names = set(schema.names)
    for i, row in enumerate(chunk, start=before + 1):
        unknown = [k for k in row if k not in names]
        if unknown:
            raise RecordFileError(path, f"row {i} has column {unknown[0]!r}, which the output schema lacks")
    try:
        return pa.Table.from_pylist(list(chunk), schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise RecordFileError(path, f"rows {before + 1}-{before + len(chunk)} do not fit the output schema: {err}") from err

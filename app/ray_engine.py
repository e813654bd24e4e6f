"""``saft filter --engine ray``: the local filter's scoring core spread over a Ray Data actor pool.

Owns: finding the input shards, reading them into numbered lines (JSON shards in any ``app.lines`` format by
``read_file``; Parquet shards by ``ray.data.read_parquet``, the row index as the line number), the scoring actor
(one Embedder and one subspace per actor, a GPU each when the cluster has them) and the datasink that writes the
kept / dropped / rejected (and optional per-line score) shards and counts every line per shard and every shape.

Must not: parse, format, embed or score in a way of its own. Lines are numbered and parsed by
``app.pipeline.read_file`` / ``parse_line``, scored by ``score_lines`` and written as
``filter_record`` / ``line_record`` say, exactly as the local engine does; only the fan-out is Ray's.
``ray`` is imported inside the functions that need it, so nothing else in the package (the service
above all) ever imports it.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from app.artifacts import Manifest, check_compatible
from app.config import Settings
from app.embedding import Embedder
from app.items import Shape
from app.lines import SUFFIXES, RecordFileError, batch_rows, record_format
from app.pipeline import Line, direct_embed, filter_record, json_default, line_record, parse_line, read_file, score_lines
from app.subspace import Subspace

if TYPE_CHECKING:
    import pyarrow as pa

BUCKETS = ("kept", "dropped", "rejected")


class RayEngineError(ValueError):
    """A problem with the run's inputs, outputs or cluster, said so the user can fix it."""


@dataclass(frozen=True)
class RayOptions:
    """How the work is spread; every field has a default that suits one machine."""

    actors: int | None = None  # None: one per GPU when the cluster has GPUs, else one per spare CPU slot
    cpus_per_actor: float = 1.0  # also torch's thread count in the actor (SAFT_NUM_THREADS wins when set)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    batch_lines: int = 256  # lines per actor call (the model's own batches are still token-budgeted)
    address: str | None = None  # None: RAY_ADDRESS if set, else a local cluster started for this run


def _is_shard(path: Path) -> bool:
    try:
        record_format(path)
    except RecordFileError:
        return False
    return path.is_file()


def find_shards(spec: str | Path) -> list[Path]:
    """The shards named by a file, a directory (its files in a format ``app.lines`` reads, sorted) or a glob pattern
    (sorted); a named file or a glob match in a format saft does not read is refused, not skipped."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if _is_shard(p))
        if not found:
            raise RayEngineError(f"input: directory {path} holds no shard ({', '.join(SUFFIXES)})")
        return [p.resolve() for p in found]
    found = [path] if path.is_file() else sorted(Path(p) for p in glob.glob(str(spec)) if Path(p).is_file())
    if not found:
        raise RayEngineError(f"input: {spec} is no file, no directory and no glob that matches a file")
    for p in found:
        try:
            record_format(p)
        except RecordFileError as err:
            raise RayEngineError(f"input: {err}") from None
    return [p.resolve() for p in found]


def _check_output(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RayEngineError(f"--{what}: {path} exists and is not an empty directory (the ray engine writes shards into a directory)")


Reading = tuple[Shape | Literal["auto"], Mapping[str, str] | None]  # --format and --columns, as read_file takes them


def _line_row(shard: str, line: Line) -> dict[str, Any]:
    """A read line as a plain Arrow row; the object travels as JSON and is parsed again by the actor."""
    return {"shard": shard, "line": line.number, "error": line.error,
            "obj": None if line.obj is None else orjson.dumps(line.obj, default=json_default)}


def _line_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Line rows as a table of one fixed schema, so blocks from every kind of shard concatenate."""
    import pyarrow as pa

    schema = pa.schema([("shard", pa.string()), ("line", pa.int64()), ("error", pa.string()), ("obj", pa.binary())])
    return pa.Table.from_pylist(rows, schema=schema)


def split_shard(row: dict[str, Any], reading: Reading = ("auto", None)) -> Iterator[dict[str, Any]]:
    """One JSON shard (a row ``{"path"}``) → one row per record, numbered as the local engine numbers them: the
    file is read where the task runs by ``read_file`` (any JSONL/JSON format, compressed or not)."""
    shard = str(row["path"])
    for line in read_file(shard, *reading):
        yield _line_row(shard, line)


def json_lines(batch: pa.Table, reading: Reading) -> pa.Table:
    """``map_batches`` over rows ``{"path"}`` of JSON shards: every line of each (``split_shard``)."""
    return _line_table([line for row in batch.to_pylist() for line in split_shard(row, reading)])


def parquet_lines(batch: pa.Table, shard: str, reading: Reading) -> pa.Table:
    """``map_batches`` over a Parquet shard read by ``ray.data.read_parquet`` and zipped with ``ray.data.range``: the
    zipped column (the last, whatever ``zip`` names it) is the row index, so each row keeps its number in the file,
    as ``read_file`` numbers it. Rows are read as ``app.lines`` reads them (``batch_rows``: nulls are absent keys,
    a value Python cannot hold is that row's error, not the shard's)."""
    index = batch.column(batch.num_columns - 1).to_pylist()
    rows = batch_rows(batch.drop_columns([batch.column_names[-1]]))  # type: ignore[arg-type]
    return _line_table([_line_row(shard, Line(i + 1, None, None, None, row) if isinstance(row, str) else parse_line(i + 1, row, *reading))
                        for i, row in zip(index, rows, strict=True)])


class LineScorer:
    """A Ray actor: loads the model once, then scores batches of lines with the shared core."""

    def __init__(self, settings: Settings, subspace: Subspace, manifest: Manifest, threshold: float | None,
                 reading: Reading = ("auto", None)) -> None:
        self.embedder = Embedder.from_settings(settings, manifest.model_id)
        check_compatible(manifest, self.embedder)
        self.subspace, self.manifest, self.threshold, self.reading = subspace, manifest, threshold, reading
        self.embed = direct_embed(self.embedder, max_batch_tokens=settings.max_batch_tokens, max_batch_size=settings.max_batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        shards, numbers = batch.column("shard").to_pylist(), batch.column("line").to_pylist()
        objs, errors = batch.column("obj").to_pylist(), batch.column("error").to_pylist()
        # Lines are numbered by their place in this batch while scored (score_lines keys results by
        # number, and a batch may hold line 7 of two shards); the real numbers are put back below.
        lines = [
            parse_line(i, obj, *self.reading) if error is None else Line(i, None if obj is None else orjson.loads(obj), None, None, error)
            for i, (obj, error) in enumerate(zip(objs, errors, strict=True))
        ]
        out: dict[str, list[Any]] = {"shard": [], "bucket": [], "shape": [], "record": [], "scores": []}
        for line, scored in score_lines(self.subspace, self.manifest, lines, self.embed, threshold=self.threshold,
                                        chunk_size=len(lines) or 1):
            real = replace(line, number=numbers[line.number])
            shard = shards[line.number]
            bucket, record = filter_record(real, scored, shard)
            out["shard"].append(shard)
            out["bucket"].append(bucket)
            out["shape"].append(line.shape)
            out["record"].append(orjson.dumps(record, default=json_default))
            out["scores"].append(orjson.dumps({"shard": shard, **line_record(real, scored)}, default=json_default))
        return pa.table(out, schema=pa.schema([("shard", pa.string()), ("bucket", pa.string()), ("shape", pa.string()),
                                                ("record", pa.binary()), ("scores", pa.binary())]))


def _sink(outputs: dict[str, Path | None]):  # type: ignore[no-untyped-def]
    """A Ray ``Datasink`` (built here so ``ray`` is imported only when the engine runs)."""
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class FilterSink(Datasink):
        """Writes each write task's rows to ``<bucket>/part-<task>.jsonl`` and counts them per shard."""

        def __init__(self) -> None:
            self.counts: dict[str, Counter[str]] = {}
            self.shapes: Counter[str] = Counter()

        @property
        def supports_distributed_writes(self) -> bool:
            return False  # the output paths are on the driver's machine

        def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, dict[str, dict[str, int]]]:
            files: dict[str, Any] = {}
            counts: dict[str, Counter[str]] = {}
            shapes: Counter[str] = Counter()
            try:
                for block in blocks:
                    table = BlockAccessor.for_block(block).to_arrow()
                    columns = [table.column(c).to_pylist() for c in ("shard", "bucket", "shape", "record", "scores")]
                    for shard, bucket, shape, record, scores in zip(*columns, strict=True):
                        counts.setdefault(shard, Counter())[bucket] += 1
                        if shape is not None:
                            shapes[shape] += 1
                        for name, data in ((bucket, record), ("scores", scores)):
                            if outputs.get(name) is None:
                                continue
                            if name not in files:
                                files[name] = (outputs[name] / f"part-{ctx.task_idx:05d}.jsonl").open("wb")  # type: ignore[operator]
                            files[name].write(data + b"\n")
            finally:
                for fh in files.values():
                    fh.close()
            return {"counts": {shard: dict(c) for shard, c in counts.items()}, "shapes": dict(shapes)}

        def on_write_complete(self, write_result: Any) -> None:
            for part in write_result.write_returns:
                for shard, c in part["counts"].items():
                    self.counts.setdefault(shard, Counter()).update(c)
                self.shapes.update(part["shapes"])

    return FilterSink()


def _read_shards(shards: list[Path], reading: Reading) -> Any:
    """One dataset of numbered lines over every shard, in shard order (``union`` keeps it): each run of JSON shards
    is read by ``split_shard`` (a block per shard), each Parquet shard by ``ray.data.read_parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    parts: list[Any] = []
    run: list[Path] = []

    def flush_run() -> None:
        if run:
            parts.append(ray.data.from_items([{"path": str(p)} for p in run], override_num_blocks=len(run))
                         .map_batches(json_lines, fn_args=(reading,), batch_size=1, batch_format="pyarrow"))
            run.clear()

    for path in shards:
        if record_format(path)[0] != "parquet":
            run.append(path)
            continue
        flush_run()
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            raise RayEngineError(f"input: {path} is not a readable Parquet file ({err})") from err
        if rows:  # an empty shard has no line to account for (its counts stay 0)
            # zip pairs rows by position, which holds because run_filter sets preserve_order before building this
            # (Ray 2.60 deprecates zip, its removal announced for 2.64: ray is pinned to 2.60.0 in pyproject).
            table = ray.data.read_parquet(str(path), partitioning=None).zip(ray.data.range(rows))
            parts.append(table.map_batches(parquet_lines, fn_args=(str(path), reading), batch_format="pyarrow"))
    flush_run()
    if not parts:
        return ray.data.from_items([])  # nothing to read: every shard is empty
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def run_filter(
    input_spec: str | Path,
    *,
    settings: Settings,
    subspace: Subspace,
    manifest: Manifest,
    kept: Path,
    dropped: Path,
    rejected: Path,
    scores: Path | None = None,
    threshold: float | None = None,
    options: RayOptions = RayOptions(),
    shape: Shape | Literal["auto"] = "auto",
    columns: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Filter every line of every shard on Ray; returns the local engine's summary plus per-shard counts.

    Connects to ``options.address`` (or ``RAY_ADDRESS``), or starts a local cluster that is shut
    down again at the end; a cluster that was already initialised in this process is used as is.
    The output directories must be new or empty: a run never mixes its shards with an older run's.
    """
    shards = find_shards(input_spec)
    outputs: dict[str, Path | None] = {"kept": kept, "dropped": dropped, "rejected": rejected, "scores": scores}
    for name, path in outputs.items():
        if path is not None:
            _check_output(path, name)
    for path in outputs.values():
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)

    import ray

    started = not ray.is_initialized()
    if started:
        # No usage report leaves the machine unless the user asked for it.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        gpus = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if resources.get("GPU", 0) else 0.0)
        if gpus > resources.get("GPU", 0):
            # Ray would wait for a GPU forever instead of failing.
            raise RayEngineError(f"--gpus-per-actor {gpus:g}: the Ray cluster has {resources.get('GPU', 0):g} GPU(s); "
                                 "use --gpus-per-actor 0 to score on CPUs")
        actors = options.actors or (int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1) // options.cpus_per_actor) - 1)
        actors = max(1, actors)
        if not gpus and settings.num_threads == 0:
            # One torch thread per reserved CPU, so actors on a node do not fight over its cores.
            settings = settings.model_copy(update={"num_threads": max(1, int(options.cpus_per_actor))})

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # output shards in input order, run after run
        sink = _sink(outputs)
        reading: Reading = (shape, dict(columns) if columns else None)
        (
            _read_shards(shards, reading)
            .map_batches(
                LineScorer,
                fn_constructor_args=(settings, subspace, manifest, threshold, reading),
                batch_size=options.batch_lines,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=options.cpus_per_actor,
                num_gpus=gpus,
            )
            .write_datasink(sink)
        )
    finally:
        if started:
            ray.shutdown()

    by_shard = {str(p): {b: sink.counts.get(str(p), {}).get(b, 0) for b in BUCKETS} for p in shards}
    totals = {b: sum(c[b] for c in by_shard.values()) for b in BUCKETS}
    return {
        "total": sum(totals.values()), **totals,
        "subspace": manifest.name, "version": manifest.version,
        "threshold": manifest.threshold if threshold is None else threshold,
        "shapes": dict(sink.shapes),
        "files": {name: str(path) for name, path in outputs.items() if path is not None},
        "engine": "ray", "actors": actors, "gpus_per_actor": gpus,
        "shards": {shard: {"total": sum(c.values()), **c} for shard, c in by_shard.items()},
    }

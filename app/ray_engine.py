"""``saft filter --engine ray``: the local filter's scoring core spread over a Ray Data actor pool.

Owns: finding the input shards, cutting them into read tasks and reading those into numbered lines (a JSON shard in
any ``app.core.lines`` format is one task, read by ``read_file``; a table — a Parquet or Arrow shard, a dataset saved by
``datasets``' ``save_to_disk`` — is one task per ``app.core.lines.fragments`` part, runs of whole row groups or one Arrow
file, each numbering its rows from the part's first row number, so a row's line is its row in the shard), the scoring actor
(one Embedder and one subspace per actor, a GPU each when the cluster has them) and the datasink that writes the
kept / dropped / rejected (and optional per-line score) shards and counts every line per shard and every shape.

Must not: parse, format, embed or score in a way of its own. Lines are numbered and parsed by
``app.core.pipeline.read_file`` / ``read_records`` over ``app.core.lines``' records, scored by ``score_lines`` and written as
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

from app.config import Settings
from app.core.embedding import Embedder
from app.core.items import Shape
from app.core.lines import SUFFIXES, TABULAR, Fragment, RecordFileError, fragment_records, fragments, record_format
from app.core.manifest import Manifest
from app.core.pipeline import (
    Line,
    direct_embed,
    filter_record,
    json_default,
    line_record,
    parse_line,
    read_file,
    read_records,
    score_lines,
)
from app.core.subspace import Subspace
from app.store.artifacts import check_compatible

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
    read_rows: int = 8192  # rows per read task of a table (whole row groups: at least this many, but for the last)
    address: str | None = None  # None: RAY_ADDRESS if set, else a local cluster started for this run


def _is_shard(path: Path) -> bool:
    try:
        record_format(path)
    except RecordFileError:
        return False
    return path.is_file()


def find_shards(spec: str | Path) -> list[Path]:
    """The shards named by a file, a saved dataset (one shard), a directory (its files in a format ``app.core.lines`` reads,
    sorted) or a glob pattern (sorted); a named file or a glob match in a format saft does not read is refused, not
    skipped."""
    path = Path(spec)
    if path.is_dir() and (path / "state.json").is_file():
        try:
            record_format(path)
        except RecordFileError as err:
            raise RayEngineError(f"input: {err}") from None
        return [path.resolve()]
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


def read_tasks(shards: list[Path], read_rows: int) -> list[dict[str, Any]]:
    """The read tasks of a run, in shard order: ``{"shard", "fragment"}``, ``fragment`` None for a JSON shard (read
    whole) or one ``app.core.lines.fragments`` part of a table as JSON (its file, row groups, first row number, rows)."""
    tasks: list[dict[str, Any]] = []
    for shard in shards:
        if record_format(shard)[0] not in TABULAR:
            tasks.append({"shard": str(shard), "fragment": None})
            continue
        try:
            parts = fragments(shard, min_rows=read_rows)
        except RecordFileError as err:
            raise RayEngineError(f"input: {err}") from None
        tasks.extend({"shard": str(shard), "fragment": orjson.dumps({**part._asdict(), "path": str(part.path)})}
                     for part in parts if part.rows)  # an empty part has no line to account for
    return tasks


def task_lines(task: Mapping[str, Any], reading: Reading = ("auto", None)) -> Iterator[dict[str, Any]]:
    """One read task → one row per record, numbered as the local engine numbers the shard's records: a JSON shard by
    ``read_file`` (any JSONL/JSON format, compressed or not), a table's part by ``fragment_records`` from its first
    row's number on (nulls are absent keys, a value Python cannot hold is that row's error, not the shard's)."""
    shard = str(task["shard"])
    if task["fragment"] is None:
        lines = read_file(shard, *reading)
    else:
        part = orjson.loads(task["fragment"])
        groups = part["row_groups"]
        fragment = Fragment(Path(part["path"]), None if groups is None else tuple(groups), part["first"], part["rows"])
        lines = read_records(fragment_records(fragment), *reading)
    for line in lines:
        yield _line_row(shard, line)


def read_lines(batch: pa.Table, reading: Reading) -> pa.Table:
    """``map_batches`` over read tasks (``read_tasks``' rows): every line of each (``task_lines``)."""
    return _line_table([line for task in batch.to_pylist() for line in task_lines(task, reading)])


class LineScorer:
    """A Ray actor: loads the model once, then scores batches of lines with the shared core."""

    def __init__(self, settings: Settings, subspace: Subspace, manifest: Manifest, threshold: float | None,
                 reading: Reading = ("auto", None)) -> None:
        self.embedder = Embedder.from_settings(settings, manifest.model_id)
        check_compatible(manifest, subspace, self.embedder)
        self.subspace, self.manifest, self.threshold, self.reading = subspace, manifest, threshold, reading
        self.embed = direct_embed(self.embedder)  # from_settings: the configured batch limits

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


def _sink(outputs: dict[str, Path | None]) -> Any:
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

        def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
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
                            target = outputs.get(name)
                            if target is None:
                                continue
                            if name not in files:
                                files[name] = (target / f"part-{ctx.task_idx:05d}.jsonl").open("wb")
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


def _read_shards(shards: list[Path], reading: Reading, read_rows: int) -> Any:
    """One dataset of numbered lines over every shard, in shard order: a block per read task (``read_tasks``), read
    where the task runs; ``preserve_order`` (set by ``run_filter``) keeps the tasks' order."""
    import ray

    tasks = read_tasks(shards, read_rows)
    if not tasks:
        return ray.data.from_items([])  # nothing to read: every shard is empty
    return (ray.data.from_items(tasks, override_num_blocks=len(tasks))
            .map_batches(read_lines, fn_args=(reading,), batch_size=1, batch_format="pyarrow"))  # type: ignore[arg-type]  # fn_args: ray types fn as batch-only


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
            _read_shards(shards, reading, options.read_rows)
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

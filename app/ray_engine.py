"""``saft filter --engine ray``: the local filter's scoring core spread over a Ray Data actor pool.

Owns: finding the input shards, reading them into numbered lines, the scoring actor (one Embedder
and one subspace per actor, a GPU each when the cluster has them) and the datasink that writes the
kept / dropped / rejected (and optional per-line score) shards and counts every line per shard.

Must not: parse, format, embed or score in a way of its own. Lines are numbered and parsed by
``app.pipeline.read_lines`` / ``parse_line``, scored by ``score_lines`` and written as
``filter_record`` / ``line_record`` say, exactly as the local engine does; only the fan-out is Ray's.
``ray`` is imported inside the functions that need it, so nothing else in the package (the service
above all) ever imports it.
"""

from __future__ import annotations

import glob
import io
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from app.artifacts import Manifest, check_compatible
from app.config import Settings
from app.embedding import Embedder
from app.pipeline import Line, direct_embed, filter_record, line_record, parse_line, read_lines, score_lines
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


def find_shards(spec: str | Path) -> list[Path]:
    """The JSONL shards named by a file, a directory (its ``*.jsonl``, sorted) or a glob pattern (sorted)."""
    path = Path(spec)
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        found = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not found:
            raise RayEngineError(f"input: directory {path} holds no *.jsonl shard")
        return [p.resolve() for p in found]
    found = sorted(Path(p) for p in glob.glob(str(spec)) if Path(p).is_file())
    if not found:
        raise RayEngineError(f"input: {spec} is no file, no directory and no glob that matches a file")
    return [p.resolve() for p in found]


def _check_output(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RayEngineError(f"--{what}: {path} exists and is not an empty directory (the ray engine writes shards into a directory)")


def split_shard(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One shard file (a row of ``read_binary_files``) → one row per non-blank line, numbered as the local engine does.

    ``read_lines`` numbers and parses here; the parsed object travels on as JSON (re-parsed by the
    actor) so the rows stay plain Arrow columns.
    """
    shard = str(row["path"])
    for line in read_lines(io.BytesIO(row["bytes"])):
        yield {
            "shard": shard,
            "line": line.number,
            "obj": None if line.obj is None else orjson.dumps(line.obj),
            "error": line.error,
        }


class LineScorer:
    """A Ray actor: loads the model once, then scores batches of lines with the shared core."""

    def __init__(self, settings: Settings, subspace: Subspace, manifest: Manifest, threshold: float | None) -> None:
        self.embedder = Embedder.from_settings(settings, manifest.model_id)
        check_compatible(manifest, self.embedder)
        self.subspace, self.manifest, self.threshold = subspace, manifest, threshold
        self.embed = direct_embed(self.embedder, max_batch_tokens=settings.max_batch_tokens, max_batch_size=settings.max_batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        shards, numbers = batch.column("shard").to_pylist(), batch.column("line").to_pylist()
        objs, errors = batch.column("obj").to_pylist(), batch.column("error").to_pylist()
        # Lines are numbered by their place in this batch while scored (score_lines keys results by
        # number, and a batch may hold line 7 of two shards); the real numbers are put back below.
        lines = [
            parse_line(i, obj) if error is None else Line(i, None if obj is None else orjson.loads(obj), None, None, error)
            for i, (obj, error) in enumerate(zip(objs, errors, strict=True))
        ]
        out: dict[str, list[Any]] = {"shard": [], "bucket": [], "record": [], "scores": []}
        for line, scored in score_lines(self.subspace, self.manifest, lines, self.embed, threshold=self.threshold,
                                        chunk_size=len(lines) or 1):
            real = replace(line, number=numbers[line.number])
            shard = shards[line.number]
            bucket, record = filter_record(real, scored, shard)
            out["shard"].append(shard)
            out["bucket"].append(bucket)
            out["record"].append(orjson.dumps(record))
            out["scores"].append(orjson.dumps({"shard": shard, **line_record(real, scored)}))
        return pa.table(out, schema=pa.schema([("shard", pa.string()), ("bucket", pa.string()),
                                                ("record", pa.binary()), ("scores", pa.binary())]))


def _sink(outputs: dict[str, Path | None]):  # type: ignore[no-untyped-def]
    """A Ray ``Datasink`` (built here so ``ray`` is imported only when the engine runs)."""
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class FilterSink(Datasink):
        """Writes each write task's rows to ``<bucket>/part-<task>.jsonl`` and counts them per shard."""

        def __init__(self) -> None:
            self.counts: dict[str, Counter[str]] = {}

        @property
        def supports_distributed_writes(self) -> bool:
            return False  # the output paths are on the driver's machine

        def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, dict[str, int]]:
            files: dict[str, Any] = {}
            counts: dict[str, Counter[str]] = {}
            try:
                for block in blocks:
                    table = BlockAccessor.for_block(block).to_arrow()
                    columns = [table.column(c).to_pylist() for c in ("shard", "bucket", "record", "scores")]
                    for shard, bucket, record, scores in zip(*columns, strict=True):
                        counts.setdefault(shard, Counter())[bucket] += 1
                        for name, data in ((bucket, record), ("scores", scores)):
                            if outputs.get(name) is None:
                                continue
                            if name not in files:
                                files[name] = (outputs[name] / f"part-{ctx.task_idx:05d}.jsonl").open("wb")  # type: ignore[operator]
                            files[name].write(data + b"\n")
            finally:
                for fh in files.values():
                    fh.close()
            return {shard: dict(c) for shard, c in counts.items()}

        def on_write_complete(self, write_result: Any) -> None:
            for part in write_result.write_returns:
                for shard, c in part.items():
                    self.counts.setdefault(shard, Counter()).update(c)

    return FilterSink()


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
        (
            ray.data.read_binary_files([str(p) for p in shards], include_paths=True)
            .flat_map(split_shard)
            .map_batches(
                LineScorer,
                fn_constructor_args=(settings, subspace, manifest, threshold),
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
        "files": {name: str(path) for name, path in outputs.items() if path is not None},
        "engine": "ray", "actors": actors, "gpus_per_actor": gpus,
        "shards": {shard: {"total": sum(c.values()), **c} for shard, c in by_shard.items()},
    }

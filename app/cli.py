"""``saft``: fit, score, filter, eval, sweep and serve from the command line.

A thin shell over ``app.core.pipeline``; every line of every input is accounted for in the output.

Owns: the typer commands, their options, progress bars and tables, and where outputs and reports go. Must not: parse,
format, embed, fit or score in a way of its own (``app.core`` does), read a ``SAFT_*`` knob from ``os.environ`` (``get_settings``; ``serve``
passes the environment on whole to its jemalloc re-exec), import the
service (``app.api``), the Ray engine or the remote client at module level (only ``serve``, ``--engine ray`` and
``--url`` import them), or import datatrove, NeMo Curator or ``app.integrations`` (an import-linter contract).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import IO, Annotated, Any, Literal, cast

import numpy as np
import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from app.config import get_settings
from app.core.anchoring import Activation, GuardBounds, decide_activation
from app.core.calibration import calibration_error, probability
from app.core.embedding import Embedder, EmbeddingConfig, EmbeddingError, sha256_files
from app.core.embedstore import EmbeddingFile, EmbeddingFileError, StoredEmbed
from app.core.items import SHAPES, ItemError, Shape, parse_columns
from app.core.lines import (
    ParquetRowWriter,
    RecordFileError,
    data_files,
    open_records,
    record_format,
    row_count,
    table_schema,
    write_parquet_rows,
)
from app.core.manifest import ArtifactError, Manifest
from app.core.pipeline import (
    DEFAULT_FIT_EMBEDDING,
    TABLE_COLUMNS,
    EmbedFn,
    FitOptions,
    FitParams,
    Line,
    chunks,
    direct_embed,
    filter_record,
    fit_lines,
    json_default,
    line_record,
    read_file,
    score_lines,
    single_sample,
    table_row,
)
from app.core.quality import ThresholdError, grouped_quality
from app.core.report import write_report
from app.core.subspace import FitError, Subspace
from app.store.artifacts import active_version, check_compatible, load_version, save_version

app = typer.Typer(add_completion=False, help="Safety-Aware Fine-Tuning filter: drop harmful samples before training.")
err = Console(stderr=True)

USER_ERRORS = (ArtifactError, EmbeddingError, EmbeddingFileError, FitError, ThresholdError, FileNotFoundError, ValueError)


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(2)


@contextmanager
def _progress(description: str, total: int | None) -> Iterator[Any]:
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err, transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def _count_lines(path: Path) -> int:
    """Rows of a data file, for progress bars: a table's (Parquet, Arrow, a saved dataset) from its metadata, others by
    one pass (not decoded)."""
    rows = row_count(path)
    return sum(1 for _ in open_records(path)) if rows is None else rows


def _load_embedder(model: str | None) -> Embedder:
    return Embedder.from_settings(get_settings(), model)


def _load_scoring(name: str | None, version: str | None, model: str | None) -> tuple[Embedder, Subspace, Manifest]:
    settings = get_settings()
    subspace, manifest = load_version(settings.models_dir, name or settings.subspace_name, version)
    embedder = _load_embedder(model or manifest.model_id)
    check_compatible(manifest, subspace, embedder)
    return embedder, subspace, manifest


def _direct(embedder: Embedder) -> EmbedFn:
    return direct_embed(embedder)  # in the configured batches: Embedder.from_settings set them


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


NameOpt = Annotated[str | None, typer.Option("--name", help="Subspace name under models/ (default: settings).")]
VersionOpt = Annotated[str | None, typer.Option("--version", help="Subspace version (default: the active one).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Embedded model name, a local HF directory or a .gguf file (converted once into the model cache).")]
ThresholdOpt = Annotated[float | None, typer.Option("--threshold", help="Override τ for this run.")]


_FIT = FitOptions()  # the defaults of every fit option below (one place: FitOptions)
_FIT_LAYERS = ",".join(map(str, _FIT.embedding.layers))
LayersOpt = Annotated[str, typer.Option(help="Comma-separated layer indices (negative from the end).")]
PoolingOpt = Annotated[str, typer.Option(help="last | mean | response (mean over the final assistant turn)")]
TemplateOpt = Annotated[str, typer.Option(help="judge (the item inside one fixed 'is this harmful?' instruction) | chat | plain")]
MaxLengthOpt = Annotated[int, typer.Option(min=8)]
TruncationOpt = Annotated[str, typer.Option(help="left keeps the end (the response) | right keeps the start")]
MethodOpt = Annotated[str, typer.Option(help="auto (lda with labels, else saft) | saft (the paper, unsupervised) | lda (labelled)")]
KOpt = Annotated[int, typer.Option(min=1)]
CenterOpt = Annotated[str, typer.Option(help="global | kind")]
StandardizeOpt = Annotated[bool, typer.Option(help="Per-dimension standardization before the SVD.")]
ShrinkageOpt = Annotated[float, typer.Option(min=0.0, max=1.0)]
BalanceOpt = Annotated[str, typer.Option(help="item (every line weighs the same) | source (every 'source' weighs the same within its label)")]
NuisanceOpt = Annotated[int, typer.Option(min=0, help="lda: directions of between-benign-source spread projected out.")]
CrossFitOpt = Annotated[str, typer.Option(help="source: choose τ and P(harmful) on source-held-out scores (needs labels and 2+ sources) | none: on the fit's own scores")]
PolicyOpt = Annotated[str | None, typer.Option("--policy", help="max_f1 | fpr:R | recall:R | drop_rate:Q (default: fpr:0.05 with labels, drop_rate:0.1 without); chosen per item kind")]
EmbeddingsOpt = Annotated[Path | None, typer.Option("--embeddings", help="Embedding file (saft embed): lines it holds are not embedded again; new ones are added to it.")]
DataArg = Annotated[list[Path], typer.Argument(help="Data files (.jsonl[.gz|.zst], .json, .parquet, .arrow, a datasets save_to_disk directory; labelled or not); several are read as one set.", exists=True)]
FormatOpt = Annotated[str, typer.Option("--format", help="auto (each row's shape from its keys) | " + " | ".join(SHAPES))]
ColumnsOpt = Annotated[str | None, typer.Option("--columns", help="Key mapping, saft's name=yours: prompt=question,response=answer")]


def _reading(shape: str, columns: str | None) -> tuple[Shape | Literal["auto"], dict[str, str] | None]:
    """``--format`` and ``--columns`` checked, as ``read_file`` takes them."""
    if shape != "auto" and shape not in SHAPES:
        raise ItemError("--format", f"must be auto or one of {', '.join(SHAPES)}, got {shape!r}")
    return cast("Shape | Literal['auto']", shape), parse_columns(columns) if columns else None  # checked just above


def _shapes(lines: Iterator[Line], counts: dict[str, int]) -> Iterator[Line]:
    """``lines`` unchanged, counting the shape each valid row was read as into ``counts`` (for the summary)."""
    for line in lines:
        if line.shape is not None:
            counts[line.shape] = counts.get(line.shape, 0) + 1
        yield line


def _fit_options(layers: str, pooling: str, template: str, max_length: int, truncation_side: str, method: str = _FIT.method,
                 k: int = _FIT.k, center: str = _FIT.center, standardize: bool = _FIT.standardize,
                 shrinkage: float = _FIT.shrinkage, balance: str = _FIT.balance, nuisance: int = _FIT.nuisance,
                 policy: str | None = None, cross_fit: str = _FIT.cross_fit, **more: Any) -> FitOptions:
    """The options checked by ``FitParams`` (the refit API's model too): a bad value is a FitError naming it."""
    return FitParams.of(layers=layers.replace(" ", ""), pooling=pooling, template=template, max_length=max_length,
                        truncation_side=truncation_side, method=method, k=k, center=center, standardize=standardize,
                        shrinkage=shrinkage, balance=balance, nuisance=nuisance, policy=policy, cross_fit=cross_fit,
                        **more).options()


def _embedding_config(layers: str, pooling: str, template: str, max_length: int, truncation_side: str) -> EmbeddingConfig:
    """The embedding options alone (``saft score``/``filter``/``embed``), checked as ``_fit_options`` checks them."""
    return _fit_options(layers, pooling, template, max_length, truncation_side).embedding


def _read_files(paths: Sequence[Path], shape: Shape | Literal["auto"] = "auto", columns: dict[str, str] | None = None,
                ) -> Iterator[Line]:
    """The rows of several files (any format ``read_file`` reads) as one stream; with more than one file, each error
    names its file."""
    for path in paths:
        for line in read_file(path, shape, columns):
            if len(paths) > 1 and line.error is not None:
                line = Line(line.number, line.obj, line.item, line.label, f"{path.name}: {line.error}")
            yield line


def _embed_fn(embedder: Embedder, config: EmbeddingConfig, embeddings: Path | None) -> tuple[EmbedFn, StoredEmbed | None]:
    """The embed function of a run: direct, or through an embedding file when one is given."""
    direct = _direct(embedder)
    if embeddings is None:
        return direct, None
    config = EmbeddingConfig(**{**config.as_dict(), "layers": embedder.normalize_layers(config.layers)})
    store = EmbeddingFile.load(embeddings, embedder.weights_digest, config) if embeddings.exists() else EmbeddingFile(embedder.weights_digest, config)
    stored = StoredEmbed(embedder, store, direct)
    return stored, stored


def _save_embeddings(stored: StoredEmbed | None, path: Path | None) -> None:
    if stored is not None and path is not None and stored.misses:
        stored.store.save(path)
        err.print(f"embeddings: {stored.hits} from {path}, {stored.misses} embedded and added")


@app.command()
def fit(
    calibration: DataArg,
    name: NameOpt = None,
    model: ModelOpt = None,
    layers: LayersOpt = _FIT_LAYERS,
    pooling: PoolingOpt = _FIT.embedding.pooling,
    template: TemplateOpt = _FIT.embedding.template,
    max_length: MaxLengthOpt = _FIT.embedding.max_length,
    truncation_side: TruncationOpt = _FIT.embedding.truncation_side,
    method: MethodOpt = _FIT.method,
    k: KOpt = _FIT.k,
    center: CenterOpt = _FIT.center,
    standardize: StandardizeOpt = _FIT.standardize,
    shrinkage: ShrinkageOpt = _FIT.shrinkage,
    balance: BalanceOpt = _FIT.balance,
    nuisance: NuisanceOpt = _FIT.nuisance,
    cross_fit: CrossFitOpt = _FIT.cross_fit,
    threshold_policy: PolicyOpt = None,
    embeddings: EmbeddingsOpt = None,
    shape: FormatOpt = "auto",
    columns: ColumnsOpt = None,
    mode: Annotated[str, typer.Option(help="combine: add the data to the active version's stored calibration (unlabeled "
                                      "lines labelled by its verdicts, τ carried over); replace: fit on the data alone.")] = _FIT.mode,
    labelled_weight: Annotated[float, typer.Option(help="combine: how many calibration sources the labelled lines weigh as.")] = _FIT.labelled_weight,
    pseudo_weight: Annotated[float, typer.Option(help="combine: how many calibration sources the unlabeled lines weigh as.")] = _FIT.pseudo_weight,
    activate: Annotated[str, typer.Option(help="auto: activate unless the new version and the active one disagree on the data "
                                          "past the guard's bounds (SAFT_REFIT_GUARD_*); always; never.")] = "auto",
    strict: Annotated[bool, typer.Option(help="Stop at the first invalid line instead of rejecting it.")] = False,
    report: Annotated[Path | None, typer.Option(help="HTML report path (default reports/fit-NAME-VERSION.html).")] = None,
) -> None:
    """Fit a subspace on a calibration set and publish it as a new version under models/.

    Where NAME has an active version, the fit starts from it (--mode combine) and is compared with it on the data;
    --activate auto then activates it only when the guard finds no reason against it (printed)."""
    settings = get_settings()
    name = name or settings.subspace_name
    try:
        if activate not in ("auto", "always", "never"):
            raise FitError(f"--activate must be auto, always or never, got {activate!r}")
        options = _fit_options(layers, pooling, template, max_length, truncation_side, method, k, center, standardize,
                               shrinkage, balance, nuisance, threshold_policy, cross_fit,
                               mode=mode, labelled_weight=labelled_weight, pseudo_weight=pseudo_weight)
        prior = None
        if active_version(settings.models_dir, name) is not None:
            prior = load_version(settings.models_dir, name)
        embedder = _load_embedder(model)
        embed, stored = _embed_fn(embedder, options.embedding, embeddings)
        with _progress("embedding calibration", sum(_count_lines(p) for p in calibration)) as advance:
            result = fit_lines(
                embedder, _read_files(calibration, *_reading(shape, columns)), options, name=name, calibration_digest=sha256_files(f for p in calibration for f in data_files(p)),
                calibration_path=",".join(p.name for p in calibration), progress=advance, embed=embed, strict=strict,
                prior=prior,
            )
        _save_embeddings(stored, embeddings)
        refit = result.manifest.refit or {}
        activated, held = decide_activation(
            cast(Activation, activate), refit.get("comparison"), has_active=prior is not None,  # checked above
            labelled=result.labels is not None or bool(refit.get("upload", {}).get("labelled")), bounds=GuardBounds(**settings.guard_bounds()))
        if refit:
            refit["activation"] = {"requested": activate, "activated": activated, "held": held}
        manifest = save_version(settings.models_dir, result.subspace, result.manifest, activate=activated)
    except USER_ERRORS as e:
        raise _fail(str(e)) from None
    report = report or Path("reports") / f"fit-{name}-{manifest.version}.html"
    write_report(
        report, title=f"saft fit: {name}/{manifest.version}", summary=_summary(manifest), scores=result.scores,
        labels=result.labels, kinds=result.meta["kind"], threshold=[manifest.threshold_for(k) for k in result.meta["item_kind"]],
        metrics=manifest.quality.get("calibration"),
        probabilities=None if manifest.probability is None
        else probability(manifest.probability, result.scores, result.meta["item_kind"]),
    )
    typer.echo(json.dumps({"name": name, "version": manifest.version, "threshold": manifest.threshold,
                           "thresholds": manifest.thresholds, "active": activated, "held": held,
                           "refit": {k: v for k, v in refit.items() if k != "activation"} or None,
                           "path": str(settings.models_dir / name / manifest.version), "report": str(report),
                           "rejected": manifest.calibration["rejected"],
                           "calibration_quality": manifest.quality.get("calibration", {}).get("overall")}, indent=2))


@app.command()
def embed(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Embedding file to write (or extend) atomically.")],
    model: ModelOpt = None,
    layers: LayersOpt = _FIT_LAYERS,
    pooling: PoolingOpt = _FIT.embedding.pooling,
    template: TemplateOpt = _FIT.embedding.template,
    max_length: MaxLengthOpt = _FIT.embedding.max_length,
    truncation_side: TruncationOpt = _FIT.embedding.truncation_side,
    shape: FormatOpt = "auto",
    columns: ColumnsOpt = None,
) -> None:
    """Embed every valid line once into an embedding file, for later fit / crossval / eval runs (--embeddings)."""
    try:
        config = _embedding_config(layers, pooling, template, max_length, truncation_side)
        embedder = _load_embedder(model)
        embed_fn, stored = _embed_fn(embedder, config, out)
        assert stored is not None
        rejected = 0
        with _progress("embedding", sum(_count_lines(p) for p in data)) as advance:
            for chunk in chunks(_read_files(data, *_reading(shape, columns)), 256):
                valid = [item for line in chunk for item in line.items]  # a preference row: both sides
                rejected += sum(line.item is None for line in chunk)
                if valid:
                    embed_fn(valid, stored.store.config)
                advance(len(chunk))
        stored.store.save(out)
    except USER_ERRORS as e:
        raise _fail(str(e)) from None
    typer.echo(json.dumps({"out": str(out), "rows": len(stored.store), "embedded": stored.misses, "from_file": stored.hits,
                           "rejected_lines": rejected}))


@app.command(name="crossval")
def crossval_(
    data: DataArg,
    by: Annotated[str, typer.Option(help="source (hold out each source in turn) | family (each family of --families)")] = "source",
    families: Annotated[Path | None, typer.Option(help="JSON {family: [source, ...]}; sources it does not name are families of their own.")] = None,
    model: ModelOpt = None,
    layers: LayersOpt = _FIT_LAYERS,
    pooling: PoolingOpt = _FIT.embedding.pooling,
    template: TemplateOpt = _FIT.embedding.template,
    max_length: MaxLengthOpt = _FIT.embedding.max_length,
    truncation_side: TruncationOpt = _FIT.embedding.truncation_side,
    method: MethodOpt = "lda",
    k: KOpt = _FIT.k,
    center: CenterOpt = _FIT.center,
    standardize: StandardizeOpt = _FIT.standardize,
    shrinkage: ShrinkageOpt = _FIT.shrinkage,
    balance: BalanceOpt = _FIT.balance,
    nuisance: NuisanceOpt = _FIT.nuisance,
    cross_fit: CrossFitOpt = _FIT.cross_fit,
    threshold_policy: PolicyOpt = None,
    embeddings: EmbeddingsOpt = None,
    shape: FormatOpt = "auto",
    columns: ColumnsOpt = None,
    report: Annotated[Path | None, typer.Option(help="HTML report path (default reports/crossval-BY.html).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics as JSON here too.")] = None,
) -> None:
    """Source-held-out evaluation: fit on all sources but one, score the one left out, for every source in turn.

    Reports per kind the AUROC / TPR at 1% and 5% FPR of the pooled out-of-source scores, and per source the
    share dropped at τ (benign items) or caught (harmful ones). A line's 'source' field names its source (its
    file's name where it has none); lines sharing a 'group' never straddle a fold."""
    from app.core.crossval import EmbeddedPool, crossval

    try:
        options = _fit_options(layers, pooling, template, max_length, truncation_side, method, k, center, standardize,
                               shrinkage, balance, nuisance, threshold_policy, cross_fit)
        family_of = {}
        if families is not None:
            spec = json.loads(families.read_text())
            family_of = {s: f for f, members in spec.items() if not f.startswith("_") for s in members}
        embedder = _load_embedder(model)
        config = EmbeddingConfig(**{**options.embedding.as_dict(), "layers": embedder.normalize_layers(options.embedding.layers)})
        embed_fn, stored = _embed_fn(embedder, config, embeddings)
        vectors, labels, item_kinds, kinds, sources, groups, rejected = [], [], [], [], [], [], []
        with _progress("embedding", sum(_count_lines(p) for p in data)) as advance:
            reading = _reading(shape, columns)
            for path in data:
                with closing(read_file(path, *reading)) as rows:
                    for chunk in chunks(map(single_sample, rows), 256):
                        valid = [line for line in chunk if line.item is not None and line.label is not None]
                        rejected += [f"{path.name} line {line.number}: {line.error or 'label: missing (crossval needs label 0/1)'}"
                                     for line in chunk if line.item is None or line.label is None]
                        if valid:
                            vectors.append(embed_fn([line.item for line in valid], config)[1])
                        for line in valid:
                            obj = line.obj or {}
                            labels.append(line.label)
                            item_kinds.append(line.item.kind)
                            kinds.append(str(obj.get("kind", line.item.kind)))
                            sources.append(str(obj.get("source", path.name)))
                            groups.append(str(obj.get("group", f"{path.name}:{line.number}")))
                        advance(len(chunk))
        _save_embeddings(stored, embeddings)
        if not vectors:
            raise _fail("no line can be cross-validated")
        pool = EmbeddedPool(np.concatenate(vectors), np.asarray(labels), item_kinds, kinds, sources, groups)
        result = crossval(pool, options, by=by, families=family_of)  # type: ignore[arg-type]  # --by is a str; crossval checks it
    except USER_ERRORS as e:
        raise _fail(str(e)) from None
    scores, taus = result.pop("scores"), result.pop("thresholds")
    resolved = options.resolved(labelled=True)
    result = {"data": [p.name for p in data], "model": embedder.model_id, "embedding": config.as_dict(),
              "fit": {"method": resolved.method, "k": resolved.k, "center": resolved.center, "standardize": resolved.standardize,
                      "shrinkage": resolved.shrinkage, "balance": resolved.balance, "nuisance": resolved.nuisance,
                      "cross_fit": resolved.cross_fit,
                      "policy": resolved.policy.as_dict() if resolved.policy else None},
              "rejected": {"count": len(rejected), "lines": rejected[:100]}, **result}
    report = report or Path("reports") / f"crossval-{by}.html"
    write_report(report, title=f"saft crossval by {by}: {', '.join(p.name for p in data)}",
                 summary={k: result[k] for k in ("model", "embedding", "fit", "by", "n_folds", "n")} | {
                     k: result[k] for k in ("worst_benign_source", "worst_harmful_source") if k in result},
                 scores=scores, labels=labels, kinds=kinds, threshold=taus, metrics=result["metrics"])
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"held out by {by}: {result['n_folds']} folds, {result['n']} lines")
    for col in ("kind", "n", "AUROC", "TPR@1%FPR", "TPR@5%FPR", "dropped benign", "caught harmful"):
        table.add_column(col)
    for kind, m in result["metrics"]["by_kind"].items():
        table.add_row(kind, str(m["n"]), *(f"{m[c]:.3f}" if c in m else "–" for c in ("auroc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr",
                                                                                      "fpr_at_threshold", "recall")))
    err.print(table)
    for key in ("worst_benign_source", "worst_harmful_source"):
        if key in result:
            err.print(f"{key}: {result[key]}")
    err.print(f"report: {report}")
    typer.echo(json.dumps({k: result[k] for k in ("by", "n_folds", "n") if k in result}
                          | {"by_kind": {k: {c: m.get(c) for c in ("n", "auroc", "tpr_at_5pct_fpr")} for k, m in result["metrics"]["by_kind"].items()}}
                          | {k: result[k] for k in ("worst_benign_source", "worst_harmful_source") if k in result}))


def _summary(manifest: Any) -> dict[str, Any]:
    return {
        "subspace": f"{manifest.name}/{manifest.version}",
        "model": manifest.model_id,
        "embedding": manifest.embedding.as_dict(),
        "method": f"{manifest.method}, k={manifest.k}, center={manifest.center}, standardize={manifest.standardize}",
        "threshold τ": f"{manifest.threshold:.6g} ({manifest.threshold_policy.as_dict()})"
                       + "".join(f"; {k}: {v:.6g}" for k, v in manifest.thresholds.items()),
        "calibration": {k: v for k, v in manifest.calibration.items() if k != "counts"},
    }


def _open_out(path: Path | None) -> IO[bytes]:
    return sys.stdout.buffer if path is None or str(path) == "-" else path.open("wb")


@app.command()
def score(
    input: Annotated[Path, typer.Argument(help="Items: .jsonl[.gz|.zst], .json, .parquet, .arrow or a datasets save_to_disk directory.", exists=True)],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="JSONL out (default stdout).")] = None,
    name: NameOpt = None,
    version: VersionOpt = None,
    threshold: ThresholdOpt = None,
    url: Annotated[str | None, typer.Option(help="Score through a running saft service instead of in-process.")] = None,
    token: Annotated[str | None, typer.Option(help="Bearer token for --url.")] = None,
    shape: FormatOpt = "auto",
    columns: ColumnsOpt = None,
) -> None:
    """Score every line: one output line per input line, with score and verdict or the error."""
    out = _open_out(output)
    shapes: dict[str, int] = {}
    try:
        lines = _shapes(read_file(input, *_reading(shape, columns)), shapes)
        if url:
            from saft_filter_client import SaftClient

            from app.client import score_lines as score_remote

            with SaftClient(url, token=token) as client:
                for rec in score_remote(client, lines, threshold=threshold):
                    out.write(orjson.dumps(rec, default=json_default) + b"\n")
        else:
            embedder, subspace, manifest = _load_scoring(name, version, None)
            with _progress("scoring", _count_lines(input)) as advance:
                for line, scored in score_lines(subspace, manifest, lines, _direct(embedder), threshold=threshold, progress=advance):
                    out.write(orjson.dumps(line_record(line, scored), default=json_default) + b"\n")
        err.print("shapes: " + (", ".join(f"{k} {v}" for k, v in sorted(shapes.items())) or "none (no valid row)"))
    except USER_ERRORS as e:
        raise _fail(str(e)) from None
    finally:
        if out is not sys.stdout.buffer:
            out.close()


@app.command(name="filter")
def filter_(
    input: Annotated[Path, typer.Argument(help="Items (.jsonl[.gz|.zst], .json, .parquet, .arrow, a datasets save_to_disk directory); with --engine ray also a directory of shards or a glob.")],
    kept: Annotated[Path | None, typer.Option(help="Kept lines, unchanged (default kept.jsonl; *.parquet: Parquet; ray: directory kept/).")] = None,
    dropped: Annotated[Path | None, typer.Option(help="Dropped lines with their score (default dropped.jsonl; *.parquet: rows + saft_* columns; ray: dropped/).")] = None,
    rejected: Annotated[Path | None, typer.Option(help="Invalid lines: line number, reason, raw object (default rejected.jsonl; ray: rejected/).")] = None,
    scores: Annotated[Path | None, typer.Option(help="Also every line's score record, as 'saft score' writes it (*.parquet: every input row + saft_score, saft_verdict, saft_kind; ray: a directory).")] = None,
    summary: Annotated[Path | None, typer.Option(help="Summary JSON (also printed).")] = None,
    name: NameOpt = None,
    version: VersionOpt = None,
    threshold: ThresholdOpt = None,
    engine: Annotated[str, typer.Option(help="local (this process) | ray (Ray Data actor pool, one model per actor).")] = "local",
    actors: Annotated[int | None, typer.Option(min=1, help="ray: actors (default: one per GPU, else one per spare CPU).")] = None,
    cpus_per_actor: Annotated[float, typer.Option(min=0.1, help="ray: CPUs reserved per actor (its torch threads on CPU).")] = 1.0,
    gpus_per_actor: Annotated[float | None, typer.Option(min=0.0, help="ray: GPUs per actor (default: 1 when the cluster has GPUs).")] = None,
    batch_lines: Annotated[int, typer.Option(min=1, help="ray: lines per actor call.")] = 256,
    read_rows: Annotated[int | None, typer.Option(min=1, help="ray: rows per read task of a Parquet or Arrow shard or a saved dataset (whole row groups; default 8192).")] = None,
    ray_address: Annotated[str | None, typer.Option(help="ray: cluster address (default: RAY_ADDRESS, else a local cluster).")] = None,
    shape: FormatOpt = "auto",
    columns: ColumnsOpt = None,
) -> None:
    """Split a dataset into kept / dropped / rejected files; every input line lands in exactly one.

    A preference row ({prompt, chosen, rejected}) is scored side by side and dropped when its chosen side is."""
    if engine not in ("local", "ray"):
        raise _fail(f"--engine: {engine!r} is not one of local, ray")
    if engine == "local" and not input.is_file():
        if not input.is_dir():
            raise _fail(f"input: {input} is not a file (a directory or glob of shards needs --engine ray)")
        try:
            record_format(input)  # a directory is read when datasets' save_to_disk wrote it
        except RecordFileError as e:
            raise _fail(f"input: {e} (a directory or glob of shards needs --engine ray)") from None
    try:
        reading = _reading(shape, columns)
        if engine == "ray":
            from app.ray_engine import RayOptions, run_filter

            settings = get_settings()
            subspace, manifest = load_version(settings.models_dir, name or settings.subspace_name, version)
            result = run_filter(
                str(input), settings=settings, subspace=subspace, manifest=manifest, threshold=threshold,
                kept=kept or Path("kept"), dropped=dropped or Path("dropped"), rejected=rejected or Path("rejected"), scores=scores,
                options=RayOptions(actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
                                   batch_lines=batch_lines, address=ray_address,
                                   **({} if read_rows is None else {"read_rows": read_rows})),
                shape=reading[0], columns=reading[1],
            )
        else:
            result = _filter_local(input, *_load_scoring(name, version, None), kept or Path("kept.jsonl"), dropped or Path("dropped.jsonl"),
                                   rejected or Path("rejected.jsonl"), scores, threshold, reading)
    except USER_ERRORS as e:
        raise _fail(str(e)) from None
    text = json.dumps(result, indent=2)
    if summary is not None:
        summary.write_text(text + "\n")
    typer.echo(text)


#: The saft_* columns each Parquet output of ``saft filter`` adds to the input rows (``table_row``'s, by bucket).
_BUCKET_COLUMNS = {
    "kept": (),
    "dropped": ("saft_line", "saft_score", "saft_verdict", "saft_kind"),
    "rejected": ("saft_line", "saft_verdict", "saft_error"),
    "scores": ("saft_line", "saft_score", "saft_verdict", "saft_kind", "saft_error"),
}
_SIDE_COLUMNS = ("saft_chosen_score", "saft_rejected_score")


class _Output:
    """One output file of ``saft filter``: JSONL written as the run goes or, for a path ending in .parquet, the input
    rows plus the bucket's saft_* columns — streamed in the input's schema when the input is Parquet
    (``ParquetRowWriter``), else held until the end, where the schema is inferred from all rows."""

    def __init__(self, path: Path, bucket: str, schema: Any, sides: bool) -> None:
        self.path = path
        self.columns = [*_BUCKET_COLUMNS[bucket], *(_SIDE_COLUMNS if sides and bucket in ("dropped", "scores") else ())]
        self.fh: IO[bytes] | None = None
        self.writer: ParquetRowWriter | None = None
        self.rows: list[dict[str, Any]] = []
        if not path.name.lower().endswith(".parquet"):
            self.fh = path.open("wb")
        elif schema is not None:
            self.writer = ParquetRowWriter(path, schema, {k: TABLE_COLUMNS[k] for k in self.columns})

    def write(self, record: Any, row: dict[str, Any]) -> None:
        """``record`` to a JSONL file, ``row`` to a Parquet one."""
        if self.fh is not None:
            self.fh.write(orjson.dumps(record, default=json_default) + b"\n")
        elif self.writer is not None:
            self.writer.write(row)
        else:
            self.rows.append(row)

    def close(self, complete: bool) -> None:
        """Finish the file; a Parquet file of a run that failed is not written (the previous one stays)."""
        if self.fh is not None:
            self.fh.close()
        elif self.writer is not None and complete:
            self.writer.close()
        elif self.writer is not None:
            self.writer.abort()
        elif complete:
            sides = [k for k in _SIDE_COLUMNS if k in self.columns or any(k in r for r in self.rows)]
            write_parquet_rows(self.path, self.rows, {k: TABLE_COLUMNS[k] for k in [*self.columns, *sides]})


def _filter_local(input: Path, embedder: Embedder, subspace: Any, manifest: Any, kept: Path, dropped: Path, rejected: Path,
                  scores: Path | None, threshold: float | None, reading: tuple[Shape | Literal["auto"], dict[str, str] | None],
                  ) -> dict[str, Any]:
    counts = {"total": 0, "kept": 0, "dropped": 0, "rejected": 0}
    shapes: dict[str, int] = {}
    schema, sides = None, False
    schema = table_schema(input)  # Parquet outputs of a table keep the input's column types
    if schema is not None:
        names = reading[1] or {}
        sides = all(names.get(side, side) in schema.names for side in ("chosen", "rejected"))  # preference rows can occur
    paths = {"kept": kept, "dropped": dropped, "rejected": rejected} | ({"scores": scores} if scores is not None else {})
    out: dict[str, _Output] = {}
    complete = False
    with ExitStack() as closing_all:  # every output is closed (a Parquet one discarded unless the run completed)
        for bucket, path in paths.items():
            out[bucket] = _Output(path, bucket, schema, sides)

            def close(output: _Output = out[bucket]) -> None:
                output.close(complete)  # read when the stack unwinds: True only once the run completed
            closing_all.callback(close)
        with _progress("filtering", _count_lines(input)) as advance:
            lines = _shapes(read_file(input, *reading), shapes)
            for line, scored in score_lines(subspace, manifest, lines, _direct(embedder), threshold=threshold, progress=advance):
                bucket, record = filter_record(line, scored)
                counts["total"] += 1
                counts[bucket] += 1
                out[bucket].write(record, (line.obj or {}) if bucket == "kept" else table_row(line, scored))
                if "scores" in out:
                    out["scores"].write(line_record(line, scored), table_row(line, scored))
        complete = True
    return {**counts, "shapes": shapes, "subspace": manifest.name, "version": manifest.version,
            "threshold": manifest.threshold if threshold is None else threshold,
            "files": {bucket: str(path) for bucket, path in paths.items()}, "engine": "local"}


@app.command(name="eval")
def eval_(
    input: Annotated[Path, typer.Argument(help="Labelled data, any format 'saft score' reads (label 0/1; kind and source used for breakdowns).", exists=True)],
    name: NameOpt = None,
    version: VersionOpt = None,
    threshold: ThresholdOpt = None,
    report: Annotated[Path | None, typer.Option(help="HTML report path (default reports/eval-NAME-VERSION.html).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics as JSON here too.")] = None,
    shape: FormatOpt = "auto",
    columns: ColumnsOpt = None,
) -> None:
    """Quality of a subspace on labelled data: AUROC, AUPRC, TPR at 1%/5% FPR, P/R/F1 at τ, per kind and source.

    A preference row is evaluated as 'saft filter' decides it: its label is the row's, its score its chosen side's."""
    shapes: dict[str, int] = {}
    try:
        reading = _reading(shape, columns)
        total = _count_lines(input)  # reads the file once: one that cannot be read fails here, before any scoring
        embedder, subspace, manifest = _load_scoring(name, version, None)
    except USER_ERRORS as e:
        raise _fail(str(e)) from None
    scores, taus, labels, kinds, sources, rejected = [], [], [], [], [], []
    probs: list[float | None] = []
    with _progress("evaluating", total) as advance:
        lines = _shapes(read_file(input, *reading), shapes)
        for line, scored in score_lines(subspace, manifest, lines, _direct(embedder), threshold=threshold, progress=advance):
            if scored is None or line.label is None:
                rejected.append(f"line {line.number}: {line.error or 'label: missing (eval needs label 0/1)'}")
                continue
            scores.append(scored.score)
            taus.append(scored.threshold)
            probs.append(scored.probability)
            labels.append(line.label)
            assert line.item is not None  # score_lines scores the lines that have an item, and only those
            kinds.append(str((line.obj or {}).get("kind", line.item.kind)))
            sources.append(str((line.obj or {}).get("source", "unknown")))
    if rejected:
        err.print(f"[yellow]{len(rejected)} line(s) rejected (not evaluated):[/] " + "; ".join(rejected[:10]))
    if not scores:
        raise _fail("no line can be evaluated")
    tau = manifest.threshold if threshold is None else threshold
    by_kind = {k: manifest.threshold_for(k) if threshold is None else threshold for k in sorted({"text", "pair", *manifest.thresholds})}
    try:
        metrics = grouped_quality(labels, scores, taus, {"kind": kinds, "source": sources})
    except ValueError as e:
        raise _fail(str(e)) from None
    result = {"subspace": manifest.name, "version": manifest.version, "threshold": tau, "thresholds": by_kind, "data": input.name,
              "shapes": shapes, "rejected": {"count": len(rejected), "lines": rejected[:100]}, "metrics": metrics}
    # A version with a probability gives every scored line one.
    probabilities = None if manifest.probability is None else cast("list[float]", probs)
    if probabilities is not None:  # how well the version's probabilities hold on this data
        result["probability"] = {"ece": calibration_error(probabilities, labels, kinds)}
    report = report or Path("reports") / f"eval-{manifest.name}-{manifest.version}.html"
    write_report(report, title=f"saft eval: {manifest.name}/{manifest.version} on {input.name}", summary=_summary(manifest),
                 scores=scores, labels=labels, kinds=kinds, threshold=taus, metrics=metrics,
                 probabilities=probabilities)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"{manifest.name}/{manifest.version} on {input.name} (τ " + ", ".join(f"{k} {v:.4g}" for k, v in by_kind.items()) + ")")
    for col in ("group", "n", "AUROC", "AUPRC", "TPR@1%FPR", "TPR@5%FPR", "P", "R", "F1"):
        table.add_column(col)
    rows = [("overall", metrics["overall"])] + [(f"kind={k}", v) for k, v in metrics["by_kind"].items()]
    for label, m in rows:
        table.add_row(label, str(m["n"]), *(f"{m[c]:.3f}" if c in m else "–" for c in ("auroc", "auprc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "precision", "recall", "f1")))
    err.print(table)
    err.print(f"report: {report}")
    typer.echo(json.dumps(result))


@app.command()
def sweep(
    calibration: Annotated[Path, typer.Argument(help="Labelled calibration data, any format 'saft score' reads.", exists=True)],
    eval_file: Annotated[Path | None, typer.Option("--eval", help="Labelled evaluation JSONL (default: 25% of calibration groups).")] = None,
    layers: Annotated[str, typer.Option(help="Layer sets, ';'-separated, each comma-separated: '8;16;8,16'.")] = "4;8;12;16;20;24;28;30",
    pooling: Annotated[str, typer.Option(help="Poolings to try: last,mean")] = "last,mean",
    method: Annotated[str, typer.Option(help="Methods to try: saft,lda")] = "saft,lda",
    k: Annotated[str, typer.Option(help="k values for saft")] = "1,2,4,8",
    center: Annotated[str, typer.Option(help="Centerings: global,kind")] = "global,kind",
    shrinkage: Annotated[str, typer.Option(help="Shrinkages for lda")] = "0.1,0.5,0.9",
    template: str = DEFAULT_FIT_EMBEDDING.template,
    max_length: Annotated[int, typer.Option(min=8)] = DEFAULT_FIT_EMBEDDING.max_length,
    truncation_side: str = DEFAULT_FIT_EMBEDDING.truncation_side,
    limit: Annotated[int | None, typer.Option(help="Use only the first N lines of each file.")] = None,
    model: ModelOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write all rows as JSON here.")] = None,
    top: Annotated[int, typer.Option(help="Rows to print.")] = 20,
) -> None:
    """Layer / pooling / method / k sweep: embed once, fit every combination, rank by worst per-kind AUROC."""
    from itertools import islice

    from app.core.sweep import embed_set, holdout_mask, run_sweep

    layer_sets = [_ints(part) for part in layers.split(";") if part.strip()]
    all_layers = sorted({layer for ls in layer_sets for layer in ls})
    poolings = _words(pooling)
    base = EmbeddingConfig((all_layers[0],), poolings[0], template, max_length, truncation_side)  # type: ignore[arg-type]  # CLI strings for Literal fields, unchecked until FitParams (issue 14 step 3)
    try:
        embedder = _load_embedder(model)

        def load(path: Path):
            total = min(_count_lines(path), limit or 1 << 62)
            with closing(read_file(path)) as rows, _progress(f"embedding {path.name}", total) as advance:
                return embed_set(embedder, islice(map(single_sample, rows), limit), all_layers, poolings, base, progress=advance)  # type: ignore[arg-type]  # --pooling words for Literal poolings, unchecked (FitParams, step 3)

        train = load(calibration)
        if eval_file is not None:
            test = load(eval_file)
        else:
            held = holdout_mask(train.groups)
            train, test = train.subset(~held), train.subset(held)
        rows = run_sweep(train, test, layer_sets=layer_sets, poolings=poolings, methods=_words(method),
                         ks=_ints(k), centers=_words(center), shrinkages=[float(x) for x in _words(shrinkage)])
    except USER_ERRORS as e:
        raise _fail(str(e)) from None
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=1) + "\n")
    kinds = sorted({kind for r in rows for kind in r.get("by_kind", {})})
    table = Table(title=f"sweep: fit on {calibration.name}, measured on {eval_file.name if eval_file else 'held-out calibration groups'}")
    for col in ("layers", "pooling", "method", "k", "center", "shrink", "worst AUROC", *(f"AUROC {x}" for x in kinds), *(f"TPR@5% {x}" for x in kinds)):
        table.add_column(col)
    for r in rows[:top]:
        if "error" in r:
            continue
        by = r["by_kind"]
        table.add_row(",".join(map(str, r["layers"])), r["pooling"], r["method"], str(r["k"]), r["center"], str(r["shrinkage"]),
                      f"{r['worst_kind_auroc']:.3f}", *(f"{by[x]['auroc']:.3f}" for x in kinds),
                      *(f"{by[x]['tpr_at_5pct_fpr']:.3f}" for x in kinds))
    err.print(table)
    typer.echo(json.dumps(rows[0] if rows else {}))


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default SAFT_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default SAFT_PORT).")] = None,
) -> None:
    """Run the HTTP service (uvicorn) on the configured model and active subspace."""
    from app.api.app import create_app
    from app.api.server import run
    from app.serving.memory import limit_arenas, preload_jemalloc

    settings = get_settings()
    try:
        preloaded = preload_jemalloc(settings.allocator, os.environ)
    except RuntimeError as err:
        raise typer.BadParameter(str(err), param_hint="SAFT_ALLOCATOR") from None
    if preloaded is not None:  # run on jemalloc: the same command again, with the library preloaded from its start
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], preloaded)
    limit_arenas(settings.malloc_arena_max)  # before the model's and the server's threads allocate (glibc only)
    run(create_app(settings), settings, host or settings.host, port or settings.port)


@app.command(name="model-cache")
def model_cache(
    clear: Annotated[bool, typer.Option(help="Delete the converted models.")] = False,
    convert: Annotated[bool, typer.Option(help="Convert the embedded GGUF default now (no-op when cached).")] = False,
) -> None:
    """Show, fill or clear the cache where the embedded GGUF default is converted to safetensors (once)."""
    from app.core.embedding import EMBEDDED_DECODER, resolve_model_dir

    cache = get_settings().model_cache_dir
    if clear and cache.exists():
        shutil.rmtree(cache)
    if convert:
        resolve_model_dir(EMBEDDED_DECODER, cache)
    entries = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    typer.echo(json.dumps({"cache_dir": str(cache), "entries": entries, "cleared": clear}))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

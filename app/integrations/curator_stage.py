"""``SaftScore``: a NeMo Curator stage that adds saft's verdict to every row of a ``DocumentBatch``.

The stage is an actor stage: ``setup()`` loads the model and the subspace once per worker
(``app.integrations.local.LocalScorer``, as ``saft filter`` loads them), and ``process_batch`` scores all rows of the
batches it is given together. Each row gains the ``VERDICT_FIELDS`` columns (``saft_score``, ``saft_probability``,
``saft_verdict`` — keep / drop / rejected — ``saft_threshold``, ``saft_kind``, ``saft_error``), on which Curator's own
``Filter`` acts: ``Filter(filter_fn=keep, filter_field="saft_verdict")`` keeps the rows ``saft filter`` keeps.

Rows are read from the batch's Arrow form (``app.core.lines.batch_rows``: nulls are absent keys, so a table mixing shapes
reads as its JSONL lines do). Imported only by pipelines that use it (needs the ``curator`` extra); owns no scoring and
no item parsing.

Owns: ``SaftScore`` and ``keep``. Must not: score, parse or format items itself (``LocalScorer`` and ``app.core`` do),
or be imported by the service, the CLI or the Ray engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
from nemo_curator.backends.base import WorkerMetadata
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import DocumentBatch

from app.core.lines import batch_rows
from app.integrations.local import VERDICT_FIELDS, LocalScorer, check_shape, verdict_fields


def keep(verdict: str) -> bool:
    """``Filter``'s ``filter_fn`` over ``saft_verdict``: what ``saft filter`` writes to kept (not drop, not rejected)."""
    return verdict == "keep"


def _table(batch: DocumentBatch) -> pa.Table:
    if isinstance(batch.data, pd.DataFrame):
        return pa.Table.from_pandas(batch.data, preserve_index=False)  # a filtered frame's index is no column of the row
    return batch.to_pyarrow()


@dataclass
class SaftScore(ProcessingStage[DocumentBatch, DocumentBatch]):
    """Scores every row with a subspace version (default: the active version of ``SAFT_SUBSPACE_NAME``).

    ``threshold`` overrides τ; ``shape`` and ``columns`` are ``saft filter --format/--columns``'s (a row is any
    ``app.core.items`` shape, read from all of its columns). Settings (model cache, device, batch limits) come from the
    ``SAFT_*`` environment of the worker. ``resources`` reserves a worker's CPUs (``Resources(gpus=1.0)`` for one GPU).
    """

    subspace: str | None = None
    version: str | None = None
    threshold: float | None = None
    shape: str = "auto"
    columns: dict[str, str] | None = None
    name: str = "saft_score"
    resources: Resources = field(default_factory=lambda: Resources(cpus=1.0))
    batch_size: int = 1

    def __post_init__(self) -> None:
        check_shape(self.shape)  # in the driver, before any worker starts
        self._scorer: LocalScorer | None = None

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], list(VERDICT_FIELDS)

    def ray_stage_spec(self) -> dict[str, Any]:
        return {"is_actor_stage": True}  # one model per worker, loaded in setup()

    def setup(self, worker_metadata: WorkerMetadata | None = None) -> None:
        self._scorer = LocalScorer(self.subspace, self.version, threshold=self.threshold, shape=self.shape, columns=self.columns)

    def process(self, task: DocumentBatch) -> DocumentBatch:
        return self.process_batch([task])[0]

    def process_batch(self, tasks: list[DocumentBatch]) -> list[DocumentBatch]:
        if self._scorer is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before process (Curator's executors call it once per worker)")
        per_task = [batch_rows(_table(task)) for task in tasks]
        scored = iter(self._scorer.score_rows([row for rows in per_task for row in rows]))
        out = []
        for task, rows in zip(tasks, per_task, strict=True):
            fields = [verdict_fields(*next(scored)) for _ in rows]
            df = task.to_pandas().copy()
            for name in dict.fromkeys(k for f in fields for k in (*VERDICT_FIELDS, *f)):
                df[name] = [f.get(name) for f in fields]
            out.append(DocumentBatch(dataset_name=task.dataset_name, data=df, _metadata=task._metadata, _stage_perf=task._stage_perf))
        return out

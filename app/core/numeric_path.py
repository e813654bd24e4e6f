"""The numeric path a subspace was fitted on, the probe items that measure a change of it, and the check at load.

A basis and its τ are only valid for the vectors they were fitted on: the same weights and embedding config, but also
the same arithmetic. Running the model in bfloat16, on a GPU, compiled, or with another attention kernel moves every hidden
state a little, and the projection onto the basis (with τ in the same units) moves with it. So a fit records its
path (``NumericPath``: device type, dtype, attention implementation) and a few of its calibration items with the
scores the fit gave them (``Probe``). Loading a version on a different path embeds those probes on the path at hand
and refuses the version when a probe's score moves by more than ``SCORE_TOLERANCE`` (``NumericPathMismatch``); the
same path needs no passes at all.

Owns: ``NumericPath``, ``Probe``, ``ProbeCollector`` (picking probes while a fit streams), ``check_numeric_path``.
Must not: read or write files, know HTTP, the registry or Redis, or decide which path the service runs (settings do).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app.core.items import Item, parse_item

if TYPE_CHECKING:
    from app.core.embedding import Embedder, EmbeddingConfig
    from app.core.subspace import Subspace

log = logging.getLogger(__name__)

#: The largest |Δscore| of a probe that still counts as the same scores. Scores are in the basis' own units, where τ of
#: the default lies near 3 and one flipped verdict needs a move of |score - τ|; 0.05 is 1.7% of τ. For scale: two fp32
#: passes of one item in different batches differ by ~1e-5; int8 dynamic quantization moved the median probe by 2.98
#: and AUROC by up to 0.041 (BENCHMARKS.md 7b), far past issue 17's 0.005.
SCORE_TOLERANCE = 0.05

#: Probes picked per (item kind, label) cell of a fit's calibration stream.
PROBES_PER_CELL = 2


class NumericPathMismatch(ValueError):
    """The path at hand moves a version's scores beyond ``SCORE_TOLERANCE``, or cannot be checked (no probes)."""


@dataclass(frozen=True, slots=True)
class NumericPath:
    """How the hidden states were computed: the device type ("cpu", "cuda"), the dtype of the weights and activations
    ("float32", "bfloat16", "float16"), the attention implementation transformers ran ("sdpa", "eager", ...) and
    whether the blocks ran ``torch.compile``d (``SAFT_COMPILE_BLOCKS``)."""

    device: str
    dtype: str
    attention: str
    compiled: bool = False

    def as_dict(self) -> dict[str, str | bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NumericPath:
        return cls(str(data["device"]), str(data["dtype"]), str(data["attention"]), bool(data.get("compiled", False)))

    def __str__(self) -> str:
        return f"{self.device}/{self.dtype}/{self.attention} attention" + (", compiled" if self.compiled else "")


#: What every version fitted before paths were recorded ran on: this project's CPU, fp32, transformers' default SDPA.
REFERENCE_PATH = NumericPath("cpu", "float32", "sdpa")


@dataclass(frozen=True, slots=True)
class Probe:
    """A calibration item and the score its fit gave it."""

    item: Item
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"messages": [{"role": role, "content": content} for role, content in self.item.turns],
                "score": self.score}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Probe:
        return cls(parse_item({"messages": data["messages"]}), float(data["score"]))


class ProbeCollector:
    """Keeps the first ``per_cell`` items of each (item kind, label) cell while a fit streams its calibration lines,
    by their position in the stream, so that their scores can be taken from the fit's own score array."""

    def __init__(self, per_cell: int = PROBES_PER_CELL) -> None:
        self.per_cell = per_cell
        self._picked: dict[tuple[str, int | None], list[tuple[int, Item]]] = {}
        self._seen = 0

    def offer(self, items: Sequence[Item], labels: Sequence[int | None]) -> None:
        """The next chunk of the stream, in order."""
        for item, label in zip(items, labels, strict=True):
            cell = self._picked.setdefault((item.kind, label), [])
            if len(cell) < self.per_cell:
                cell.append((self._seen, item))
            self._seen += 1

    def picked(self) -> list[tuple[int, Item]]:
        """The picked items with their positions in the stream, in stream order."""
        return sorted(((index, item) for cell in self._picked.values() for index, item in cell), key=lambda p: p[0])

    def probes(self, scores: np.ndarray) -> list[Probe]:
        """The picked items with their scores (``scores`` in stream order, as the fit computed them)."""
        return [Probe(item, float(scores[index])) for index, item in self.picked()]


def check_numeric_path(recorded: NumericPath, probes: Sequence[Probe], subspace: Subspace, embedder: Embedder,
                       config: EmbeddingConfig, *, what: str, tolerance: float = SCORE_TOLERANCE) -> float | None:
    """Refuse to score ``what`` on this embedder's path when it moves the probes' scores beyond ``tolerance``.

    Returns None when the paths are the same (nothing run), else the largest |Δscore| found (within tolerance).
    """
    current = embedder.numeric_path
    if current == recorded:
        return None
    if not probes:
        raise NumericPathMismatch(
            f"{what} was fitted on {recorded}, this server computes on {current}, and the version has no probe items to "
            "measure the difference: refit it on this path, or run the path it was fitted on (SAFT_DEVICE, SAFT_DTYPE)")
    items = [p.item for p in probes]
    vectors = embedder.embed(embedder.encode_items(items, config), config)
    scores = subspace.score_samples(vectors, [item.kind for item in items])
    delta = float(np.max(np.abs(scores - np.asarray([p.score for p in probes]))))
    if not delta <= tolerance:  # NaN included
        raise NumericPathMismatch(
            f"{what} was fitted on {recorded}; on this server's {current} its probe scores move by up to {delta:.3g} "
            f"(tolerance {tolerance:g}): refit it on this path, or run the path it was fitted on (SAFT_DEVICE, SAFT_DTYPE)")
    log.info("%s: fitted on %s, scoring on %s; probe scores within %.3g (tolerance %g)", what, recorded, current, delta,
             tolerance)
    return delta

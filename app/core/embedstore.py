"""Embedding files: the pooled embeddings of a dataset, stored once so fits, evaluations and cross-validations
over the same lines never run the model twice.

Owns one file format (``.npz``: ``keys``, ``vectors`` float32, ``n_tokens``, ``truncated`` and a JSON ``meta``
naming the model weights and the embedding config) and an ``EmbedFn`` wrapper that serves what the file holds
and embeds only the rest. Rows are found by the embedding cache's key (weights + config + formatted text,
``app.core.embedding.cache_key``), so a file can never answer for another model, config or text. Must not know HTTP,
subspaces or thresholds. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from app.core.embedding import Embedder, EmbeddingConfig, Encoded, cache_key
from app.core.items import Item
from app.core.pipeline import EmbedFn

FORMAT = "saft-embeddings/1"


class EmbeddingFileError(ValueError):
    """An embedding file is unreadable or was made for another model or embedding config."""


class EmbeddingFile:
    """Rows of stored embeddings by key; ``add`` collects new rows, ``save`` writes them all."""

    def __init__(self, weights_digest: str, config: EmbeddingConfig) -> None:
        self.weights_digest = weights_digest
        self.config = config
        self._rows: dict[str, tuple[np.ndarray, int, bool]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> tuple[np.ndarray, int, bool] | None:
        return self._rows.get(key)

    def add(self, key: str, vector: np.ndarray, n_tokens: int, truncated: bool) -> None:
        self._rows[key] = (np.asarray(vector, dtype=np.float32), int(n_tokens), bool(truncated))

    @classmethod
    def load(cls, path: Path, weights_digest: str, config: EmbeddingConfig) -> EmbeddingFile:
        """Read ``path``; refuse one made with other weights or another embedding config."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                keys, vectors, n_tokens, truncated = z["keys"], z["vectors"], z["n_tokens"], z["truncated"]
        except (OSError, KeyError, ValueError) as err:
            raise EmbeddingFileError(f"{path}: not a readable embedding file ({err})") from None
        if meta.get("format") != FORMAT:
            raise EmbeddingFileError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("weights_sha256") != weights_digest:
            raise EmbeddingFileError(f"{path}: made with weights {str(meta.get('weights_sha256'))[:12]}…, "
                                     f"the loaded model is {weights_digest[:12]}…")
        if EmbeddingConfig.from_dict(meta["embedding"]) != config:
            raise EmbeddingFileError(f"{path}: made with embedding {meta['embedding']}, this run uses {config.as_dict()}")
        out = cls(weights_digest, config)
        for key, vector, n, t in zip(keys.tolist(), vectors, n_tokens.tolist(), truncated.tolist(), strict=True):
            out._rows[key] = (vector.astype(np.float32), int(n), bool(t))
        return out

    def save(self, path: Path, provenance: dict[str, object] | None = None) -> Path:
        keys = sorted(self._rows)
        dim = next(iter(self._rows.values()))[0].shape[0] if keys else 0
        meta = {"format": FORMAT, "weights_sha256": self.weights_digest, "embedding": self.config.as_dict(),
                "rows": len(keys), **(provenance or {})}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        os.close(fd)
        try:
            np.savez(
                tmp, meta=np.asarray(json.dumps(meta)), keys=np.asarray(keys, dtype="U64"),
                vectors=np.stack([self._rows[k][0] for k in keys]) if keys else np.empty((0, dim), np.float32),
                n_tokens=np.asarray([self._rows[k][1] for k in keys], dtype=np.int64),
                truncated=np.asarray([self._rows[k][2] for k in keys], dtype=bool),
            )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


class StoredEmbed:
    """An ``EmbedFn`` that answers from ``store`` and runs ``embed`` (another EmbedFn) only for the rest,
    adding what it ran to the store; ``hits`` and ``misses`` count rows served and rows embedded."""

    def __init__(self, embedder: Embedder, store: EmbeddingFile, embed: EmbedFn) -> None:
        self.embedder, self.store, self.embed = embedder, store, embed
        self.hits = self.misses = 0

    def __call__(self, items: Sequence[Item], config: EmbeddingConfig) -> tuple[list[Encoded], np.ndarray]:
        if config != self.store.config:
            raise EmbeddingFileError(f"embedding file holds {self.store.config.as_dict()}, asked for {config.as_dict()}")
        texts, _ = self.embedder.format_items(items, config)
        digest, path = self.embedder.weights_digest, self.embedder.numeric_path
        keys = [cache_key(digest, config, text, path) for text in texts]
        missing = [i for i, key in enumerate(keys) if self.store.get(key) is None]
        if missing:
            encoded, vectors = self.embed([items[i] for i in missing], config)
            for i, enc, vector in zip(missing, encoded, vectors, strict=True):
                self.store.add(keys[i], vector, enc.n_tokens, enc.truncated)
        self.hits += len(items) - len(missing)
        self.misses += len(missing)
        rows = [self.store.get(key) for key in keys]
        found = [r for r in rows if r is not None]
        vectors_out = np.stack([r[0] for r in found]) if found else np.empty((0, self.embedder.dim(config)), np.float32)
        return [Encoded((), r[1], r[2]) for r in found], vectors_out

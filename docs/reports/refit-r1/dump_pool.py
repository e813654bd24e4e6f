"""Every valid pool line with its vector from an embedding file (no model pass): one .npz for the refit simulation.

    python docs/reports/refit-r1/dump_pool.py --embeddings /work/cache/emb-chat-resp-16.npz --out /work/cache/pool-resp16.npz
"""

from __future__ import annotations

import argparse
import json
from contextlib import closing
from pathlib import Path

import numpy as np

from app.core.embedding import EmbeddingConfig
from app.core.embedstore import EmbeddingFile, StoredEmbed
from app.core.pipeline import DEFAULT_FIT_EMBEDDING, chunks, read_file, single_sample
from app.cli import _load_embedder

DATA = Path("../shared/data")
FILES = [DATA / "calibration.jsonl", DATA / "dev_eval.jsonl", DATA / "extra_sources.jsonl"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embeddings", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    embedder = _load_embedder(None)
    config = EmbeddingConfig(**{**DEFAULT_FIT_EMBEDDING.as_dict(), "layers": embedder.normalize_layers(DEFAULT_FIT_EMBEDDING.layers)})
    store = EmbeddingFile.load(args.embeddings, embedder.weights_digest, config)

    def missing(items, cfg):  # noqa: ANN001, ANN202
        raise SystemExit(f"{len(items)} items are not in {args.embeddings}")

    embed = StoredEmbed(embedder, store, missing)
    rows: dict[str, list] = {k: [] for k in ("vectors", "labels", "item_kinds", "kinds", "sources", "groups", "ids")}
    for path in FILES:
        with closing(read_file(path)) as lines:
            for chunk in chunks(map(single_sample, lines), 512):
                valid = [line for line in chunk if line.item is not None and line.label is not None]
                rows["vectors"].append(embed([line.item for line in valid], config)[1])
                for line in valid:
                    obj = line.obj or {}
                    rows["labels"].append(line.label)
                    rows["item_kinds"].append(line.item.kind)
                    rows["kinds"].append(str(obj.get("kind", line.item.kind)))
                    rows["sources"].append(str(obj["source"]))
                    rows["groups"].append(str(obj["group"]))
                    rows["ids"].append(f"{path.name}:{line.number}")
    X = np.concatenate(rows.pop("vectors")).astype(np.float32)
    np.savez(args.out, X=X, **{k: np.asarray(v) for k, v in rows.items()},
             provenance=np.asarray(json.dumps({"embeddings": str(args.embeddings), "config": config.as_dict(),
                                               "weights_digest": embedder.weights_digest})))
    print(X.shape, len(set(rows["sources"])), "sources")


if __name__ == "__main__":
    main()

"""Check an embedding file against fresh product embeddings: a random sample of pool lines is embedded now
(``app.core.pipeline.direct_embed``, float32) and compared with the rows the file serves for the same text.

    .venv/bin/python docs/reports/quality-r3/check_embedding_file.py --file /work/cache/emb-chat-resp-16.npz \
        --layers 16 --pooling response --n 24
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from app.core.embedding import Embedder, EmbeddingConfig
from app.core.embedstore import EmbeddingFile, StoredEmbed
from app.core.items import parse_item
from app.core.pipeline import direct_embed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--pooling", default="response")
    ap.add_argument("--template", default="chat")
    ap.add_argument("--n", type=int, default=24)
    args = ap.parse_args()
    rows = [json.loads(line) for name in ("calibration", "dev_eval", "extra_sources") for line in (args.data / f"{name}.jsonl").open()]
    random.Random(0).shuffle(rows)
    items = []
    for r in rows:
        try:
            items.append(parse_item(r))
        except ValueError:
            continue
        if len(items) == args.n:
            break
    embedder = Embedder.load()
    config = EmbeddingConfig(layers=(args.layers,), pooling=args.pooling, template=args.template, max_length=512)  # type: ignore[arg-type]
    store = EmbeddingFile.load(args.file, embedder.weights_digest, config)
    stored = StoredEmbed(embedder, store, direct_embed(embedder))
    _, cached = stored(items, config)
    assert stored.misses == 0, f"{stored.misses} of {len(items)} sampled lines are not in the file"
    _, fresh = direct_embed(embedder)(items, config)
    rel = np.abs(cached - fresh).max(axis=1) / np.abs(fresh).max(axis=1)
    cos = (cached * fresh).sum(1) / np.linalg.norm(cached, axis=1) / np.linalg.norm(fresh, axis=1)
    print(json.dumps({"n": len(items), "max_rel_abs_diff": float(rel.max()), "min_cosine": float(cos.min())}))


if __name__ == "__main__":
    main()

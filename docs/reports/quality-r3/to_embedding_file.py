"""Turn one layer and pooling of the round-3 pool cache into a product embedding file (``saft embed``'s format),
so ``saft fit`` / ``saft crossval`` / ``saft eval`` run on the cached pool with ``--embeddings`` and no model pass.

    .venv/bin/python docs/reports/quality-r3/to_embedding_file.py --cache /work/cache/pool --template judge \
        --pooling last --layer 16 --out /work/cache/judge-last-16.npz

Keys are the product's own (``app.serving.cache.cache_key`` of the weights, the config and the formatted text), so a
row can only ever answer for the very text and config it was computed from. The cache is float16; the
file stores those values as float32 (the difference to a fresh float32 pass is measured in
``check_embedding_file.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from app.serving.cache import cache_key
from app.core.embedding import Embedder, EmbeddingConfig
from app.core.embedstore import EmbeddingFile
from app.core.items import parse_item

LAYERS = (4, 8, 12, 16, 20)
POOLING_NAME = {"mean": "mean", "last": "last", "resp": "response"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--template", required=True)
    ap.add_argument("--pooling", required=True, choices=sorted(POOLING_NAME))
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = [json.loads(line) for line in (args.cache / "items.jsonl").open()]
    objs = {}
    for name in ("calibration", "dev_eval", "extra_sources"):
        for number, line in enumerate((args.data / f"{name}.jsonl").open(), 1):
            objs[(name, number)] = json.loads(line)
    embedder = Embedder.load()
    config = EmbeddingConfig(layers=(args.layer,), pooling=POOLING_NAME[args.pooling], template=args.template,  # type: ignore[arg-type]
                             max_length=args.max_length)
    items = [parse_item(objs[(r["file"], r["line"])]) for r in rows]
    texts, _ = embedder.format_items(items, config)
    keys = [cache_key(embedder.weights_digest, config, t) for t in texts]
    store = EmbeddingFile(embedder.weights_digest, config)
    col = LAYERS.index(args.layer)
    n = 0
    for path in sorted((args.cache / args.template).glob("*-[0-9][0-9][0-9][0-9].npz")):
        z = np.load(path)
        for i, idx in enumerate(z["idx"].tolist()):
            store.add(keys[idx], z[args.pooling][i, col].astype(np.float32), int(z["n_tokens"][i]), bool(z["truncated"][i]))
            n += 1
    store.save(args.out, {"provenance": f"docs/reports/quality-r3 cache {args.cache} ({args.template}, {args.pooling}, layer {args.layer})"})
    print(json.dumps({"out": str(args.out), "rows": len(store), "pool_items": len(rows), "chunks_rows": n}))


if __name__ == "__main__":
    main()

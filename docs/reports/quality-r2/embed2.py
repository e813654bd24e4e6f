"""Embed calibration+dev in a random, priority-weighted order so that any prefix is a uniform random
subsample within each (file, kind, label) cell. Layers x poolings in one pass (app.core.sweep.embed_set,
the same encode/forward_multi/pool code as fit/score). Shards of 64 lines, resumable."""
import json, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, "/work/main")
from app.core.embedding import Embedder, EmbeddingConfig
from app.core.pipeline import parse_line
from app.core.sweep import embed_set

LAYERS = [int(x) for x in sys.argv[1].split(",")]
MAXLEN = int(sys.argv[2])
OUT = Path(f"/work/notes/emb/L{'-'.join(map(str, LAYERS))}_M{MAXLEN}")
OUT.mkdir(parents=True, exist_ok=True)
POOLINGS = ["mean", "response", "last"]
base = EmbeddingConfig((LAYERS[0],), "mean", "chat", MAXLEN, "left")
emb = Embedder.load("smollm2-135m-instruct")
DATA = Path("/work/shared/data")
WEIGHT = {("pair", 1): 3.0, ("pair", 0): 1.0, ("prompt", 1): 0.6, ("prompt", 0): 0.25}
rng = np.random.default_rng(0)
queue = []
for fi, name in enumerate(("calibration", "dev_eval")):
    for n, raw in enumerate((DATA / f"{name}.jsonl").read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        line = parse_line(n, raw)
        if line.item is None:
            continue
        w = WEIGHT[(line.obj["kind"], line.label)] * (1.0 if name == "dev_eval" else 1.3)
        queue.append((rng.random() / w, fi, line))
queue.sort(key=lambda t: t[0])
(OUT / "order.json").write_text(json.dumps([[fi, l.number] for _, fi, l in queue]))
for s in range(0, len(queue), 64):
    f = OUT / f"shard{s:05d}.npz"
    if f.exists():
        continue
    chunk = queue[s:s + 64]
    lines = [l for _, _, l in chunk]
    t = time.time()
    es = embed_set(emb, lines, LAYERS, POOLINGS, base)
    enc = emb.encode_items([l.item for l in lines], base)
    np.savez(OUT / f"tmp{s:05d}.npz", fileidx=np.array([fi for _, fi, _ in chunk]), lines=np.array([l.number for l in lines]),
             labels=es.labels, kinds=es.kinds, item_kinds=np.array(es.item_kinds),
             sources=np.array([l.obj.get("source", "") for l in lines]),
             n_tokens=np.array([e.n_tokens for e in enc]), layers=np.array(es.layers),
             **{p: v.astype(np.float32) for p, v in es.vectors.items()})
    (OUT / f"tmp{s:05d}.npz").rename(f)
    print(f"{s+len(chunk)}/{len(queue)} {time.time()-t:.1f}s ntok={sum(min(e.n_tokens, MAXLEN) for e in enc)}", flush=True)
print("DONE", flush=True)

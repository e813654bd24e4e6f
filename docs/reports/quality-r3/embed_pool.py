"""Embed the whole labelled pool once into a cache of pooled hidden states (round 3 of the quality work).

Every layer and pooling the search may need, from one forward pass per template and item: float16 arrays
in chunk files, written atomically, so the job resumes where it stopped (``nice -n 19`` in the background).
Pairs (and the judge template's short items, unit ``shortr``) are embedded in a fixed random order, so whatever
part is done is a random subsample; ``UNITS`` (e.g. ``chat:short,judge:shortr,chat:pairs``) sets the order.

    .venv/bin/python docs/reports/quality-r3/embed_pool.py --out /work/cache/pool

A larger model on a stratified subsample (``docs/reports/larger-model``): ``--model`` takes any local HF
directory or ``.gguf`` file, ``--layers`` the hidden states to keep, ``--per-source-label N`` keeps up to N items
of each (source, label), whole groups at a time (seed 0), and writes them to ``<out>/subsample.jsonl`` too.

Outputs: ``items.jsonl`` (one row per pool item: idx, file, line, source, group, kind, label, item_kind) and
``<template>/<unit>-<chunk>.npz`` with ``idx``, ``n_tokens``, ``truncated`` and one (n, layers, hidden) array
per pooling: mean, last, max, resp (mean over the response tokens; the whole item when it has none).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from app.core.embedding import Embedder, EmbeddingConfig, plan_batches
from app.core.items import ItemError, parse_item

FILES = ("calibration", "dev_eval", "extra_sources")
LAYERS = (4, 8, 12, 16, 20)
CHUNK = 256


def load_pool(data: Path, per_source_label: int = 0) -> tuple[list[dict], list, list[dict]]:
    rows, items, objs = [], [], []
    for name in FILES:
        with (data / f"{name}.jsonl").open() as fh:
            for number, line in enumerate(fh, 1):
                obj = json.loads(line)
                try:
                    item = parse_item(obj)
                except ItemError as err:
                    print(f"skip {name}:{number}: {err}", flush=True)
                    continue
                rows.append({"idx": len(rows), "file": name, "line": number, "source": obj["source"], "group": obj["group"],
                             "kind": obj["kind"], "label": int(obj["label"]), "item_kind": item.kind})
                items.append(item)
                objs.append(obj)
    if per_source_label:
        rows, items, objs = stratified(rows, items, objs, per_source_label)
    return rows, items, objs


def stratified(rows: list[dict], items: list, objs: list[dict], n: int) -> tuple[list[dict], list, list[dict]]:
    """Up to ``n`` items per (source, label), whole groups in a seeded random order, so no group is split."""
    rng = np.random.default_rng(0)
    cells: dict[tuple[str, int], dict[str, list[int]]] = {}
    for i, r in enumerate(rows):
        cells.setdefault((r["source"], r["label"]), {}).setdefault(r["group"], []).append(i)
    keep: list[int] = []
    for key in sorted(cells):
        groups = list(cells[key].values())
        taken = 0
        for g in rng.permutation(len(groups)):
            if taken >= n:
                break
            keep.extend(groups[g])
            taken += len(groups[g])
    keep = sorted(set(keep))
    new_rows = [{**rows[i], "idx": j} for j, i in enumerate(keep)]
    return new_rows, [items[i] for i in keep], [objs[i] for i in keep]


@torch.inference_mode()
def pooled(embedder: Embedder, batch, layers) -> dict[str, np.ndarray]:
    captured, mask = embedder.hidden_states(batch, layers)
    m = mask.unsqueeze(-1).float()
    starts = torch.tensor([e.response_start for e in batch])
    pos = torch.arange(mask.shape[1])[None, :]
    rmask = (mask * (pos >= starts[:, None])).unsqueeze(-1).float()
    last = mask.sum(1) - 1
    out = {p: [] for p in ("mean", "last", "max", "resp")}
    for layer in layers:
        h = captured[layer].float()
        out["mean"].append((h * m).sum(1) / m.sum(1))
        out["last"].append(h[torch.arange(h.shape[0]), last])
        out["max"].append(h.masked_fill(m == 0, float("-inf")).amax(1))
        out["resp"].append((h * rmask).sum(1) / rmask.sum(1).clamp(min=1))
    return {p: torch.stack(v, 1).numpy() for p, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--model", default=None, help="a local HF directory or .gguf file (default: the embedded model)")
    ap.add_argument("--layers", default=",".join(map(str, LAYERS)))
    ap.add_argument("--per-source-label", type=int, default=0)
    ap.add_argument("--store-dtype", default="float16", choices=("float16", "float32"),
                    help="float32 for models whose hidden states pass float16's range (Gemma 3 reaches 4.5e4)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    args.out.mkdir(parents=True, exist_ok=True)
    rows, items, objs = load_pool(args.data, args.per_source_label)
    (args.out / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.per_source_label:
        (args.out / "subsample.jsonl").write_text("".join(json.dumps(o) + "\n" for o in objs))
    embedder = Embedder.load(args.model) if args.model else Embedder.load()
    layers = embedder.normalize_layers(tuple(int(x) for x in args.layers.split(",")))
    short = [r["idx"] for r in rows if r["item_kind"] == "text"]
    pairs = [r["idx"] for r in rows if r["item_kind"] == "pair"]
    pairs = [pairs[i] for i in np.random.default_rng(0).permutation(len(pairs))]
    shuffled = [short[i] for i in np.random.default_rng(1).permutation(len(short))]
    order = os.environ.get("UNITS", "chat:short,judge:shortr,chat:pairs,judge:pairs").split(",")
    lists = {"short": short, "shortr": shuffled, "pairs": pairs}
    # "judge:shortr:2560" stops that unit after its first 2,560 items (a random subsample).
    units = [(u.split(":")[0], u.split(":")[1], lists[u.split(":")[1]][: int(u.split(":")[2]) if u.count(":") == 2 else None])
             for u in order]
    for template, unit, idxs in units:
        config = EmbeddingConfig(layers=layers, pooling="mean", template=template, max_length=args.max_length)  # type: ignore[arg-type]
        (args.out / template).mkdir(exist_ok=True)
        for c in range(0, len(idxs), CHUNK):
            path = args.out / template / f"{unit}-{c // CHUNK:04d}.npz"
            if path.exists():
                continue
            t0 = time.time()
            chunk = idxs[c:c + CHUNK]
            enc = embedder.encode_items([items[i] for i in chunk], config)
            arrays = {p: np.empty((len(chunk), len(layers), embedder.hidden_size), args.store_dtype) for p in ("mean", "last", "max", "resp")}
            for b in plan_batches([len(e.input_ids) for e in enc], 2048, 32):
                for p, v in pooled(embedder, [enc[i] for i in b], layers).items():
                    arrays[p][b] = v
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, idx=np.asarray(chunk), n_tokens=np.asarray([e.n_tokens for e in enc]),
                     kept_tokens=np.asarray([len(e.input_ids) for e in enc]),
                     truncated=np.asarray([e.truncated for e in enc]), **arrays)
            os.replace(tmp, path)
            print(f"{template} {unit} {c + len(chunk)}/{len(idxs)} {sum(len(e.input_ids) for e in enc)} tokens "
                  f"{time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()

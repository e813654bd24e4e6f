"""Give a version fitted before probes were recorded its numeric path and probe items, in place (a schema migration).

    python scripts/add_probes.py models default v4 --data ../shared/data

The basis, τ and everything else in the manifest stay as they are; the script only adds ``numeric_path`` (the
path it runs on, which must be the one the version was fitted on: ``REFERENCE_PATH`` for every version before the
field existed) and ``probes``: the first ``PROBES_PER_CELL`` valid items of each (kind, label) cell of the
version's own calibration stream (its files in the manifest's order), as a fit now picks them, scored by the
version on this path. The manifest is replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from app.core.embedding import Embedder
from app.core.numeric_path import REFERENCE_PATH, Probe, ProbeCollector
from app.core.pipeline import read_file, single_sample
from app.store.artifacts import MANIFEST, check_compatible, load_version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path)
    parser.add_argument("name")
    parser.add_argument("version")
    parser.add_argument("--data", type=Path, required=True, help="the directory of the manifest's calibration files")
    args = parser.parse_args()
    subspace, manifest = load_version(args.models, args.name, args.version)
    embedder = Embedder.load(manifest.model_id)
    if embedder.numeric_path != REFERENCE_PATH:
        raise SystemExit(f"this machine computes on {embedder.numeric_path}; the version was fitted on {REFERENCE_PATH}")
    check_compatible(manifest, subspace, embedder)
    collector = ProbeCollector()
    for name in manifest.calibration["path"].split(","):
        lines = [line for line in map(single_sample, read_file(args.data / name)) if line.error is None]
        collector.offer([line.item for line in lines], [line.label for line in lines])
    items = [item for _, item in collector.picked()]
    scores = subspace.score_samples(embedder.embed(embedder.encode_items(items, manifest.embedding), manifest.embedding),
                                    [item.kind for item in items])
    manifest.numeric_path = embedder.numeric_path
    manifest.probes = [Probe(item, float(score)) for item, score in zip(items, scores, strict=True)]
    path = args.models / args.name / args.version / MANIFEST
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-")
    with os.fdopen(fd, "w") as fh:
        json.dump(manifest.to_json(), fh, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(f"{path}: {len(manifest.probes)} probes on {manifest.numeric_path}")


if __name__ == "__main__":
    main()

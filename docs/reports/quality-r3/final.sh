#!/usr/bin/env bash
# Round 3's final step: the committed default and its source-held-out figures, from the cached pool (no model pass
# except the spot check). Run from the repository root after embed_pool.py has embedded every pair.
set -euo pipefail
D=../shared/data
F="$D/calibration.jsonl $D/dev_eval.jsonl $D/extra_sources.jsonl"
C=${CACHE:-/work/cache}
R=docs/reports
py=.venv/bin/python
[ -f $C/emb-chat-resp-16.npz ] || $py docs/reports/quality-r3/to_embedding_file.py --cache $C/pool --template chat --pooling resp --layer 16 --out $C/emb-chat-resp-16.npz
[ -f $C/emb-chat-mean-20.npz ] || $py docs/reports/quality-r3/to_embedding_file.py --cache $C/pool --template chat --pooling mean --layer 20 --out $C/emb-chat-mean-20.npz
$py docs/reports/quality-r3/check_embedding_file.py --file $C/emb-chat-resp-16.npz | tee $R/quality-r3/check-embedding-file.json
# The default: `saft fit <pool>` with the default options (every line's vector from the embedding file).
.venv/bin/saft fit $F --name default --mode replace --embeddings $C/emb-chat-resp-16.npz --report $R/fit-default-v3.html | tee $R/quality-r3/fit-default-v3.json
for by in source family; do
  .venv/bin/saft crossval $F --by $by --families docs/reports/quality-r3/families.json --embeddings $C/emb-chat-resp-16.npz \
    --json $R/crossval-default-v3-$by.json --report $R/crossval-default-v3-$by.html
  # v2's settings (layer 20 mean, items weighed alike, τ on in-sample scores), refitted on the same pool: the baseline.
  .venv/bin/saft crossval $F --by $by --families docs/reports/quality-r3/families.json --embeddings $C/emb-chat-mean-20.npz \
    --layers 20 --pooling mean --balance item --cross-fit none --json $R/crossval-v2-settings-$by.json --report $R/crossval-v2-settings-$by.html
done

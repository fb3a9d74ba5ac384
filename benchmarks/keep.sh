#!/usr/bin/env bash
# Copy the record of every finished run under OUT_DIR (results.json, config.yaml, metrics.jsonl and
# the small JSON files next to them; no checkpoints, no caches) to DEST/<run>/, for committing:
# benchmarks/paired.py and benchmarks/screen.py read DEST as they read OUT_DIR, so tables can be
# rebuilt, and later seeds or arms paired with these, on another machine. Copied back into an
# OUT_DIR (cp -r DEST/. OUT_DIR/), the records make the benchmark scripts skip those runs: a
# script finishes a table another machine started without training its finished runs again.
#   benchmarks/keep.sh runs/prove_cs_dfl benchmarks/results/prove_cs_dfl
set -euo pipefail
OUT=$1; DEST=$2
[ -d "$OUT" ] || { echo "keep.sh: no run folder $OUT (give the OUT_DIR a benchmark script wrote, e.g. runs/prove_cs_dfl)"; exit 2; }
for run in "$OUT"/*/; do
  run=${run%/}
  [ -f "$run/results.json" ] || continue
  mkdir -p "$DEST/$(basename "$run")"
  for f in "$run"/*.json "$run"/*.jsonl "$run"/config.yaml; do
    [ -f "$f" ] && cp "$f" "$DEST/$(basename "$run")/"
  done
done
ls "$DEST"

#!/usr/bin/env bash
# Epoch times with each image cache (data.cache) on the construction-safety subset: cs_student for
# EPOCHS epochs with 1 thread, one run after another: none (every image decoded at every use), ram
# (decoded once per run, before the first epoch), disk with an empty cache folder (decoded in the
# first epoch and stored), disk again with seed 1 (read from the folder the first disk run filled).
# Prints a Markdown table: the command's wall-clock time, and each epoch's training time.
#   benchmarks/image_cache.sh [OUT_DIR] [EPOCHS]      (default runs/image_cache, 3 epochs)
# EXTRA adds --set options to every run, e.g. EXTRA="--set data.workers=0" decodes in the training
# process instead of a loader worker.
set -euo pipefail
OUT=${1:-runs/image_cache}
EPOCHS=${2:-3}
KDET=${KDET:-kdet}
PYTHON=${PYTHON:-python}
COMMON="--set train.epochs=$EPOCHS --set train.threads=1 ${EXTRA:-}"
CONFIG=benchmarks/configs/cs_student.yaml
mkdir -p "$OUT"
rm -rf "${OUT:?}/images"
run() {  # NAME SETTINGS...
  local name=$1; shift
  rm -rf "${OUT:?}/$name"
  local start end
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  $KDET train $CONFIG $COMMON "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 || { echo "FAILED: $OUT/$name (see $OUT/$name.log)"; exit 1; }
  end=$(date +%s.%N)
  echo "$name $(echo "$end - $start" | bc)" >> "$OUT/wall.txt"
}
rm -f "$OUT/wall.txt"
run none --set data.cache=none
run ram --set data.cache=ram
run disk_first --set data.cache=disk --set data.cache_dir="$OUT/images"
run disk_again --set data.cache=disk --set data.cache_dir="$OUT/images" --set seed=1
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
wall = dict(line.split() for line in (out / "wall.txt").read_text().splitlines())
runs = list(wall)
epochs = {r: [json.loads(l)["train_time_s"] for l in (out / r / "metrics.jsonl").read_text().splitlines()] for r in runs}
n = max(len(e) for e in epochs.values())
print("| data.cache | command wall-clock (s) | " + " | ".join(f"epoch {i + 1} (s)" for i in range(n)) + " |")
print("|---|---|" + "---|" * n)
for r in runs:
    print(f"| {r} | {float(wall[r]):.0f} | " + " | ".join(f"{t:.1f}" for t in epochs[r]) + " |")
PY

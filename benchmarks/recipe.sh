#!/usr/bin/env bash
# The shipped recipe on its own schedule: `kdet distill bccd_distill` (40 epochs) against
# `kdet train bccd_student` (the same student, data, schedule and seed, no teacher), seeds 0 1 2,
# and the recipe again reading the teacher from the teacher-output cache (OUT_DIR/teacher_cache,
# one subdirectory per seed). Validation every 4 epochs, 1 thread per run. Resumable (see queue.sh).
#   benchmarks/recipe.sh [OUT_DIR] [PARALLEL]      (default runs/recipe40, 2 runs at a time)
# then: python benchmarks/paired.py OUT_DIR baseline recipe recipe_cached
set -euo pipefail
OUT=${1:-runs/recipe40}
PARALLEL=${2:-2}
KDET=${KDET:-kdet}
COMMON="--set train.threads=1 --set train.eval_every=4"
mkdir -p "$OUT"
jobs=()
for seed in 0 1 2; do
  jobs+=("$KDET train bccd_student $COMMON --set seed=$seed --out $OUT/baseline-s$seed")
  jobs+=("$KDET distill bccd_distill $COMMON --set seed=$seed --out $OUT/recipe-s$seed")
  jobs+=("$KDET distill bccd_distill $COMMON --set seed=$seed --teacher-cache $OUT/teacher_cache --out $OUT/recipe_cached-s$seed")
done
source "$(dirname "$0")/queue.sh"
run_queue "$PARALLEL" "${jobs[@]}"

#!/usr/bin/env bash
# The shipped recipe on its own schedule: `kdet distill bccd_distill` (40 epochs) against
# `kdet train bccd_student` (the same student, data, schedule and seed, no teacher), seeds 0 1 2,
# and the recipe without its box part (objectness and class only). Validation every 4 epochs,
# 1 thread per run. Resumable (see queue.sh).
#   benchmarks/recipe.sh [OUT_DIR] [PARALLEL]      (default runs/recipe40, 2 runs at a time)
# then: kdet compare OUT_DIR/*-s?/ --markdown
set -euo pipefail
OUT=${1:-runs/recipe40}
PARALLEL=${2:-2}
KDET=${KDET:-kdet}
COMMON="--set train.threads=1 --set train.eval_every=4"
NO_BOX="[{loss: objectness_scaled, weight: 1.0, args: {box_weight: 0.0}}]"
mkdir -p "$OUT"
jobs=()
for seed in 0 1 2; do
  jobs+=("$KDET train bccd_student $COMMON --set seed=$seed --out $OUT/baseline-s$seed")
  jobs+=("$KDET distill bccd_distill $COMMON --set seed=$seed --out $OUT/recipe-s$seed")
  jobs+=("$KDET distill bccd_distill $COMMON --set seed=$seed --set 'distill.terms=$NO_BOX' --out $OUT/recipe_no_box-s$seed")
done
source "$(dirname "$0")/queue.sh"
run_queue "$PARALLEL" "${jobs[@]}"

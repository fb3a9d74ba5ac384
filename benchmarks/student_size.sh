#!/usr/bin/env bash
# The shipped recipe with a smaller student: the bccd_student / bccd_distill recipes with the
# student's size set to SIZE (default p, 0.45M parameters), baseline and distilled, seeds 0 1 2,
# 40 epochs, validation every 4 epochs, 1 thread per run. The distilled runs read the teacher
# from the cache that benchmarks/recipe.sh builds in the same OUT_DIR (the cache depends on the
# teacher, the data, the augmentation and the seed, not on the student), so run that first, or
# let these runs build it. Resumable (see queue.sh).
#   benchmarks/student_size.sh [OUT_DIR] [SIZE] [PARALLEL]      (default runs/recipe40, p, 2)
# then: python benchmarks/paired.py OUT_DIR baseline_SIZE recipe_SIZE
set -euo pipefail
OUT=${1:-runs/recipe40}
SIZE=${2:-p}
PARALLEL=${3:-2}
KDET=${KDET:-kdet}
COMMON="--set train.threads=1 --set train.eval_every=4 --set model.size=$SIZE"
mkdir -p "$OUT"
jobs=()
for seed in 0 1 2; do
  jobs+=("$KDET train bccd_student $COMMON --set seed=$seed --out $OUT/baseline_$SIZE-s$seed")
  jobs+=("$KDET distill bccd_distill $COMMON --set seed=$seed --teacher-cache $OUT/teacher_cache --out $OUT/recipe_$SIZE-s$seed")
done
source "$(dirname "$0")/queue.sh"
run_queue "$PARALLEL" "${jobs[@]}"
